"""A study teacher loaded from a checkpoint: nothing is trained, its test top-1
is measured once and is what evaluating the network directly gives, it is
keyed and recorded by the file's content digest (never its path), the class
order can be mapped, and a teacher near chance is refused with its likely causes."""
import hashlib
import json
import shutil
import sqlite3

import pytest
import torch

from conftest import run_cli
from elsewhere import fit_plainly
from orchestrator.cli import main
from orchestrator.study.expand import expand
from orchestrator.study.spec import load_study
from rd3core.data import load_dataset
from rd3core.loop import Runtime, evaluate
from rd3core.models import create_model
from rd3core.teachers import InputNorm, TeacherRefused, TeacherSpec, load_pretrained

ARCH = "convnet2-w8"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def train_elsewhere(data, mean: float, std: float, seed: int = 0) -> torch.nn.Module:
    """A teacher as another codebase would make it: a plain loop, its own input normalisation."""
    torch.manual_seed(seed)
    model = create_model(ARCH, 10, 1, 16)
    x = (data.train.images.float() - mean) / std
    return fit_plainly(model, x, data.train.labels, torch.optim.Adam(model.parameters(), 1e-2), 5, 128)


@torch.no_grad()
def direct_top1(model, data, mean: float, std: float, order=None) -> float:
    """Top-1 of the network on the test images, normalised as it was trained;
    ``order``: the dataset class of each of its outputs."""
    pred = model((data.test.images.float() - mean) / std).argmax(1)
    if order is not None:
        pred = torch.tensor(order)[pred]
    return (pred == data.test.labels).float().mean().item()


@pytest.fixture(scope="module")
def elsewhere(digits):
    return train_elsewhere(digits, 0.5, 0.25)


def save(model, path, permutation=None):
    """DataParallel-style keys under 'state_dict'; outputs reordered by ``permutation``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if permutation is not None:
        state["classifier.weight"] = state["classifier.weight"][permutation]
        state["classifier.bias"] = state["classifier.bias"][permutation]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 5}, path)
    return path


def test_recorded_top1_is_the_networks_own_on_its_own_normalisation(digits, elsewhere, tmp_path):
    path = save(elsewhere, tmp_path / "teacher.pth")
    spec = TeacherSpec(arch=ARCH, checkpoint=str(path), input_norm=InputNorm(mean=(0.5,), std=(0.25,)))
    result, source = load_pretrained(digits, spec)
    expected = direct_top1(elsewhere, digits, 0.5, 0.25)
    assert expected > 0.8
    assert abs(result.metrics["top1"] - expected) <= 1 / len(digits.test)  # at most one image differs by rounding
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and source["layout"] == "ours"
    assert source["input_norm"] == {"mean": [0.5], "std": [0.25]} and set(result.timing) == {"load_s", "eval_s"}
    # The same weights seen with the dataset's normalisation (0.3, 0.38) compute something else.
    plain, _ = load_pretrained(digits, TeacherSpec(arch=ARCH, checkpoint=str(path)))
    assert plain.metrics["top1"] != result.metrics["top1"]
    assert evaluate(result.model, digits.test, digits.info, Runtime()) == result.metrics["top1"]


def test_class_order_is_mapped_and_a_teacher_near_chance_is_refused(digits, elsewhere, tmp_path):
    permutation = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 6, 4])  # output i is dataset class permutation[i]
    path = save(elsewhere, tmp_path / "shuffled.pth", permutation)
    names = [digits.classes[i] for i in permutation]
    norm = InputNorm(mean=(0.5,), std=(0.25,))
    with pytest.raises(TeacherRefused) as refused:
        load_pretrained(digits, TeacherSpec(arch=ARCH, checkpoint=str(path), input_norm=norm))
    message = str(refused.value)
    assert "near chance" in message and str(path) in message
    assert all(cause in message for cause in ("class order", "classes:", "input_norm", "layout"))
    mapped, source = load_pretrained(digits, TeacherSpec(arch=ARCH, checkpoint=str(path), input_norm=norm,
                                                         classes=tuple(names)))
    assert abs(mapped.metrics["top1"] - direct_top1(elsewhere, digits, 0.5, 0.25)) <= 1 / len(digits.test)
    assert source["classes"] == names
    # The same order from a file: one name per line, or a JSON list.
    for file, text in (("classes.txt", "\n".join(names) + "\n"), ("classes.json", json.dumps(names))):
        (tmp_path / file).write_text(text)
        spec = TeacherSpec(arch=ARCH, checkpoint=str(path), input_norm=norm, classes=str(tmp_path / file))
        assert list(spec.validate()) == [] and spec.identity()["classes"] == names
        assert load_pretrained(digits, spec)[0].metrics["top1"] == mapped.metrics["top1"]


STUDY = """\
name: {name}
dataset: {{name: digits}}
teachers:
  - arch: convnet2-w8
    checkpoint: {path}
    input_norm: {{mean: [0.5], std: [0.25]}}
methods:
  - {{name: random_real, ipc: 2}}
  - {{name: herding, ipc: 2}}
protocol:
  preset: rd3
  overrides: {{student: convnet2-w8, epochs: 2, augment: {{flip: false}}}}
