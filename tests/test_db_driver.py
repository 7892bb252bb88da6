"""The driver's records: a real (tiny) study run writes an attempt per cell,
its provenance, the artifacts produced and used, and typed factors; failures
keep their error type and traceback. On SQLite and PostgreSQL."""
import hashlib
import platform
import subprocess
from pathlib import Path

import torch
from sqlalchemy import select

from db.models import Artifact, ArtifactUse, Attempt, AttemptStatus, Cell, EpochMetric, Metric, Provenance, Study
from db.queries import results_frame
from db.session import make_engine, session_scope
from db_helpers import cell_dicts, make_study
from orchestrator.cli import main
from orchestrator.execution.plan import Node, Plan
from orchestrator.execution.failures import Failure, upstream
from orchestrator.execution.recorder import Announcing, Recorder, checkout_state
from orchestrator.execution.runner import Outcome
from rd3core.artifacts import ArtifactStore
from rd3core.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]

MICRO = """\
name: micro
dataset: {name: digits}
teachers:
  - arch: convnet3-w16
    epochs: 2
    augment: {crop: pad, padding: 2, flip: false, mix: none}
methods:
  - {name: random_real, ipc: 2}
protocol:
  preset: rd3
  overrides:
    student: convnet3-w16
    epochs: 2
    augment: {flip: false}
factors:
  protocol.labels.mode: [hard, epochwise]
  protocol.epochs: [2, 3]
seeds: [0]
"""


def test_a_run_records_attempts_provenance_artifacts(db_url, tmp_path, capsys):
    study = tmp_path / "micro.yaml"
    study.write_text(MICRO)
    out = tmp_path / "out"
    assert main(["run", str(study), "--db", db_url, "--out", str(out), "--executor", "local"]) == 0
    engine = make_engine(db_url)
    frame = results_frame(engine, "micro")
    assert len(frame) == 4 and frame["protocol.epochs"].dtype == "int64"
    git = checkout_state()
    fingerprint = load_dataset("digits").record["fingerprint"]
    store = ArtifactStore(out / "artifacts")
    with session_scope(engine) as s:
        attempts = list(s.scalars(select(Attempt)))
        assert len(attempts) == 4 and {a.status for a in attempts} == {AttemptStatus.done}
        for a in attempts:
            assert a.number == 1 and a.host and a.device == "cpu" and a.started_at <= a.ended_at
            prov = s.get(Provenance, a.id)
            assert prov.seed == 0 and prov.dataset_fingerprint == fingerprint
            assert prov.python == platform.python_version() and prov.torch == torch.__version__
            assert prov.project_version and prov.ray and prov.timm and prov.torchvision
            assert (prov.git_commit, prov.git_dirty) == (git["git_commit"], git["git_dirty"])
            assert prov.env["pid"] and prov.env["runtime"]["device"] == "cpu"
        artifacts = {a.stage: a for a in s.scalars(select(Artifact))}
        assert set(artifacts) == {"teacher", "synth"}
        for art in artifacts.values():
            info = store.info(art.stage, art.key)
            assert (art.bytes, art.sha256, Path(art.path)) == (info.bytes, info.sha256, info.path.resolve())
        assert artifacts["teacher"].config["teacher"]["arch"] == "convnet3-w16"
        uses = {}
        for use in s.scalars(select(ArtifactUse)):
            uses.setdefault(use.attempt_id, set()).add(s.get(Artifact, use.artifact_id).stage)
        modes = {a.id: s.get(Cell, a.cell_id).factors["protocol.labels.mode"] for a in attempts}
    assert all(uses[a] == ({"synth"} if modes[a] == "hard" else {"synth", "teacher"}) for a in uses)
    assert len(uses) == 4
    check_study_metrics_epochs(engine, attempts)
    if git["git_commit"]:  # a git checkout: the recorded commit is the real one
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert git["git_commit"] == head.stdout.strip()
    # A rerun runs nothing and adds no attempt.
    assert main(["run", str(study), "--db", db_url, "--out", str(out), "--executor", "local"]) == 0
    assert "0 to run" in capsys.readouterr().out
    with session_scope(engine) as s:
        assert len(list(s.scalars(select(Attempt)))) == 4
    engine.dispose()


