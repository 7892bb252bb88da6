"""Liveness and retries with real Ray workers and real signals.

A worker killed while it runs a job (SIGKILL: what the kernel's OOM killer or a
crash does) surfaces from Ray as WorkerCrashedError, a transient failure: with
--max-retries 0 the cell fails (exit 1, the retry command printed) and a plain
rerun runs it again. A worker frozen mid-job (SIGSTOP: a hung machine, a
network partition) is not noticed by Ray at all; its heartbeats stop, the
driver declares it lost (WorkerLost), cancels it and retries the cell. Every
run of a cell is an attempt row."""
import os
import signal

import pytest

from procs import (assert_one_result_per_cell, attempts, cpu_seconds, descendants, finish, job_worker, kill_all, rows,
                   start_cli, wait_for)

STUDY = """\
name: live
dataset: {name: digits}
methods:
  - {name: random_real, ipc: 5}
protocol:
  preset: rd3
  overrides: {student: convnet3-w16, augment: {flip: false}, labels: {mode: hard}}
factors:
  protocol.epochs: [400, 401]
seeds: [0]
"""


@pytest.mark.slow
def test_killed_worker_is_a_transient_failure_and_a_frozen_one_is_found_by_heartbeat(tiny_study, tmp_path):
    study, out = tiny_study("live", STUDY), tmp_path / "out"
    db = out / "rd3.sqlite"
    started = []
    try:
        # 1. SIGKILL the worker of the first post-evaluation; no retries allowed.
        driver = start_cli("run", str(study), "--out", str(out), "--num-cpus", "1", "--max-retries", "0")
        victim = wait_for(lambda: job_worker(driver), 120, "a post-evaluation job to start", driver)
        started += descendants(driver.pid)
        os.kill(victim, signal.SIGKILL)
        code, stdout, stderr = finish(driver)
        assert code == 1, stdout + stderr
        runs = attempts(db)
        crashed = [k for k, a in runs.items() if a[-1][1] == "failed"]
        assert len(crashed) == 1 and runs[crashed[0]] == [(1, "failed", "ray.exceptions.WorkerCrashedError")]
        assert "1 failed for a transient reason" in stderr and "a plain rerun retries them" in stderr
        assert f"python -m orchestrator run {study} --out {out} --num-cpus 1 --max-retries 0" in stderr

        # 2. A plain rerun runs it again; freeze that job's worker: its heartbeats stop.
        driver = start_cli("run", str(study), "--out", str(out), "--num-cpus", "1", "--max-retries", "1",
                           "--heartbeat-s", "0.5")
        frozen = wait_for(lambda: job_worker(driver), 120, "the rerun's job to start", driver)
        started += descendants(driver.pid)
        used = cpu_seconds(frozen)
        wait_for(lambda: cpu_seconds(frozen) > used + 1.0, 60, "the job to be at work", driver)
        # While it runs, the driver records its heartbeats on the attempt row.
        wait_for(lambda: rows(db, "SELECT count(*) FROM attempt WHERE status = 'running' AND "
                                  "julianday(heartbeat_at) > julianday(started_at) + 0.5 / 86400")[0][0], 30,
                 "a heartbeat recorded on the running attempt", driver)
        os.kill(frozen, signal.SIGSTOP)
        code, stdout, stderr = finish(driver, timeout=240)  # without heartbeats it would wait forever
        assert code == 0, stdout + stderr
        assert "WorkerLost: the posteval job was lost: no heartbeat for" in stdout
        assert "transient: retrying (run 2 of at most 2)" in stdout
        runs = attempts(db)
        assert runs[crashed[0]] == [(1, "failed", "ray.exceptions.WorkerCrashedError"), (2, "failed", "WorkerLost"),
                                    (3, "done", None)]
        assert all(len(a) == 1 for k, a in runs.items() if k != crashed[0])
        assert_one_result_per_cell(db, 2)
    finally:
        kill_all(started)


@pytest.mark.slow
def test_a_frozen_worker_is_found_through_the_file_board(tiny_study, tmp_path, monkeypatch):
    """The fallback board (files under OUT/heartbeats: an untested Ray release, a
    ray:// driver) keeps liveness: a frozen job is lost and retried as with the
    key-value store."""
    monkeypatch.setenv("RD3_HEARTBEATS", "files")
    study = tiny_study("live_files", STUDY.replace("name: live", "name: live_files").replace("[400, 401]", "[400]"))
    out = tmp_path / "out"
    started = []
    try:
        driver = start_cli("run", str(study), "--out", str(out), "--num-cpus", "1", "--max-retries", "1",
                           "--heartbeat-s", "0.5")
        frozen = wait_for(lambda: job_worker(driver), 120, "a post-evaluation job to start", driver)
        started += descendants(driver.pid)
        wait_for(lambda: any((out / "heartbeats").glob("*/*")), 30, "a heartbeat file", driver)
        used = cpu_seconds(frozen)
        wait_for(lambda: cpu_seconds(frozen) > used + 1.0, 60, "the job to be at work", driver)
        os.kill(frozen, signal.SIGSTOP)
        code, stdout, stderr = finish(driver, timeout=240)
        assert code == 0, stdout + stderr
        assert "heartbeats through files under" in stderr and "RD3_HEARTBEATS=files" in stderr
        assert "WorkerLost: the posteval job was lost: no heartbeat for" in stdout
        assert [a for runs in attempts(out / "rd3.sqlite").values() for a in runs] == [
            (1, "failed", "WorkerLost"), (2, "done", None)]
        assert not any((out / "heartbeats").glob("*/*"))  # the run's files are gone with it
    finally:
        kill_all(started)
