"""Held-out selection: the held-out split is a property of the dataset
(``dataset.heldout_per_class``), carved out of the training split before any
stage sees it, so no teacher trains on it and no distilled image can be one."""
from collections import Counter

import pytest
import torch

from orchestrator.study.expand import expand
from orchestrator.execution.jobs import _get_dataset, run_node
from orchestrator.execution.plan import STAGES, build_plan
from orchestrator.study.spec import StudyError, load_study
from rd3core.artifacts import ArtifactStore
from rd3core.config import build
from rd3core.data import HELDOUT_SEED, carve_heldout, load_dataset, train_class_counts
from rd3core.pipeline import posteval
from rd3core.protocol import Protocol
from rd3core.synth import synthesize
from rd3core.synth.random_real import RandomRealParams

ARCH = "convnet2-w8"
PER_CLASS = 3


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits")


def rows(images: torch.Tensor) -> Counter:
    return Counter(bytes(x.contiguous().numpy().tobytes()) for x in images)


def protocol(interval=1):
    return build(Protocol, {"student": ARCH, "epochs": 3, "batch_size": 16, "labels": {"mode": "hard"},
                            "augment": {"flip": False}, "eval": {"interval": interval}})


def test_the_carve_splits_the_training_split_in_two(digits):
    carved = carve_heldout(digits, PER_CLASS)
    assert digits.heldout is None and len(digits.train) == 1347  # the whole dataset is left as it was
    assert train_class_counts(carved) == [n - PER_CLASS for n in train_class_counts(digits)]
    assert torch.bincount(carved.heldout.labels, minlength=10).tolist() == [PER_CLASS] * 10
    # Disjoint, and together exactly the original training split (every image once, with its label).
    train, held = rows(carved.train.images), rows(carved.heldout.images)
    assert not set(train) & set(held)
    assert train + held == rows(digits.train.images)
    assert sorted(carved.train.labels.tolist() + carved.heldout.labels.tolist()) == sorted(digits.train.labels.tolist())
    assert carved.test is digits.test
    record = carved.record["heldout"]
    assert (record["per_class"], record["seed"], record["images"], record["train"]) == (PER_CLASS, HELDOUT_SEED, 30, 1317)
    assert carved.fingerprint != digits.fingerprint and record["whole_fingerprint"] == digits.fingerprint
    assert carve_heldout(digits, 0) is digits


def test_the_same_seed_gives_the_same_carve(digits):
    a, b = carve_heldout(digits, PER_CLASS), carve_heldout(digits, PER_CLASS)
    assert torch.equal(a.heldout.images, b.heldout.images) and torch.equal(a.train.images, b.train.images)
    assert a.fingerprint == b.fingerprint
    other = carve_heldout(digits, PER_CLASS, seed=HELDOUT_SEED + 1)
    assert not torch.equal(other.heldout.images, a.heldout.images) and other.fingerprint != a.fingerprint
    assert carve_heldout(digits, PER_CLASS + 1).fingerprint != a.fingerprint


def test_carving_refuses_what_would_empty_a_class_or_carve_twice(digits):
    smallest = min(train_class_counts(digits))
    with pytest.raises(ValueError, match=f"less than {smallest}.*'digits' class 8"):
        carve_heldout(digits, smallest)
    with pytest.raises(ValueError, match="expected >= 0"):
        carve_heldout(digits, -1)
    with pytest.raises(ValueError, match="already has a held-out split"):
        carve_heldout(carve_heldout(digits, 1), 1)


def test_random_real_ipc10_selects_on_the_heldout_split(digits):
    # Refused before the carve (a random IPC 10 draw from the whole split picked
    # held-out images); now the draw comes from the carved split.
    carved = carve_heldout(digits, PER_CLASS)
    distilled = synthesize("random_real", carved, None, RandomRealParams(ipc=10), seed=0)
    assert not set(rows(distilled.images)) & set(rows(carved.heldout.images))
    out = posteval(distilled, carved, protocol(), {}, seed=0)
    evaluated = {r["epoch"]: r["test_top1"] for r in out["epochs"] if "test_top1" in r}
    assert list(evaluated) == [1, 2, 3] and all("heldout_top1" in r for r in out["epochs"])
    m = out["metrics"]
    assert m["top1_heldout_selected"] == evaluated[int(m["heldout_selected_epoch"])]
    assert m["top1"] == evaluated[3]
    assert out["resolved"]["heldout"] == {"per_class": PER_CLASS, "seed": HELDOUT_SEED, "images": 30}
    plain = posteval(distilled, digits, protocol(), {}, seed=0)  # the whole dataset: no selection
    assert "top1_heldout_selected" not in plain["metrics"] and "heldout" not in plain["resolved"]
    with pytest.raises(ValueError, match="eval.interval > 0"):
        posteval(distilled, carved, protocol(interval=0), {}, seed=0)


