"""Scale-out for real, on one machine: a Ray head started with `ray start
--head` and a second Ray node with `ray start --address`, both on loopback with
Ray's token authentication on, and a real PostgreSQL server. A small study run
with --address and a PostgreSQL --db must store exactly the accuracies of the
embedded default run (same seeds, same code, same thread count on CPU), and its
jobs must have run on both nodes. Everything this test starts, it stops: only
the processes holding its own temp folder (and their children), never `ray stop`.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, run_cli
from db.queries import attempts_frame, results_frame
from db.session import make_engine

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_holding(marker: str) -> set[int]:
    """Pids whose command line mentions ``marker``, plus all their descendants."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in cmdline:
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        grew = bool(children)
        found |= children
    found.discard(os.getpid())
    return found


def stop_processes(marker: str, grace_s: float = 15.0) -> None:
    pids = processes_holding(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        if not pids:
            return


@pytest.fixture
def ray_cluster():
    """A two-node Ray cluster on loopback (1 CPU each), token auth on."""
    temp = tempfile.mkdtemp(prefix="rd3rc-")  # short: Ray's socket paths must stay under 107 bytes
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        "--disable-usage-stats", *common], env=env, check=True, capture_output=True, timeout=120)
        worker_ports = free_port()
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common,
                        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                        f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 50}"],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert not processes_holding(temp), "processes of the test cluster survived"


def test_cluster_with_postgres_matches_the_embedded_run(ray_cluster, postgres_databases, tiny_study, tmp_path):
    address, env = ray_cluster
    study = tiny_study("scaleout")
    pg_url = postgres_databases.create()
    try:
        cluster = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(study), "--out",
                                  str(tmp_path / "cluster"), "--address", address, "--db", pg_url],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert cluster.returncode == 0, cluster.stdout + cluster.stderr
        embedded = run_cli("run", str(study), "--out", str(tmp_path / "embedded"), "--num-cpus", "2")
        assert embedded.returncode == 0, embedded.stdout + embedded.stderr

        pg = make_engine(pg_url)
        lite = make_engine(f"sqlite:///{tmp_path / 'embedded' / 'rd3.sqlite'}")
        on_cluster = results_frame(pg, "scaleout")[["cell_key", "seed", "top1"]]
        at_home = results_frame(lite, "scaleout")[["cell_key", "seed", "top1"]]
        assert len(on_cluster) == 4
        pd.testing.assert_frame_equal(on_cluster, at_home)  # same cells, same accuracies to the last digit

        # The jobs really ran on both nodes of the cluster.
        with pg.connect() as conn:
            nodes = {row[0] for row in conn.exec_driver_sql(
                "SELECT env->>'ray_node_id' FROM provenance WHERE env->>'ray_node_id' IS NOT NULL")}
        assert len(nodes) == 2, nodes
        assert (attempts_frame(pg, "scaleout").status == "done").all()
        pg.dispose()
    finally:
        postgres_databases.drop(pg_url)
