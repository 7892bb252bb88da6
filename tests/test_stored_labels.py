"""Stored (FKD-style) labels: replay gives exactly what on-the-fly labels give,
a mismatch is refused naming what differs, and the orchestrator runs them as
their own `labels` stage."""
import math
import sqlite3

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from rd3core.artifacts import ArtifactStore
from rd3core.config import build
from rd3core.data import Split, load_dataset
from rd3core.labels import EpochwiseLabels, TeacherEnsemble
from rd3core.loop import train
from rd3core.pipeline import TeacherSpec, build_model, make_stored_labels, posteval, train_teacher
from rd3core.protocol import Protocol
from rd3core.stored_labels import StoredLabels, StoredLabelsMismatch
from rd3core.synth import DistilledSet, synthesize
from rd3core.synth.random_real import RandomRealParams

ARCH = "convnet2-w8"


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(digits):
    return train_teacher(digits, TeacherSpec(arch=ARCH, epochs=2, batch_size=256)).model


@pytest.fixture(scope="module")
def distilled(digits):
    return synthesize("random_real", digits, None, RandomRealParams(ipc=4), seed=0)


def protocol(mode="stored", **labels_over):
    return build(Protocol, {
        "student": ARCH, "epochs": 4, "batch_size": 16, "loss": {"temperature": 4},
        "augment": {"crop": "rrc", "scale": [0.4, 1.0], "flip": True, "mix": "cutmix", "shuffle_patches": 2},
        "labels": {"mode": mode, **labels_over}})


@pytest.mark.parametrize("refresh", [1, 3])
def test_replay_gives_exactly_what_on_the_fly_labels_give(digits, teacher, distilled, refresh):
    fly = posteval(distilled, digits, protocol("epochwise", refresh_every=refresh), {ARCH: teacher}, seed=3)
    stored = make_stored_labels(distilled, digits, protocol(refresh_every=refresh, precision="fp32"),
                                {ARCH: teacher}, seed=3)
    replay = posteval(distilled, digits, protocol(refresh_every=refresh, precision="fp32"), {ARCH: teacher},
                      seed=3, stored=stored)
    assert [r["loss"] for r in replay["epochs"]] == [r["loss"] for r in fly["epochs"]]
    assert replay["metrics"] == fly["metrics"]
    assert len(stored.blocks) == math.ceil(4 / refresh)


def test_fp16_records_are_the_on_the_fly_logits_rounded(digits, teacher, distilled):
    recorded = []

    class Recording(EpochwiseLabels):
        def __call__(self, x, idx, params, block, step):
            out = super().__call__(x, idx, params, block, step)
            recorded.append(out.clone())
            return out

    p = protocol("epochwise")
    train(build_model(ARCH, digits, 0), Split(distilled.images, distilled.labels), digits.info, p,
          Recording(TeacherEnsemble([teacher])), batch_size=16, seed=4)
    stored = make_stored_labels(distilled, digits, protocol(), {ARCH: teacher}, seed=4)
    flat = torch.cat([b["logits"] for b in stored.blocks])
    assert flat.dtype == torch.float16
    assert torch.equal(flat, torch.cat(recorded).half())


