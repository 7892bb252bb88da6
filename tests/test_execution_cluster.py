"""`run --address` (or RAY_ADDRESS) joins a Ray cluster that is already
running (here a head and worker nodes started with `ray start`, all on this
machine): the jobs run in the cluster's workers, not in an embedded instance; a
node that dies mid-job has its cell rescheduled on another node; the cluster
keeps running after the driver leaves."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from procs import descendants, finish, kill_all, rows, start_cli, title, wait_for

RAY = Path(sys.executable).parent / "ray"
STUDY = """\
name: {name}
dataset: {{name: digits}}
methods:
  - {{name: random_real, ipc: 5}}
protocol:
  preset: rd3
  overrides: {{student: convnet3-w16, epochs: 150, augment: {{flip: false}}, labels: {{mode: hard}}}}
seeds: [0, 1]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_node(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))


@pytest.mark.slow
@pytest.mark.skipif(not RAY.exists(), reason="the `ray` command is not installed next to this Python")
def test_runs_on_a_cluster_and_a_node_that_dies_mid_job_has_its_cell_rescheduled(tiny_study, tmp_path,
                                                                                  monkeypatch):
    """A worker node runs the job and loses its raylet (SIGKILL: as when its
    machine dies); the cell runs again on a second worker node."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rd3n", dir="/tmp")
    # Several nodes need Ray's cluster mode (it may then listen beyond loopback); no token in a test.
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    nodes = [start_node("--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
                        f"--temp-dir={temp}")]
    started = []

    def worker_node() -> subprocess.Popen:
        ports = [free_port() for _ in range(3)]
        return start_node(f"--address=127.0.0.1:{port}", "--num-cpus=1", "--num-gpus=0",
                          f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                          f"--metrics-export-port={ports[2]}")

    try:
        wait_for(lambda: listening(port), 120, "the Ray head to listen", nodes[0])
        time.sleep(2)
        nodes.append(worker_node())
        out = tmp_path / "out"
        study = STUDY.format(name="nd").replace("epochs: 150", "epochs: 1500").replace("seeds: [0, 1]", "seeds: [0]")
        driver = start_cli("run", str(tiny_study("nd", study)), "--out", str(out), "--address", f"127.0.0.1:{port}",
                           "--max-retries", "1", "--heartbeat-s", "0.5")
        worker = wait_for(lambda: next((p for p in descendants(nodes[1].pid)
                                        if title(p).startswith("ray::rd3:posteval")), None),
                          180, "the job on the first worker node", driver)
        assert worker not in descendants(driver.pid)  # in the cluster, not an embedded instance
        nodes.append(worker_node())  # somewhere for the cell to go
        time.sleep(3)
        started += [p for n in nodes for p in descendants(n.pid)]
        raylet = next(p for p in descendants(nodes[1].pid) if "raylet/raylet" in title(p))
        os.kill(raylet, signal.SIGKILL)
        code, stdout, stderr = finish(driver, timeout=300)
        assert code == 0, stdout + stderr
        runs = rows(out / "rd3.sqlite", "SELECT number, status, error_type FROM attempt ORDER BY number")
        assert len(runs) == 2 and runs[1][1:] == ("done", None), runs
        assert runs[0][1] == "failed" and runs[0][2] in {
            "ray.exceptions.NodeDiedError", "ray.exceptions.WorkerCrashedError", "ray.exceptions.LocalRayletDiedError",
            "WorkerLost"}, runs
        assert "transient: retrying" in stdout
        assert nodes[0].poll() is None and listening(port)  # the driver left the cluster running

        # RAY_ADDRESS works the same way.
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        again = start_cli("run", str(tiny_study("c2", STUDY.format(name="c2").replace("seeds: [0, 1]", "seeds: [3]"))),
                          "--out", str(out))
        code, stdout, stderr = finish(again)
        assert code == 0, stdout + stderr
        assert rows(out / "rd3.sqlite", "SELECT count(*) FROM cell c JOIN study s ON s.id = c.study_id "
                                        "WHERE s.name = 'c2' AND c.status = 'done'") == [(1,)]
        assert nodes[0].poll() is None and listening(port)

        # Ctrl-C while a job runs on the cluster: the job is cancelled there, the
        # attempt is recorded as interrupted, the cluster stays up.
        long_study = tiny_study("cc", STUDY.format(name="cc").replace("epochs: 150", "epochs: 100000")
                                .replace("seeds: [0, 1]", "seeds: [4]"))
        driver = start_cli("run", str(long_study), "--out", str(out))
        job = wait_for(lambda: next((p for n in nodes[1:] for p in descendants(n.pid)
                                     if title(p).startswith("ray::rd3:posteval")), None),
                       180, "the long job on a worker node", driver)
        driver.send_signal(signal.SIGINT)
        code, stdout, stderr = finish(driver, timeout=120)
        assert code == 130, stdout + stderr
        assert "resume with: python -m orchestrator run" in stderr
        wait_for(lambda: not title(job).startswith("ray::rd3:posteval"), 60, "the cancelled job to stop")
        assert rows(out / "rd3.sqlite", "SELECT a.status, a.error_type FROM attempt a JOIN cell c ON c.id = a.cell_id "
                                        "JOIN study s ON s.id = c.study_id WHERE s.name = 'cc'") == [
            ("failed", "Interrupted")]
        assert nodes[0].poll() is None and listening(port)
    finally:
        started += [p for n in nodes for p in descendants(n.pid)]
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{p}") for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_all(started)
        shutil.rmtree(temp, ignore_errors=True)
