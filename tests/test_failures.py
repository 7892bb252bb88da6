"""Failures: classification (orchestrator.execution.failures), retries in the driver loop,
and real faults injected into a real study (jobs that raise, diverge to NaN,
or go over their memory limit) that are recorded with their tracebacks while
the study goes on; exit status 1, the summary and the retry command; a plain
rerun skips deterministic failures and --retry-failed runs them again."""
import textwrap
from collections import Counter

import pytest
import ray.exceptions
import torch

from conftest import run_cli
from orchestrator.execution import failures
from orchestrator.execution.failures import Failure
from orchestrator.execution.plan import Node, Plan
from orchestrator.study.resources import Resources
from orchestrator.execution.runner import Outcome, execute
from procs import attempts, rows
from rd3core.loop import NonFiniteLoss


@pytest.mark.parametrize("error_type, message, kind", [
    ("ray.exceptions.WorkerCrashedError", "The worker died unexpectedly", "transient"),
    ("ray.exceptions.NodeDiedError", "", "transient"),
    ("ray.exceptions.OutOfMemoryError", "Task was killed due to the node running low on memory.", "transient"),
    ("WorkerLost", "the posteval job was lost: no heartbeat for 61 s", "transient"),
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", "transient"),
    ("RuntimeError", "CUDA error: out of memory", "transient"),
    ("rd3core.loop.NonFiniteLoss", "loss became nan in epoch 3", "deterministic"),
    ("MemoryError", "the posteval job went over its memory limit (resources.memory: 1024 MiB)", "deterministic"),
    ("ValueError", "class 0 has 134 training images, fewer than ipc=500", "deterministic"),
    ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied", "deterministic"),
    ("Interrupted", "the run was stopped", "stopped"),
    ("DriverStopped", "the driver stopped before this attempt finished", "stopped"),
    ("UpstreamFailed", "synth 72fb2f93b2 failed: ray.exceptions.WorkerCrashedError: died: badly", "transient"),
    ("UpstreamFailed", "synth 72fb2f93b2 failed: ValueError: class 0 failed: x", "deterministic"),
    ("UpstreamFailed", "teacher 1a failed: UpstreamFailed: x 2b failed: WorkerLost: silent", "transient"),
    (None, None, "deterministic"),
])
def test_classification(error_type, message, kind):
    assert failures.kind(error_type, message) == kind
    assert failures.is_transient(error_type, message) == (kind == "transient")
    assert failures.rerun_by_default(error_type, message) == (kind != "deterministic")


def test_exceptions_are_named_as_stored_and_classified_the_same_way():
    cases = {NonFiniteLoss("loss became inf in epoch 1"): ("rd3core.loop.NonFiniteLoss", "deterministic"),
             ValueError("bad"): ("ValueError", "deterministic"),
             ray.exceptions.WorkerCrashedError(): ("ray.exceptions.WorkerCrashedError", "transient"),
             ray.exceptions.NodeDiedError("gone"): ("ray.exceptions.NodeDiedError", "transient"),
             torch.OutOfMemoryError("CUDA out of memory. Tried"): ("torch.OutOfMemoryError", "transient")}
    for exc, (name, kind) in cases.items():
        failure = failures.from_exception(exc, "tb")
        assert (failure.type, failure.kind) == (name, kind)
        # What a later run reads back from the attempt row gives the same answer.
        assert failures.kind(failure.type, failure.message) == kind
    upstream = failures.upstream("synth", "0123456789abcdef", failures.from_exception(ray.exceptions.NodeDiedError("x")))
    assert upstream.type == "UpstreamFailed" and upstream.transient
    assert upstream.message.startswith("synth 0123456789 failed: ray.exceptions.NodeDiedError")


def test_every_listed_ray_failure_exists_in_this_ray():
    for name in failures.TRANSIENT - {failures.WORKER_LOST}:
        module, _, cls = name.rpartition(".")
        assert module == "ray.exceptions" and issubclass(getattr(ray.exceptions, cls), ray.exceptions.RayError)


