"""Checkpoints of the long loops (rd3core.checkpoint): a run stopped right after
a checkpoint and resumed in a fresh call ends bit-identical to a run that was
never stopped, for teacher training, post-evaluation and SRe2L recovery; a
checkpoint that is never due is never written; one made under another thread
count is not resumed from."""
import pytest
import torch

from rd3core import pipeline
from rd3core.artifacts import ArtifactStore
from rd3core.checkpoint import Checkpoint, decode
from rd3core.config import build
from rd3core.data import load_dataset
from rd3core.pipeline import TeacherSpec, posteval, train_teacher
from rd3core.protocol import Protocol
from rd3core.synth import METHODS, synthesize

EVERY_BOUNDARY = 1e-9  # seconds: due at every epoch / iteration


class Killed(Exception):
    """Stands for SIGKILL: the process is gone right after its n-th checkpoint."""


class MemoryStore:
    def __init__(self, kill_after: int | None = None):
        self.data: bytes | None = None
        self.writes = 0
        self.kill_after = kill_after

    def read(self) -> bytes | None:
        return self.data

    def write(self, data) -> None:
        self.data = bytes(data)
        self.writes += 1
        if self.writes == self.kill_after:
            raise Killed


def killed_then_resumed(run, kill_after: int):
    """``run(checkpoint)`` stopped after its ``kill_after``-th save, then called
    afresh with the same store; returns (result, where it resumed from)."""
    store = MemoryStore(kill_after)
    with pytest.raises(Killed):
        run(Checkpoint(store, EVERY_BOUNDARY))
    resumed = Checkpoint(store, EVERY_BOUNDARY)
    result = run(resumed)
    return result, resumed.resumed_at


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def without_times(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits")


@pytest.fixture(scope="module")
def bn_teacher(digits):
    spec = build(TeacherSpec, {"arch": "convnet2-w8-bn", "epochs": 2, "batch_size": 128,
                               "augment": {"crop": "pad", "padding": 2, "flip": False, "mix": "none"}})
    return train_teacher(digits, spec).model.eval()


TEACHER = {"arch": "convnet2-w8-bn", "epochs": 4, "batch_size": 128,
           "augment": {"crop": "pad", "padding": 2, "flip": True, "mix": "none"}}


@pytest.mark.parametrize("kill_after", [1, 3])
def test_teacher_training_resumes_bit_identical(digits, kill_after):
    spec = build(TeacherSpec, TEACHER)
    plain = train_teacher(digits, spec)
    resumed, at = killed_then_resumed(lambda ckpt: train_teacher(digits, spec, checkpoint=ckpt), kill_after)
    assert at == f"epoch {kill_after}"
    assert_same_tensors(plain.model.state_dict(), resumed.model.state_dict())
    assert plain.metrics == resumed.metrics
    assert without_times(plain.epochs) == without_times(resumed.epochs)


def test_posteval_resumes_bit_identical(digits, bn_teacher, monkeypatch):
    # Soft labels from the teacher on the fly, CutMix and flips drawn per epoch,
    # an EMA and a momentum optimiser: every piece of state the loop carries.
    protocol = build(Protocol, {"student": "convnet2-w8", "epochs": 4, "batch_size": 16, "ema_decay": 0.9,
                                "augment": {"flip": True, "mix": "cutmix"}, "labels": {"mode": "epochwise"},
                                "loss": {"temperature": 4}, "eval": {"interval": 2}})
    distilled = synthesize("random_real", digits, None, build(METHODS.get("random_real").params, {"ipc": 4}), seed=0)
    models = []
    real_train = pipeline.train

    def train_keeping_the_model(*args, **kwargs):
        result = real_train(*args, **kwargs)
        models.append(result.model)
        return result

    monkeypatch.setattr(pipeline, "train", train_keeping_the_model)

    def run(checkpoint=None):
        return posteval(distilled, digits, protocol, {"convnet2-w8-bn": bn_teacher}, seed=1, checkpoint=checkpoint)

    plain = run()
    resumed, at = killed_then_resumed(run, kill_after=2)
    assert at == "epoch 2"
    assert len(models) == 2  # the killed run returned no model
    assert_same_tensors(models[0].state_dict(), models[1].state_dict())
    assert plain["metrics"] == resumed["metrics"]
    assert without_times(plain["epochs"]) == without_times(resumed["epochs"])


@pytest.mark.parametrize("method, kill_after, at", [("sre2l", 3, "batch 1 iteration 3"),
                                                    ("cda", 8, "batch 2 iteration 2")])
def test_synthesis_resumes_bit_identical(digits, bn_teacher, method, kill_after, at):
    # Two batches of 10 images, 6 iterations each, crops and jitter drawn from
    # the batch's own generator.
    params = build(METHODS.get(method).params, {"ipc": 2, "iterations": 6, "batch_size": 10, "crop": "rrc",
                                                "jitter": 2, "precision": "float32"})

    def run(checkpoint=None):
        return synthesize(method, digits, bn_teacher, params, seed=0, checkpoint=checkpoint)

    plain = run()
    resumed, where = killed_then_resumed(run, kill_after)
    assert where == at
    assert torch.equal(plain.images, resumed.images) and torch.equal(plain.labels, resumed.labels)
    assert plain.meta["bn_loss_final"] == resumed.meta["bn_loss_final"]


@pytest.mark.parametrize("interval", [None, 0, 3600.0])
def test_a_checkpoint_never_due_is_never_written(digits, interval):
    store = MemoryStore()
    train_teacher(digits, build(TeacherSpec, {**TEACHER, "epochs": 2}), checkpoint=Checkpoint(store, interval))
    assert store.writes == 0 and store.data is None


def test_a_checkpoint_made_under_another_thread_count_is_not_resumed(digits):
    spec = build(TeacherSpec, {**TEACHER, "epochs": 3})
    store = MemoryStore(kill_after=1)
    with pytest.raises(Killed):
        train_teacher(digits, spec, checkpoint=Checkpoint(store, EVERY_BOUNDARY))
    torch.set_num_threads(2)
    try:
        other = Checkpoint(store, None)
        assert other.load() is None
        assert other.resumed_at is None and "threads" in other.ignored
    finally:
        torch.set_num_threads(1)


def test_the_store_file_is_replaced_atomically_and_removed(tmp_path):
    store = ArtifactStore(tmp_path)
    slot = store.checkpoint("teacher", "k1")
    assert slot.read() is None
    hook = Checkpoint(slot, EVERY_BOUNDARY)
    hook.save({"epoch": 1, "w": torch.arange(3)}, "epoch 1")
    hook.save({"epoch": 2, "w": torch.arange(4)}, "epoch 2")
    assert decode(slot.read())["at"] == "epoch 2"
    [info] = store.checkpoints()
    assert (info.stage, info.key, info.bytes) == ("teacher", "k1", slot.path.stat().st_size)
    assert list(store.leftovers()) == [] and list(store.entries()) == []  # not an artifact, no temporary left
    state = Checkpoint(slot, None).load()
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.arange(4))
    assert slot.remove() and list(store.checkpoints()) == [] and not slot.remove()