def test_topk_keeps_the_top_probabilities_and_spreads_the_rest(digits, teacher, distilled):
    full = make_stored_labels(distilled, digits, protocol(precision="fp32"), {ARCH: teacher}, seed=0)
    top = make_stored_labels(distilled, digits, protocol(precision="fp32", topk=3), {ARCH: teacher}, seed=0)
    from rd3core.stored_labels import _expand
    T = 4.0
    p = F.softmax(full.blocks[0]["logits"] / T, 1)
    values, indices = p.topk(3, dim=1)
    expected = torch.full_like(p, 0).add_(((1 - values.sum(1)) / 7).unsqueeze(1)).scatter_(1, indices, values)
    got = F.softmax(_expand(top.blocks[0], 10, "cpu") / T, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert top.nbytes()["logits_bytes"] < full.nbytes()["logits_bytes"]


def test_storage_bytes_are_recorded_and_shrink_with_the_refresh_interval(digits, teacher, distilled):
    every = make_stored_labels(distilled, digits, protocol(), {ARCH: teacher}, seed=0)
    pruned = make_stored_labels(distilled, digits, protocol(refresh_every=2), {ARCH: teacher}, seed=0)
    assert every.nbytes()["logits_bytes"] == 4 * 40 * 10 * 2  # epochs x images x classes x fp16
    assert pruned.nbytes()["logits_bytes"] == every.nbytes()["logits_bytes"] // 2
    assert every.meta["storage_bytes"] == every.nbytes()["storage_bytes"] > every.nbytes()["logits_bytes"]
    out = posteval(distilled, digits, protocol(), {ARCH: teacher}, seed=0, stored=every)
    assert out["labels"]["storage_bytes"] == every.meta["storage_bytes"]


@pytest.mark.parametrize("change, named", [
    (dict(batch_size=20), "batch_size: stored 16, this run 20"),
    (dict(seed=9), "seed: stored 0, this run 9"),
    (dict(epochs=5), "epochs: stored 4, this run 5"),
    (dict(augment={"crop": "rrc", "scale": [0.5, 1.0], "flip": True, "mix": "cutmix", "shuffle_patches": 2}),
     "augment.scale"),
    (dict(distilled="other"), "distilled:"),
    (dict(teacher="other"), "teachers.convnet2-w8: weights differ"),
    (dict(labels={"mode": "stored", "topk": 2}), "topk: stored None, this run 2"),
])
def test_a_mismatch_is_refused_naming_what_differs(digits, teacher, distilled, change, named):
    stored = make_stored_labels(distilled, digits, protocol(), {ARCH: teacher}, seed=0)
    raw = {"student": ARCH, "epochs": 4, "batch_size": 16, "loss": {"temperature": 4},
           "augment": {"crop": "rrc", "scale": [0.4, 1.0], "flip": True, "mix": "cutmix", "shuffle_patches": 2},
           "labels": {"mode": "stored"}}
    seed, other, teachers = 0, distilled, {ARCH: teacher}
    for key, value in change.items():
        if key == "seed":
            seed = value
        elif key == "distilled":
            other = DistilledSet(distilled.images.flip(0), distilled.labels.flip(0))
        elif key == "teacher":
            teachers = {ARCH: build_model(ARCH, digits, 123)}
        else:
            raw[key] = value
    with pytest.raises(StoredLabelsMismatch) as exc:
        posteval(other, digits, build(Protocol, raw), teachers, seed=seed, stored=stored)
    assert named in str(exc.value)
    assert "rerun the labels stage" in str(exc.value)


def test_what_the_labels_do_not_depend_on_may_differ(digits, teacher, distilled):
    stored = make_stored_labels(distilled, digits, protocol(), {ARCH: teacher}, seed=0)
    other = build(Protocol, {"student": "convnet2-w16", "epochs": 4, "batch_size": 16,
                             "loss": {"temperature": 4, "kind": "soft_ce"}, "optim": {"lr": 0.01},
                             "augment": {"crop": "rrc", "scale": [0.4, 1.0], "flip": True, "mix": "cutmix",
                                         "shuffle_patches": 2},
                             "labels": {"mode": "stored"}})
    assert 0 <= posteval(distilled, digits, other, {ARCH: teacher}, seed=0, stored=stored)["metrics"]["top1"] <= 1


def test_a_stored_record_survives_the_artifact_store(tmp_path, digits, teacher, distilled):
    stored = make_stored_labels(distilled, digits, protocol(), {ARCH: teacher}, seed=0)
    store = ArtifactStore(tmp_path)
    store.save("labels", "k", stored.state(), stored.meta)
    again = StoredLabels.from_state(store.load("labels", "k"))
    a = posteval(distilled, digits, protocol(), {ARCH: teacher}, seed=0, stored=stored)
    b = posteval(distilled, digits, protocol(), {ARCH: teacher}, seed=0, stored=again)
    assert a["metrics"] == b["metrics"]


STUDY = """\
name: stored
dataset: {name: digits}
teachers:
  - arch: convnet2-w8
    epochs: 2
    batch_size: 256
    augment: {crop: pad, padding: 2, flip: false, mix: none}
methods:
  - {name: random_real, ipc: 3}
protocol:
  preset: lpld
  overrides:
    student: convnet2-w8
    epochs: 3
    batch_size: 16
    eval: {interval: 0, record_best_on_test: false}
factors:
  protocol.optim.lr: [0.001, 0.002]
  protocol.labels.refresh_every: [1, 3]
seeds: [0]
"""


def test_plan_puts_a_shared_labels_stage_between_synth_and_posteval(tmp_path):
    from orchestrator.study.expand import expand
    from orchestrator.execution.plan import build_plan
    from orchestrator.study.spec import load_study

    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    plan = build_plan(expand(load_study(path)), ArtifactStore(tmp_path / "a"))
    labels = [n for n in plan.nodes.values() if n.stage == "labels"]
    posts = [n for n in plan.nodes.values() if n.stage == "posteval"]
    assert len(posts) == 4 and len(labels) == 2  # lr does not change the labels; refresh_every does
    for post in posts:
        assert any(d.startswith("labels:") for d in post.deps)
        label = plan.nodes[next(d for d in post.deps if d.startswith("labels:"))]
        assert any(d.startswith("synth:") for d in label.deps) and any(d.startswith("teacher:") for d in label.deps)
        assert post.payload["labels"]["key"] == label.key


def test_a_stored_label_study_records_label_storage_bytes(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    proc = run_cli("run", str(path), "--out", str(tmp_path / "out"), "--executor", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with sqlite3.connect(tmp_path / "out" / "rd3.sqlite") as con:
        rows = con.execute("SELECT value FROM metric WHERE name = 'labels_storage_bytes'").fetchall()
    assert len(rows) == 4 and all(r[0] > 3 * 30 * 10 * 2 / 3 for r in rows)
    assert len(list((tmp_path / "out" / "artifacts" / "labels").iterdir())) == 2