factors:
  protocol.labels.mode: [hard, epochwise]
"""


def test_a_study_loads_the_checkpoint_trains_no_teacher_and_records_its_digest(elsewhere, tmp_path):
    (tmp_path / "weights").mkdir()
    ckpt = save(elsewhere, tmp_path / "weights" / "teacher.pth")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    study = tmp_path / "ckpt.yaml"
    study.write_text(STUDY.format(name="ckpt", path=ckpt))
    out = tmp_path / "out"
    dry = run_cli("run", str(study), "--out", str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "teacher      1 to run,    0 cached  (1 to load from their weights, 0 to train)" in dry.stdout
    proc = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [teacher] = (out / "artifacts" / "teacher").iterdir()
    meta = json.loads((teacher / "manifest.json").read_text())["meta"]
    assert meta["source"]["sha256"] == digest and meta["source"]["path"] == str(ckpt)
    assert meta["source"]["layout"] == "ours" and meta["source"]["kind"] == "checkpoint"
    assert "train_s" not in meta["timing"] and set(meta["timing"]) == {"load_s", "eval_s"}  # nothing trained
    assert abs(meta["metrics"]["top1"] - direct_top1(elsewhere, load_dataset("digits"), 0.5, 0.25)) < 0.003
    with sqlite3.connect(out / "rd3.sqlite") as con:
        [(config,)] = con.execute("SELECT config FROM artifact WHERE stage = 'teacher'").fetchall()
        cells = [json.loads(c) for (c,) in con.execute("SELECT config FROM cell")]
    assert json.loads(config)["source"]["sha256"] == digest and json.loads(config)["teacher"]["checkpoint"] == str(ckpt)
    assert len(cells) == 4 and all(c["teachers"] == [] or c["teachers"][0]["source"]["sha256"] == digest
                                   for c in cells)
    assert all(str(tmp_path) not in json.dumps(c) for c in cells)  # the cells never record the path
    again = run_cli("run", str(study), "--out", str(out), "--dry-run")
    assert "0 to run" in again.stdout and "4 already done" in again.stdout

    # The same file elsewhere is the same teacher: its cells are done, and new
    # cells that need it find it in the store.
    moved = tmp_path / "moved.pth"
    shutil.move(ckpt, moved)
    study.write_text(STUDY.format(name="ckpt", path=moved).replace("[hard, epochwise]", "[hard, epochwise, static]"))
    proc = run_cli("run", str(study), "--out", str(out), "--dry-run")
    assert proc.returncode == 0 and "4 already done, 2 to run" in proc.stdout, proc.stdout + proc.stderr
    assert "teacher      0 to run,    1 cached\n" in proc.stdout


def test_cells_are_keyed_by_content_not_path(elsewhere, tmp_path):
    a = save(elsewhere, tmp_path / "a.pth")
    shutil.copy(a, tmp_path / "b.pth")
    save(train_elsewhere(load_dataset("digits"), 0.5, 0.25, seed=1), tmp_path / "c.pth")
    keys = {}
    for name in "abc":
        study = tmp_path / f"{name}.yaml"
        study.write_text(STUDY.format(name=name, path=tmp_path / f"{name}.pth"))
        keys[name] = sorted(c.key for c in expand(load_study(study)) if c.teachers)  # cells that use it
    assert len(keys["a"]) == 3 and keys["a"] == keys["b"] and not set(keys["a"]) & set(keys["c"])


def test_a_factor_compares_two_checkpoints(elsewhere, tmp_path):
    save(elsewhere, tmp_path / "a.pth")
    save(train_elsewhere(load_dataset("digits"), 0.5, 0.25, seed=1), tmp_path / "c.pth")
    study = tmp_path / "two.yaml"
    study.write_text(STUDY.format(name="two", path=tmp_path / "a.pth").replace(
        "protocol.labels.mode: [hard, epochwise]", f"teacher.checkpoint: [{tmp_path / 'a.pth'}, {tmp_path / 'c.pth'}]"))
    cells = expand(load_study(study))  # rd3's epoch-wise labels: every cell uses the teacher
    digests = {c.config["teachers"][0]["source"]["sha256"] for c in cells}
    assert len(cells) == 4 and len(digests) == 2


def test_a_dataset_class_missing_from_classes_is_a_validation_error(elsewhere, tmp_path, capsys):
    path = save(elsewhere, tmp_path / "t.pth")
    study = tmp_path / "s.yaml"
    text = STUDY.format(name="s", path=path).replace(
        "    input_norm:", "    classes: ['0', '1', '2', '3', '4', '5', '6', '7', '8', 'nine']\n    input_norm:")
    study.write_text(text)
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert f"{study}:6: teachers[0].classes: the dataset's classes '9' are not among the 10 listed" in err


def test_a_run_whose_teacher_is_near_chance_fails_it_with_the_likely_causes(elsewhere, tmp_path, capsys):
    path = save(elsewhere, tmp_path / "t.pth", torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 6, 4]))
    study = tmp_path / "s.yaml"
    study.write_text(STUDY.format(name="s", path=path))
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--executor", "local"]) == 1
    err = capsys.readouterr().err
    assert "TeacherRefused" in err and "near chance" in err and "class order" in err
