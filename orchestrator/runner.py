"""Executors and the driver loop.

The driver walks the stage graph: a node is submitted once everything it
depends on has finished; each finished post-evaluation is committed to the DB at
once (the driver is the only writer). Two executors share one interface: Ray
tasks on a local or remote cluster, and an in-process one for debugging that
gives identical numbers (same code, same seeds, same thread count).
"""
from __future__ import annotations

import os
import tempfile
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .jobs import run_node
from .plan import Node, Plan
from .progress import Progress  # noqa: F401  (the driver's display; re-exported)
from .resources import Resources, ResourcesSpec


@dataclass
class Outcome:
    node: Node
    result: dict[str, Any] | None = None
    error: str | None = None  # "Type: message"
    traceback: str | None = None


class LocalExecutor:
    """Runs each job in the driver process, one at a time, when asked for the next result."""

    name = "local"

    def __init__(self, store_root: str):
        self.store_root = store_root
        self.queue: deque[tuple[Node, Resources]] = deque()

    def submit(self, node: Node, resources: Resources) -> None:
        self.queue.append((node, resources))

    def inflight(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        import torch

        node, resources = self.queue.popleft()
        threads = torch.get_num_threads()
        try:
            return Outcome(node, run_node(node.stage, node.key, node.payload, self.store_root, resources.threads))
        except Exception as exc:
            return Outcome(node, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        self.queue.clear()


class RayExecutor:
    """Ray tasks. Starts an embedded local instance (loopback, no dashboard, temp
    files outside the repo) unless ``address`` names a running cluster."""

    name = "ray"

    def __init__(self, store_root: str, address: str | None = None, num_cpus: int | None = None,
                 num_gpus: int | None = None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            # Embedded instance: loopback only. Ray resolves 127.0.0.1 to the
            # external address unless "cluster mode" is off, which makes every
            # server bind to localhost; read at import, so set before importing.
            # Token auth is for real clusters; nothing else can reach this one.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self.ray = ray
        self.store_root = store_root
        self.started = not ray.is_initialized()
        if self.started:
            if address:
                ray.init(address=address, logging_level="ERROR", log_to_driver=True)
            else:
                ray.init(num_cpus=num_cpus or available_cpus(), num_gpus=num_gpus if num_gpus is not None else
                         detect_gpus(), include_dashboard=False,
                         _temp_dir=os.path.join(tempfile.gettempdir(), f"rd3-ray-{os.getuid()}"),
                         logging_level="ERROR", log_to_driver=True)
        self.remote = ray.remote(max_retries=0)(run_node)
        self.pending: dict[Any, Node] = {}

    def submit(self, node: Node, resources: Resources) -> None:
        options = {"num_cpus": resources.cpus, "num_gpus": resources.gpus}
        if resources.memory:
            options["memory"] = resources.memory  # bytes; Ray schedules on it, a job over it may be killed
        ref = self.remote.options(**options).remote(node.stage, node.key, node.payload, self.store_root,
                                                    resources.threads)
        self.pending[ref] = node

    def inflight(self) -> int:
        return len(self.pending)

    def next_outcome(self) -> Outcome:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        node = self.pending.pop(ready[0])
        try:
            return Outcome(node, self.ray.get(ready[0]))
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return Outcome(node, error=f"{type(cause).__name__}: {cause}", traceback=str(exc))
        except self.ray.exceptions.RayError as exc:  # worker died, node lost, ...
            return Outcome(node, error=f"{type(exc).__name__}: {exc}", traceback=str(exc))

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started:
            self.ray.shutdown()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def detect_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def execute(plan: Plan, executor, resources: ResourcesSpec | Resources,
            on_outcome: Callable[[Outcome], None]) -> None:
    """Run every non-cached node of ``plan`` in dependency order, each with its
    node's resources (else its stage's from ``resources``), at most
    ``resources.max_concurrent`` at a time."""
    flat = resources if isinstance(resources, Resources) else None
    cap = None if flat else resources.max_concurrent
    done = {nid for nid, n in plan.nodes.items() if n.cached}
    failed: set[str] = set()
    waiting = {nid: set(n.deps) - done for nid, n in plan.nodes.items() if not n.cached}
    dependents: dict[str, list[str]] = {}
    for nid in waiting:
        for dep in plan.nodes[nid].deps:
            dependents.setdefault(dep, []).append(nid)
    ready: deque[str] = deque()

    def submit_ready() -> None:
        while ready and (cap is None or executor.inflight() < cap):
            node = plan.nodes[ready.popleft()]
            executor.submit(node, node.resources or flat or resources.for_stage(node.stage))

    def release(nid: str) -> None:
        for child in dependents.get(nid, []):
            waiting[child].discard(nid)
            if not waiting[child] and child not in failed:
                ready.append(child)

    def fail_downstream(nid: str, outcome: Outcome) -> None:
        for child in dependents.get(nid, []):
            if child not in failed:
                failed.add(child)
                on_outcome(Outcome(plan.nodes[child], error=f"upstream {outcome.node.stage} failed: {outcome.error}",
                                   traceback=outcome.traceback))
                fail_downstream(child, outcome)

    ready.extend(nid for nid, deps in waiting.items() if not deps)
    submit_ready()
    while executor.inflight():
        outcome = executor.next_outcome()
        nid = outcome.node.id
        on_outcome(outcome)
        if outcome.error is None:
            done.add(nid)
            release(nid)
        else:
            failed.add(nid)
            fail_downstream(nid, outcome)
        submit_ready()
