"""`run --address` (or RAY_ADDRESS) joins a Ray cluster that is already
running (here one started with `ray start --head` on loopback, as on a real
head node): the jobs run in the cluster's workers, not in an embedded instance,
and the cluster keeps running after the driver leaves."""
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


@pytest.mark.slow
@pytest.mark.skipif(not RAY.exists(), reason="the `ray` command is not installed next to this Python")
def test_run_joins_a_running_cluster_and_leaves_it_running(tiny_study, tmp_path, monkeypatch):
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rd3c", dir="/tmp")  # short: Ray's socket paths live under it
    # Loopback only, no token (nothing else can reach it); the driver inherits both settings.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    started = []
    try:
        wait_for(lambda: listening(port), 120, "the Ray head to listen", head)
        time.sleep(2)  # the head's raylet registers after its GCS listens
        out = tmp_path / "out"
        driver = start_cli("run", str(tiny_study("c1", STUDY.format(name="c1"))), "--out", str(out),
                           "--address", f"127.0.0.1:{port}")
        # The job runs in a worker of the cluster's raylet, not under the driver.
        worker = wait_for(lambda: next((p for p in descendants(head.pid) if title(p).startswith("ray::rd3:")), None),
                          180, "a job in the cluster", driver)
        assert worker not in descendants(driver.pid)
        started += descendants(head.pid)
        code, stdout, stderr = finish(driver)
        assert code == 0, stdout + stderr
        assert rows(out / "rd3.sqlite", "SELECT count(*) FROM metric WHERE name = 'top1'") == [(2,)]
        assert head.poll() is None and listening(port)  # the driver left the cluster running

        # RAY_ADDRESS works the same way.
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        again = start_cli("run", str(tiny_study("c2", STUDY.format(name="c2"))), "--out", str(out))
        code, stdout, stderr = finish(again)
        assert code == 0, stdout + stderr
        assert head.poll() is None and listening(port)
    finally:
        started += descendants(head.pid)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{p}") for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_all(started)
        shutil.rmtree(temp, ignore_errors=True)


def start_node(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))


@pytest.mark.slow
@pytest.mark.skipif(not RAY.exists(), reason="the `ray` command is not installed next to this Python")
def test_a_node_that_dies_mid_job_has_its_cell_rescheduled(tiny_study, tmp_path, monkeypatch):
    """Two worker nodes on this machine; the one running a job loses its raylet
    (SIGKILL: as when its machine dies); the cell runs again on the other."""
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
        wait_for(lambda: next((p for p in descendants(nodes[1].pid) if title(p).startswith("ray::rd3:posteval")),
                              None), 180, "the job on the first worker node", driver)
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