def test_a_job_resumes_its_stage_from_the_store_and_removes_the_checkpoint(tmp_path, monkeypatch):
    """orchestrator.execution.jobs.run_node: the teacher job dies right after its
    second checkpoint; the rerun reports where it resumed, publishes the same
    artifact as a job never stopped, and leaves no checkpoint behind."""
    from conftest import TINY_STUDY
    from orchestrator.execution import jobs
    from orchestrator.execution.plan import build_plan
    from orchestrator.study.expand import expand
    from orchestrator.study.spec import load_study
    from rd3core.artifacts import CheckpointFile

    path = tmp_path / "s.yaml"
    path.write_text(TINY_STUDY.format(name="s").replace("epochs: 6", "epochs: 4"))
    [node] = [n for n in build_plan(expand(load_study(path)), ArtifactStore(tmp_path / "none")).nodes.values()
              if n.stage == "teacher"]
    plain, resumed = ArtifactStore(tmp_path / "plain"), ArtifactStore(tmp_path / "resumed")
    assert jobs.run_node("teacher", node.key, node.payload, str(plain.root), 1)["resumed"] == []

    write = CheckpointFile.write
    writes = []

    def write_then_die_at_the_second(self, data):
        write(self, data)
        writes.append(self.path)
        if len(writes) == 2:
            raise Killed

    monkeypatch.setattr(CheckpointFile, "write", write_then_die_at_the_second)
    with pytest.raises(Killed):
        jobs.run_node("teacher", node.key, node.payload, str(resumed.root), 1, checkpoint_every=EVERY_BOUNDARY)
    assert [(c.stage, c.key) for c in resumed.checkpoints()] == [("teacher", node.key)]
    monkeypatch.setattr(CheckpointFile, "write", write)
    out = jobs.run_node("teacher", node.key, node.payload, str(resumed.root), 1, checkpoint_every=EVERY_BOUNDARY)
    assert out["resumed"] == [{"stage": "teacher", "key": node.key, "at": "epoch 2"}]
    assert list(resumed.checkpoints()) == []
    assert_same_tensors(plain.load("teacher", node.key)["state_dict"], resumed.load("teacher", node.key)["state_dict"])


def test_a_resumed_loop_reports_progress_from_where_it_resumed(digits, bn_teacher):
    """The first progress call of a resumed run is its resume point, so the ETA
    is timed over what is left, not over the whole run."""
    spec = build(TeacherSpec, TEACHER)
    store = MemoryStore(kill_after=2)
    with pytest.raises(Killed):
        train_teacher(digits, spec, checkpoint=Checkpoint(store, EVERY_BOUNDARY))
    calls = []
    train_teacher(digits, spec, checkpoint=Checkpoint(store, EVERY_BOUNDARY),
                  progress=lambda done, total, unit, **_: calls.append((done, total, unit)))
    assert calls == [(2, 4, "epoch"), (3, 4, "epoch"), (4, 4, "epoch")]

    params = build(METHODS.get("sre2l").params, {"ipc": 2, "iterations": 3, "batch_size": 10})
    store = MemoryStore(kill_after=4)  # batch 2 (of 2), iteration 1 (of 3)
    with pytest.raises(Killed):
        synthesize("sre2l", digits, bn_teacher, params, 0, checkpoint=Checkpoint(store, EVERY_BOUNDARY))
    calls = []
    synthesize("sre2l", digits, bn_teacher, params, 0, checkpoint=Checkpoint(store, EVERY_BOUNDARY),
               progress=lambda done, total, unit, **_: calls.append(done))
    assert calls == [4, 5, 6]
