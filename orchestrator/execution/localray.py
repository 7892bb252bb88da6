"""The embedded Ray instance: a head on this machine, of a fixed size, for one driver.

``ray.init(num_cpus=...)`` starts what a long-lived, shared cluster uses. Besides
the GCS and the raylet (with its two agents and the prestarted workers) it starts
three more Python processes:

- the autoscaler's monitor;
- an API server, which with ``include_dashboard=False`` loads only the
  usage-stats module, and usage stats are off;
- a log monitor that forwards every worker's output to the driver.

Each of the three imports Ray (0.5-0.8 CPU seconds apiece) while the raylet, its
agents and the first workers start on the same cores, and ``ray.init`` waits for
the API server to register. An instance that never grows, that nobody browses and
whose jobs report through their results needs none of them. :func:`start` brings
up the head without them, and the first jobs start 1-2 s sooner on two CPUs
(docs/EXECUTION.md). Every ``run`` pays that start before its first job does any
work.

It builds the head with the node class ``ray.init`` itself uses
(``ray._private.node.Node``), which is not public API. Where a Ray release changes
it, :func:`start` says so and falls back to ``ray.init``: the start is slower and
nothing else changes.

Given up: the driver does not print its workers' stdout and stderr. They stay in
``worker-*.out`` / ``worker-*.err`` under the session's ``logs/`` folder. Jobs
report through their results: a failure carries the worker's traceback, and the
warnings of a synthesis land in its artifact's meta.
"""
from __future__ import annotations

import sys
from typing import Any

# The Ray minor release the tests run (constraints.txt). Under any other the lean
# head is not tried: the instance starts through the public ray.init.
TESTED_RAY = "2.60"


def tested(version: str) -> bool:
    return version.split(".")[:2] == TESTED_RAY.split(".")


def start(ray, num_cpus: int, num_gpus: int, temp_dir: str) -> Any | None:
    """Start the embedded instance and connect this driver to it. Returns its
    head node, for :func:`stop` after ``ray.shutdown()``; None when it fell back
    to ``ray.init``, which then owns the instance (``ray.shutdown()`` ends it)."""
    if not tested(ray.__version__):
        return public_start(ray, num_cpus, num_gpus, temp_dir,
                            f"Ray {ray.__version__} is not the tested {TESTED_RAY}.x")
    try:
        node = lean_head(num_cpus, num_gpus, temp_dir)
    except Exception as exc:  # noqa: BLE001 - a Ray whose internals differ: its public start still works
        return public_start(ray, num_cpus, num_gpus, temp_dir,
                            f"Ray {ray.__version__} cannot start a lean local instance ({type(exc).__name__}: {exc})")
    try:
        # Nothing to forward without a log monitor, so no subscriber for it either.
        ray.init(address=node.address, logging_level="ERROR", log_to_driver=False)
    except BaseException:
        stop(node)
        raise
    return node


def public_start(ray, num_cpus: int, num_gpus: int, temp_dir: str, why: str) -> None:
    """The instance as ``ray.init`` starts it (public API; slower to start)."""
    print(f"note: {why}; starting it with ray.init (slower)", file=sys.stderr)
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=temp_dir,
             logging_level="ERROR", log_to_driver=True)
    return None


def lean_head(num_cpus: int, num_gpus: int, temp_dir: str):
    """The head: GCS and raylet, loopback only; no monitor, API server or log monitor."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    class Head(Node):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(*args, **kwargs)  # starts the processes
            except BaseException:
                # Those already started would live on beside the fallback's instance until exit.
                if getattr(self, "all_processes", None):
                    self.kill_all_processes(check_alive=False)
                raise

        def start_api_server(self, **_: Any) -> None:
            pass  # nothing for it to serve here: see the module docstring

    # enable_worker_prestart: the raylet starts its first workers (one per CPU, as
    # ray.init's does once the driver connects) as soon as it is up, so that they
    # boot while this driver connects.
    params = RayParams(num_cpus=num_cpus, num_gpus=num_gpus, node_ip_address="127.0.0.1", temp_dir=temp_dir,
                       include_dashboard=False, no_monitor=True, include_log_monitor=False,
                       _system_config={"enable_worker_prestart": True})
    # Ended by stop(), at interpreter exit (shutdown_at_exit), or by Ray's reaper
    # process when this one dies without either (a SIGKILL): as with ray.init.
    return Head(params, head=True, shutdown_at_exit=True, spawn_reaper=True)


def stop(node) -> None:
    """End the processes of a head from :func:`start` (call ``ray.shutdown()`` first)."""
    if node is None:
        return
    node.destroy_external_storage()  # objects spilled to disk, as ray.shutdown does for its own head
    node.kill_all_processes(check_alive=False, allow_graceful=True)
