"""The embedded Ray instance (orchestrator.execution.localray), started by RayExecutor in a
fresh process, as `run` starts it: jobs run on it, it has no autoscaler
monitor, API server or log monitor, and close() leaves none of its processes.
Where the lean start fails, or the Ray release is not the tested one, the
executor falls back to ray.init and says so."""
import json
import os
import subprocess
import sys

from procs import ROOT

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from procs import alive, descendants, title
import orchestrator.execution.localray as localray
from orchestrator.execution.runner import RayExecutor

if {broken!r} == "before":
    def lean_head(*args):
        raise TypeError("RayParams.__init__() got an unexpected keyword argument 'no_monitor'")
    localray.lean_head = lean_head
elif {broken!r} == "version":  # a Ray release the tests never ran
    import ray
    ray.__version__ = "2.99.0"
elif {broken!r} == "halfway":  # the GCS is up when the raylet fails to start
    from ray._private.node import Node
    real = Node.start_ray_processes
    def start_ray_processes(self):
        Node.start_ray_processes = real  # only the first start fails: ray.init's goes through
        raise RuntimeError("the raylet did not start")
    Node.start_ray_processes = start_ray_processes
executor = RayExecutor({store!r}, num_cpus=1, num_gpus=0)
gcs_servers = sum("gcs_server" in title(p) for p in descendants(os.getpid()) if alive(p))
ran = executor.ray.get(executor.ray.remote(lambda: os.getpid()).remote())
started = {{p: title(p) for p in descendants(os.getpid())}}
lean = executor.head is not None
executor.close()
deadline = time.monotonic() + 30
while any(alive(p) for p in started) and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps({{"lean": lean, "ran_in": ran, "gcs_servers": gcs_servers, "started": started,
                  "left": [p for p in started if alive(p)], "initialized": executor.ray.is_initialized()}}))
"""

# What the three processes ray.init adds run (ray/autoscaler/_private/monitor.py,
# ray/dashboard/dashboard.py, ray/_private/log_monitor.py).
EXTRAS = ("monitor.py", "dashboard.py", "log_monitor.py")


def start(tmp_path, broken: str = "") -> tuple[dict, str]:
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), broken=broken, store=str(tmp_path / "store"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an instance of its own
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=dict(env, RAY_USAGE_STATS_ENABLED="0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def extras(started: dict) -> set[str]:
    """Which of EXTRAS ran among the ``started`` processes (pid -> command line)."""
    return {extra for extra in EXTRAS for line in started.values()
            if any(word.endswith("/" + extra) for word in line.split())}


def test_the_embedded_instance_runs_jobs_without_the_processes_a_local_run_never_uses(tmp_path):
    report, stderr = start(tmp_path)
    assert report["lean"], stderr
    titles = report["started"].values()
    assert any("gcs_server" in t for t in titles) and any("/raylet " in t for t in titles)
    assert str(report["ran_in"]) in report["started"]  # the job ran in a worker of this instance
    assert extras(report["started"]) == set(), titles
    assert report["left"] == [] and not report["initialized"]
    assert "lean local instance" not in stderr


def test_without_the_lean_start_the_executor_falls_back_to_ray_init_and_says_so(tmp_path):
    report, stderr = start(tmp_path, broken="before")
    assert not report["lean"]
    assert "cannot start a lean local instance (TypeError: RayParams.__init__() got an unexpected keyword " \
           "argument 'no_monitor'); starting it with ray.init" in stderr
    assert str(report["ran_in"]) in report["started"]
    assert extras(report["started"]) == set(EXTRAS)  # ray.init's head, as it comes
    assert report["left"] == [] and not report["initialized"]


def test_an_untested_ray_release_starts_through_the_public_ray_init(tmp_path):
    report, stderr = start(tmp_path, broken="version")
    assert not report["lean"]
    assert "Ray 2.99.0 is not the tested 2.60.x; starting it with ray.init" in stderr
    assert str(report["ran_in"]) in report["started"]
    assert report["left"] == [] and not report["initialized"]


def test_the_tested_release_is_the_one_constraints_pin():
    from orchestrator.execution.localray import TESTED_RAY, tested

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert tested(pins["ray"]) and TESTED_RAY.count(".") == 1
    assert tested("2.60.3") and not tested("2.6.0") and not tested("2.61.0")


def test_a_lean_start_that_fails_halfway_leaves_no_process_beside_the_fallback(tmp_path):
    report, stderr = start(tmp_path, broken="halfway")
    assert not report["lean"] and "(RuntimeError: the raylet did not start)" in stderr
    assert report["gcs_servers"] == 1  # ray.init's; the lean head's own GCS was ended at once
    assert str(report["ran_in"]) in report["started"]
    assert report["left"] == [] and not report["initialized"]
