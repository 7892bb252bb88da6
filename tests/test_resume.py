"""Crash and resume with real processes and real signals: the driver (with its
embedded Ray instance) is killed with SIGKILL, or stopped with SIGINT (Ctrl-C),
after at least one result was committed; the next `run` finishes the study with
exactly one result per cell, keeps what was committed, and no attempt is left
"running"."""
import signal
import time

import pytest

from conftest import run_cli
from procs import alive, assert_one_result_per_cell, attempts, descendants, finish, kill_all, rows, start_cli, title

STUDY = """\
name: {name}
dataset: {{name: digits}}
methods:
  - {{name: random_real, ipc: 5}}
protocol:
  preset: rd3
  overrides: {{student: convnet3-w16, augment: {{flip: false}}, labels: {{mode: hard}}}}
factors:
  protocol.epochs: [200, 201, 202]
seeds: [0, 1]
"""
CELLS = 6


def run_until_first_result(study, out):
    """Start a Ray run on one CPU (jobs one at a time) and return it once the
    first cell's result is committed, with the pids of everything it started."""
    driver = start_cli("run", str(study), "--out", str(out), "--num-cpus", "1")
    lines = []
    while True:
        line = driver.stdout.readline()
        if not line:
            raise AssertionError("the driver ended before any result:\n" + "".join(lines) + driver.stderr.read())
        lines.append(line)
        if "] done " in line:  # printed after the result's transaction committed
            return driver, descendants(driver.pid), lines


def committed(db):
    """cell key -> (top1, attempt id) of every stored result."""
    return {k: (v, a) for k, v, a in rows(db, "SELECT c.cell_key, m.value, m.attempt_id FROM metric m JOIN cell c "
                                              "ON c.id = m.cell_id WHERE m.name = 'top1'")}


def wait_gone(pids, timeout=60):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun(tiny_study, tmp_path):
    study, out = tiny_study("killed", STUDY.format(name="killed")), tmp_path / "out"
    db = out / "rd3.sqlite"
    driver, started, _ = run_until_first_result(study, out)
    # Ray's dashboard and runtime-env agents poll for their raylet and leave up to a minute after it.
    agents = [p for p in started if title(p).endswith("Agent")]
    try:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        # Ray's own processes and the workers running our jobs share the driver's fate.
        assert wait_gone([p for p in started if p not in agents], timeout=30) == []
    except BaseException:
        kill_all(started)
        raise
    before = committed(db)
    assert 1 <= len(before) < CELLS, "the kill must land mid-study"
    assert rows(db, "SELECT count(*) FROM attempt WHERE status = 'running'")[0][0] >= 1  # the jobs in flight

    # The rerun resumes (in-process: what is resumed is in the database and the store).
    again = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "left running by a stopped driver recorded as failed" in again.stdout
    assert f"{len(before)} already done, {CELLS - len(before)} to run" in again.stdout
    assert_one_result_per_cell(db, CELLS)
    after = committed(db)
    assert {k: after[k] for k in before} == before  # committed results kept as they were, not recomputed
    stopped = [a for runs in attempts(db).values() for a in runs if a[1] == "failed"]
    assert stopped and all(error == "DriverStopped" for _, _, error in stopped)
    kill_all(started)  # Ray's agents, if still polling


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_then_rerun(tiny_study, tmp_path):
    study, out = tiny_study("interrupted", STUDY.format(name="interrupted")), tmp_path / "out"
    db = out / "rd3.sqlite"
    driver, started, _ = run_until_first_result(study, out)
    try:
        driver.send_signal(signal.SIGINT)
        code, stdout, stderr = finish(driver, timeout=120)
        assert wait_gone(started) == []  # the embedded Ray instance was shut down
    finally:
        kill_all(started)
    assert code == 130, stdout + stderr
    assert f"resume with: python -m orchestrator run {study} --out {out} --num-cpus 1" in stderr
    before = committed(db)
    assert 1 <= len(before) < CELLS
    assert rows(db, "SELECT count(*) FROM attempt WHERE status IN ('running', 'pending')") == [(0,)]
    interrupted = rows(db, "SELECT count(*) FROM attempt WHERE error_type = 'Interrupted'")[0][0]
    assert interrupted >= 1  # the jobs in flight, recorded as such
    assert rows(db, "SELECT count(*) FROM cell WHERE status = 'running'") == [(0,)]

    again = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(before)} already done, {CELLS - len(before)} to run" in again.stdout
    assert "left running" not in again.stdout  # nothing was left for the next run to clean up
    assert_one_result_per_cell(db, CELLS)
    assert {k: v for k, v in committed(db).items() if k in before} == before