STUDY = """\
name: held
dataset: {{name: digits{extra}}}
teachers:
  - {{arch: convnet2-w8, epochs: 1}}
methods:
  - {{name: random_real, ipc: 10}}
protocol:
  overrides:
    student: convnet2-w8
    epochs: 2
    batch_size: 32
    labels: {{mode: hard}}
    augment: {{flip: false}}
    eval: {{interval: {interval}}}
seeds: [0]
"""


def study(tmp_path, extra="", interval=1, name="held"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(extra=extra, interval=interval))
    return path


def test_cells_and_stages_of_a_carved_dataset_are_their_own(tmp_path):
    whole = expand(load_study(study(tmp_path, name="whole")))
    carved = expand(load_study(study(tmp_path, f", heldout_per_class: {PER_CLASS}")))
    assert whole[0].config["dataset"] == {"name": "digits", "root": None}  # an uncarved dataset keys as before
    assert carved[0].config["dataset"] == {"name": "digits", "root": None, "heldout_per_class": PER_CLASS,
                                           "heldout_seed": HELDOUT_SEED}
    assert whole[0].key != carved[0].key
    store = ArtifactStore(tmp_path / "artifacts")
    synth = [{n.key for n in build_plan(cells, store).nodes.values() if n.stage == "synth"} for cells in (whole, carved)]
    assert not synth[0] & synth[1]
    # What a worker loads for every stage of the carved cells (teacher pretraining included).
    loaded = _get_dataset(carved[0].config["dataset"])
    assert len(loaded.train) == 1347 - 10 * PER_CLASS and len(loaded.heldout) == 10 * PER_CLASS
    assert _get_dataset(whole[0].config["dataset"]).heldout is None


def test_a_carved_study_runs_through_the_workers(tmp_path):
    cells = expand(load_study(study(tmp_path, f", heldout_per_class: {PER_CLASS}")))
    plan = build_plan(cells, ArtifactStore(tmp_path / "artifacts"))
    out = {}
    for node in sorted(plan.nodes.values(), key=lambda n: STAGES.index(n.stage)):
        out[node.stage] = run_node(node.stage, node.key, node.payload, str(tmp_path / "artifacts"), threads=1)
    result = out["posteval"]
    assert result["dataset"]["heldout"]["per_class"] == PER_CLASS  # the record says what was carved
    evaluated = {r["epoch"]: r["test_top1"] for r in result["epochs"] if "test_top1" in r}
    assert result["metrics"]["top1_heldout_selected"] in evaluated.values()


@pytest.mark.parametrize("extra, interval, fragment", [
    (", heldout_per_class: -1", 1, "dataset.heldout_per_class: expected >= 0, got -1"),
    (", heldout_per_class: 130", 1, "dataset.heldout_per_class: expected less than 130, the training images of "
                                    "the smallest class ('digits' class 8), so every class keeps one; got 130"),
    (", heldout_per_class: 3", 0, "dataset.heldout_per_class: selecting an epoch on the held-out split needs "
                                  "eval.interval > 0"),
])
def test_validation_names_the_key(tmp_path, extra, interval, fragment):
    path = study(tmp_path, extra, interval)
    line = path.read_text().splitlines().index(f"dataset: {{name: digits{extra}}}") + 1
    with pytest.raises(StudyError) as err:
        expand(load_study(path))
    assert any(m.startswith(f"{path}:{line}: ") and fragment in m for m in err.value.messages), err.value.messages


def test_heldout_is_no_longer_a_protocol_setting():
    with pytest.raises(Exception, match="heldout_per_class.*unknown key"):
        build(Protocol, {"eval": {"interval": 1, "heldout_per_class": 3}})