class Scripted:
    """An executor whose jobs fail as scripted: node id -> failures to return, in order."""

    def __init__(self, script: dict[str, list[Failure]]):
        self.script, self.queue, self.runs = script, [], Counter()

    def submit(self, node: Node, resources) -> None:
        self.queue.append(node)

    def inflight(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        node = self.queue.pop(0)
        self.runs[node.id] += 1
        script = self.script.get(node.id, [])
        if script:
            return Outcome(node, failure=script.pop(0))
        return Outcome(node, {"wall_s": 0.0})


def _plan() -> Plan:
    plan = Plan()
    synth = plan.add(Node("synth", "s", (), {}))
    for key in ("a", "b"):
        plan.add(Node("posteval", key, (synth.id,), {}))
    return plan


CRASH = Failure("ray.exceptions.WorkerCrashedError", "died")
NAN = Failure("rd3core.loop.NonFiniteLoss", "loss became nan in epoch 2")


@pytest.mark.parametrize("max_retries, a_runs, a_ok", [(0, 1, False), (1, 2, False), (2, 3, True), (5, 3, True)])
def test_transient_failures_are_retried_up_to_max_retries_deterministic_never(max_retries, a_runs, a_ok):
    executor = Scripted({"posteval:a": [CRASH, CRASH], "posteval:b": [NAN, NAN]})
    seen = []
    execute(_plan(), executor, Resources(), seen.append, max_retries=max_retries)
    assert executor.runs["posteval:a"] == a_runs and executor.runs["posteval:b"] == 1
    final = {o.node.id: o for o in seen if not o.retrying}
    assert (final["posteval:a"].failure is None) == a_ok
    assert final["posteval:b"].failure == NAN
    retried = [o for o in seen if o.retrying]
    assert [o.tries for o in retried] == list(range(1, min(max_retries, 2) + 1))
    assert all(o.node.id == "posteval:a" and o.failure == CRASH for o in retried)


def test_a_failed_upstream_job_fails_its_cells_with_its_own_kind():
    for failure, runs in ((CRASH, 2), (NAN, 1)):
        executor = Scripted({"synth:s": [failure, failure]})
        seen = []
        execute(_plan(), executor, Resources(), seen.append, max_retries=1)
        assert executor.runs == Counter({"synth:s": runs})  # the cells never ran
        cells = [o for o in seen if o.node.stage == "posteval"]
        assert len(cells) == 2 and all(o.failure.type == "UpstreamFailed" for o in cells)
        assert all(o.failure.transient == failure.transient and str(failure) in o.failure.message for o in cells)


FAULTS = """\
name: faults
dataset: {name: digits}
methods:
  - {name: random_real, ipc: 2}
  - {name: random_real, label: too_many, ipc: 500}   # digits has ~140 per class: the synth job raises
protocol:
  preset: rd3
  # Decoupled weight decay at lr 1000 scales the weights by (1 - lr * wd) = -9999 a step:
  # they overflow within the 30 steps of batches of 2 (an lr alone is bounded too low to
  # diverge AdamW).
  overrides: {student: convnet3-w16, epochs: 3, augment: {flip: false}, labels: {mode: hard}, optim: {weight_decay: 10}, batch_size: 2}
design:
  kind: cells
  cells:
    - {method: random_real, protocol.optim.lr: 0.01, protocol.student: convnet3-w16}     # fine
    - {method: random_real, protocol.optim.lr: 1000.0, protocol.student: convnet3-w16}   # diverges
    - {method: random_real, protocol.optim.lr: 0.01, protocol.student: convnet3-w4096}   # 2.4 GB of weights
    - {method: too_many, protocol.optim.lr: 0.01, protocol.student: convnet3-w16}
resources:
  posteval: {memory: 1GiB}
"""


def _by_factors(db):
    found = {}
    for key, method, lr, student in rows(db, "SELECT cell_key, json_extract(factors, '$.method'), "
                                             "json_extract(factors, '$.\"protocol.optim.lr\"'), "
                                             "json_extract(factors, '$.\"protocol.student\"') FROM cell"):
        name = ("raises" if method == "too_many" else "nan" if lr > 1 else
                "memory" if student.endswith("4096") else "fine")
        found[name] = key
    return found


@pytest.mark.slow
def test_faults_are_recorded_and_the_study_goes_on(tiny_study, tmp_path):
    study, out = tiny_study("faults", textwrap.dedent(FAULTS)), tmp_path / "out"
    db = out / "rd3.sqlite"
    proc = run_cli("run", str(study), "--out", str(out), "--num-cpus", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cells = _by_factors(db)
    runs = attempts(db)
    assert runs[cells["fine"]] == [(1, "done", None)]
    assert runs[cells["nan"]] == [(1, "failed", "rd3core.loop.NonFiniteLoss")]
    assert runs[cells["memory"]] == [(1, "failed", "MemoryError")]
    assert runs[cells["raises"]] == [(1, "failed", "UpstreamFailed")]  # deterministic: not retried
    detail = {k: (m, tb) for k, m, tb in rows(db, "SELECT c.cell_key, a.error_message, a.traceback FROM attempt a "
                                                  "JOIN cell c ON c.id = a.cell_id WHERE a.status = 'failed'")}
    message, trace = detail[cells["nan"]]
    assert message.startswith("loss became nan") or message.startswith("loss became inf")
    assert "NonFiniteLoss" in trace and "rd3core/loop.py" in trace
    message, trace = detail[cells["memory"]]
    assert "went over its memory limit (resources.memory: 1024 MiB)" in message
    assert "can't allocate memory" in trace
    message, trace = detail[cells["raises"]]
    assert "failed: ValueError: class" in message and "fewer than ipc=500" in trace and "random_real.py" in trace
    # The summary: each failed cell, then the exact command that runs them again.
    err = proc.stderr
    assert "3 cell(s) failed:" in err and "3 failed deterministically" in err
    assert f"python -m orchestrator run {study} --out {out} --num-cpus 2 --retry-failed" in err
    assert rows(db, "SELECT count(*) FROM metric WHERE name = 'top1'") == [(1,)]

    # The dry run counts as the run does: the deterministic failures are skipped.
    dry = run_cli("run", str(study), "--out", str(out), "--dry-run")
    assert dry.returncode == 0 and "1 already done, 3 failed before and skipped" in dry.stdout
    assert "0 to run (dry run" in dry.stdout
    # A plain rerun skips the deterministic failures: nothing runs, still exit 1.
    plain = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert plain.returncode == 1 and "1 already done, 3 failed before and skipped" in plain.stdout
    assert "0 to run" in plain.stdout and "failed before, skipped" in plain.stderr
    assert attempts(db) == runs
    # --retry-failed runs them again (in-process this time: the limit holds there too).
    again = run_cli("run", str(study), "--out", str(out), "--executor", "local", "--retry-failed")
    assert again.returncode == 1 and "3 to run" in again.stdout
    runs2 = attempts(db)
    for name in ("nan", "memory", "raises"):
        assert runs2[cells[name]] == runs[cells[name]] + [(2, "failed", runs[cells[name]][0][2])]
    assert runs2[cells["fine"]] == [(1, "done", None)]


def test_bad_retry_flags_are_refused(tiny_study, tmp_path):
    proc = run_cli("run", str(tiny_study("x")), "--out", str(tmp_path), "--max-retries", "-1")
    assert proc.returncode == 2 and "--max-retries" in proc.stderr and not (tmp_path / "rd3.sqlite").exists()
