"""In-job checkpoints with real Ray workers and real signals: the worker of the
teacher's training, then that of the SRe2L synthesis, then that of the
post-evaluation, is SIGKILLed after the job's first checkpoint; each retry
resumes from the checkpoint (the log names the epoch or iteration), and the
teacher and synthesis artifacts and the cell's result equal those of a run that
was never interrupted, bit for bit."""
import os
import re
import signal

import pytest
import torch

from procs import descendants, finish, job_worker, kill_all, rows, start_cli, wait_for
from rd3core.artifacts import ArtifactStore

STUDY = """\
name: resumable
dataset: {{name: digits}}
teachers:
  - arch: convnet3-w16-bn
    epochs: 40
    augment: {{crop: pad, padding: 2, flip: true, mix: none}}
methods:
  - {{name: sre2l, ipc: 5, iterations: 600}}
protocol:
  preset: rd3
  overrides: {{student: convnet3-w16, epochs: 300, augment: {{flip: true}}, labels: {{mode: epochwise}}}}
seeds: [0]
resources:
  max_cpus: 1  # one thread for every job in both runs (the teacher is widened to the node's CPUs)
  checkpoint_every: {every}
"""


STAGES = ("teacher", "synth", "posteval")


def results(db):
    """The cell's metrics that the computation determines (not its timings)."""
    return {name: value for name, value in rows(db, "SELECT name, value FROM metric")
            if not name.startswith(("time_", "synth_wall")) and not name.endswith("_hours")}


def tensors(state):
    """A teacher's weights, a distilled set's images and labels."""
    return state["state_dict"] if "state_dict" in state else {k: state[k] for k in ("images", "labels")}


def checkpoint(out, stage):
    return next((out / "artifacts" / ".checkpoints" / stage).glob("*.pt"), None)


@pytest.mark.slow
def test_killed_jobs_resume_from_their_checkpoints_bit_identical(tiny_study, tmp_path):
    plain_out, out = tmp_path / "plain", tmp_path / "out"
    plain = tiny_study("plain", STUDY.format(every="off"))
    code, stdout, stderr = finish(start_cli("run", str(plain), "--out", str(plain_out), "--executor", "local"))
    assert code == 0, stdout + stderr
    assert not (plain_out / "artifacts" / ".checkpoints").exists()  # off: nothing written

    study = tiny_study("resumable", STUDY.format(every=0.5))
    started = []
    try:
        driver = start_cli("run", str(study), "--out", str(out), "--num-cpus", "1", "--max-retries", "1")
        for stage in STAGES:
            wait_for(lambda: checkpoint(out, stage), 240, f"the {stage} job's first checkpoint", driver)
            victim = job_worker(driver, stage)
            assert victim is not None, f"the {stage} job ended before it could be killed"
            started += descendants(driver.pid)
            os.kill(victim, signal.SIGKILL)
        code, stdout, stderr = finish(driver)
    finally:
        kill_all(started)
    assert code == 0, stdout + stderr
    assert stdout.count("WorkerCrashedError") == 3 and "transient: retrying (run 2 of at most 2)" in stdout
    for stage, where in zip(STAGES, ("epoch", "batch 1 iteration", "epoch")):
        match = re.search(rf"resumed {stage} \w{{10}} from {where} (\d+)", stdout)
        assert match and int(match.group(1)) >= 1, stdout
    assert not list((out / "artifacts" / ".checkpoints").glob("*/*"))  # removed once published

    stores = [ArtifactStore(o / "artifacts") for o in (plain_out, out)]
    for stage in ("teacher", "synth"):
        [ours], [theirs] = ([i for i in s.entries(verify=True) if i.stage == stage] for s in stores)
        assert ours.key == theirs.key
        a, b = (tensors(s.load(stage, ours.key)) for s in stores)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    expected = results(plain_out / "rd3.sqlite")
    assert "top1" in expected and results(out / "rd3.sqlite") == expected