def check_study_metrics_epochs(engine, attempts):
    """The study row, the synth cost metrics and the per-epoch history of the run above."""
    with session_scope(engine) as s:
        row = s.scalar(select(Study).where(Study.name == "micro"))
        assert row.spec_text == MICRO and row.spec_hash == hashlib.sha256(MICRO.encode()).hexdigest()
        # A clean finish stamps the study, after its last result.
        assert row.finished_at is not None and row.finished_at >= max(a.ended_at for a in attempts)
        assert row.finished_at >= row.created_at
        for cell in s.scalars(select(Cell)):
            metrics = {m.name: m.number for m in s.scalars(select(Metric).where(Metric.cell_id == cell.id))}
            # random_real, ipc 2 on digits: 20 float32 images of 1x16x16, int64 labels.
            assert {k: metrics[k] for k in ("synth_images", "synth_images_bytes", "synth_labels_bytes",
                                            "synth_bytes")} == {"synth_images": 20, "synth_images_bytes": 20 * 256 * 4,
                                                                "synth_labels_bytes": 20 * 8, "synth_bytes": 20640}
            assert 0 < metrics["synth_wall_s"] < 60
            epochs = list(s.scalars(select(EpochMetric).where(EpochMetric.cell_id == cell.id)
                                    .order_by(EpochMetric.epoch)))
            assert [e.epoch for e in epochs] == list(range(1, cell.factors["protocol.epochs"] + 1))
            temperature = cell.config["protocol"]["loss"]["temperature"]
            assert [e.temperature for e in epochs] == [temperature] * len(epochs) and temperature == 20.0
            assert all(0.0 <= e.train_top1 <= 1.0 for e in epochs)
            assert epochs[-1].test_top1 == metrics["top1"]


def test_failures_keep_type_and_traceback(db_engine, tmp_path):
    cells = cell_dicts({"x": [1, 2, 3]}, seeds=[4])
    ids = make_study(db_engine, "fails", cells)
    keys = [c["cell_key"] for c in cells]
    plan = Plan()
    synth = plan.add(Node("synth", "s1", (), {"method": {"name": "random_real"}}))
    for key in keys:
        plan.add(Node("posteval", key, (synth.id,), {}))
    recorder = Recorder(db_engine, ArtifactStore(tmp_path / "store"), plan, ids, {k: 4 for k in keys})
    submitted = []
    queue = type("Queue", (), {"submit": lambda self, node, resources: submitted.append(node)})()
    executor = Announcing(queue, recorder.submitted)
    executor.submit(plan.nodes[f"posteval:{keys[0]}"], None)
    executor.submit(plan.nodes[f"posteval:{keys[1]}"], None)
    assert len(submitted) == 2
    trace = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"
    recorder.cell_failed(Outcome(plan.nodes[f"posteval:{keys[0]}"],
                                 failure=Failure("RuntimeError", "CUDA out of memory", trace)))
    recorder.cell_failed(Outcome(plan.nodes[f"posteval:{keys[2]}"], failure=upstream(
        "synth", "s1", Failure("ValueError", "bad", "Traceback ...\nValueError: bad"))))
    recorder.close("interrupted by the user")
    with session_scope(db_engine) as s:
        by_cell = {s.get(Cell, a.cell_id).cell_key: a for a in s.scalars(select(Attempt))}
        first, second, third = (by_cell[k] for k in keys)
        assert (first.status, first.error_type, first.error_message) == (
            AttemptStatus.failed, "RuntimeError", "CUDA out of memory")
        assert first.traceback.startswith("Traceback") and first.traceback.endswith("CUDA out of memory")
        assert (second.status, second.error_type) == (AttemptStatus.failed, "Interrupted")
        assert (third.status, third.error_type) == (AttemptStatus.failed, "UpstreamFailed")
        assert third.error_message == "synth s1 failed: ValueError: bad"
        assert s.get(Provenance, first.id).seed == 4
        assert {c.status.value for c in s.scalars(select(Cell))} == {"failed"}


def test_the_recorder_replaces_a_connection_dropped_between_results(db_engine, db_url, tmp_path, monkeypatch):
    """Jobs run for hours; the server or the network may drop the driver's idle
    connection meanwhile. The next write takes a live one (PostgreSQL: the
    server really ends the recorder's session here)."""
    cells = cell_dicts({"x": [1, 2]}, seeds=[0])
    ids = make_study(db_engine, "dropped", cells)
    keys = [c["cell_key"] for c in cells]
    plan = Plan()
    for key in keys:
        plan.add(Node("posteval", key, (), {}))
    recorder = Recorder(db_engine, ArtifactStore(tmp_path / "store"), plan, ids, {k: 0 for k in keys})
    recorder.submitted(plan.nodes[f"posteval:{keys[0]}"])
    if db_url.startswith("postgresql"):
        pid = recorder.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        recorder.conn.rollback()
        admin = make_engine(db_url)
        with admin.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar() is True
        admin.dispose()
    monkeypatch.setattr("orchestrator.execution.recorder.IDLE_RECHECK_S", 0.0)  # as after a long job
    recorder.cell_failed(Outcome(plan.nodes[f"posteval:{keys[0]}"], failure=Failure("RuntimeError", "x", "tb")))
    recorder.submitted(plan.nodes[f"posteval:{keys[1]}"])
    recorder.close("stopped")
    with session_scope(db_engine) as s:
        assert sorted((a.status.value, a.error_type) for a in s.scalars(select(Attempt))) == [
            ("failed", "Interrupted"), ("failed", "RuntimeError")]
