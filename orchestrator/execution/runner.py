"""Executors and the driver loop.

The driver walks the stage graph: a node is submitted once everything it
depends on has finished; each finished post-evaluation is committed to the DB at
once (the driver is the only writer). Two executors share one interface: Ray
tasks on a local or remote cluster, and an in-process one for debugging that
gives identical numbers (same code, same seeds, same thread count).

No core idles while work waits: a job of a shared stage (teacher, synthesis,
stored labels) that every remaining result depends on is the critical path, since
no cell can finish before it: it gets every CPU of a node (``widen``), and
whatever else could run beside it waits. The rule reads only the plan, never the
timing of a run, so both executors and every rerun of the same plan give a job
the same thread count, and so the same numbers. Post-evaluations keep what they
asked for.

A failed job is retried when its failure is transient (orchestrator.execution.failures),
at most ``max_retries`` times; a job that failed for good fails every job
downstream of it with ``UpstreamFailed``. Ray jobs beat to the run's heartbeat
board (orchestrator.execution.worker: the cluster's key-value store, or files); one whose
beats stop or whose node leaves the cluster is cancelled and reported as a
transient ``WorkerLost`` failure.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import failures, localray
from .failures import Failure
from .plan import RESULT_STAGES, Node, Plan
from .progress import Progress  # noqa: F401  (the driver's display; re-exported)
from ..study.resources import Resources, ResourcesSpec
from .worker import choose_board, run_job

LOST_AFTER_BEATS = 12  # a job whose heartbeats stopped for this many periods is lost


@dataclass
class Outcome:
    node: Node
    result: dict[str, Any] | None = None
    failure: Failure | None = None
    wall_s: float | None = None  # time inside the job, on the worker
    host: str | None = None  # where a failed job ran, when it could say
    job: dict[str, Any] = field(default_factory=dict)  # when (epoch s) and where it ran: start, end, pid, host
    retrying: bool = False  # set by execute: the node goes back to the executor
    tries: int = 1  # set by execute: the how-manieth run of this node in this run

    @property
    def error(self) -> str | None:
        return None if self.failure is None else str(self.failure)


def outcome_of(node: Node, data: dict[str, Any]) -> Outcome:
    """An Outcome from what worker.run_job returned."""
    job = data.get("job", {})
    if "failure" in data:
        return Outcome(node, failure=Failure(**data["failure"]), wall_s=data.get("wall_s"), host=data.get("host"),
                       job=job)
    return Outcome(node, data, wall_s=data.get("wall_s"), job=job)


def _job_args(node: Node, store_root: str, resources: Resources) -> tuple:
    return (node.stage, node.key, node.payload, store_root, resources.threads, resources.memory, resources.gpus,
            resources.checkpoint_every)


class LocalExecutor:
    """Runs each job in the driver process, one at a time, when asked for the
    next result. No heartbeats: a job that dies takes the driver with it. Its
    progress records go straight to ``on_progress`` (in the job's thread,
    which is the driver's) as the job's Reporter writes them."""

    name = "local"

    def __init__(self, store_root: str):
        self.store_root = store_root
        self.queue: deque[tuple[Node, Resources]] = deque()
        self.on_tick: Callable[[list[Node]], None] | None = None
        self.on_progress: Callable[[list[tuple[Node, dict | None]]], None] | None = None

    def submit(self, node: Node, resources: Resources) -> None:
        self.queue.append((node, resources))

    def inflight(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        import torch

        node, resources = self.queue.popleft()
        threads = torch.get_num_threads()
        relay = _Relay(node, self.on_progress) if self.on_progress is not None else None
        try:
            return outcome_of(node, run_job(*_job_args(node, self.store_root, resources), report_to=relay))
        finally:
            torch.set_num_threads(threads)

    def slots(self) -> dict[str, float]:
        return {"CPU": 1.0}

    def node_capacity(self) -> dict[str, float]:
        """What one job could use at most: this machine (jobs run one at a time)."""
        return {"CPU": float(available_cpus()), "GPU": float(detect_gpus())}

    def close(self) -> None:
        self.queue.clear()


@dataclass(frozen=True)
class _Relay:
    """The in-process executor's board for one job: its progress records, as written."""

    node: Node
    on_progress: Callable[[list[tuple[Node, dict | None]]], None]

    def report(self, token: str, record: str) -> None:
        self.on_progress([(self.node, json.loads(record))])


class RayExecutor:
    """Ray tasks. Starts an embedded local instance (orchestrator.execution.localray:
    loopback, only the processes a one-machine run uses, temp files outside the
    repo) unless ``address`` (else RAY_ADDRESS) names a running cluster, which
    it joins and leaves running.

    While waiting for results it checks every ``heartbeat_s`` seconds which
    running jobs still beat, calls ``on_tick`` with their nodes (the driver
    records the heartbeats) and ``on_progress`` with each of them and its
    latest progress record (None before its first; orchestrator.execution.jobprogress),
    and turns lost jobs into failures."""

    name = "ray"

    def __init__(self, store_root: str, address: str | None = None, num_cpus: int | None = None,
                 num_gpus: int | None = None, heartbeat_s: float = 5.0):
        address = address or os.environ.get("RAY_ADDRESS")
        self.ray, self.head, self.started = start_ray(address, num_cpus, num_gpus)
        self.store_root = store_root
        self.remote = self.ray.remote(max_retries=0)(run_job)  # retries are the driver's: each is an attempt row
        self.pending: dict[Any, tuple[Node, str]] = {}  # ref -> (node, heartbeat token)
        self.ready: deque[Any] = deque()
        self.lost: deque[Outcome] = deque()
        self.heartbeat_s = heartbeat_s
        self.on_tick: Callable[[list[Node]], None] | None = None
        self.on_progress: Callable[[list[tuple[Node, dict | None]]], None] | None = None
        self.serial = itertools.count()
        self.next_check = time.monotonic() + heartbeat_s
        # Beside the artifact store (store_root = OUT/artifacts): a folder the cluster shares already.
        self.board, note = choose_board(self.ray, f"{os.getpid()}-{uuid.uuid4().hex[:12]}",
                                       os.path.join(os.path.dirname(os.path.abspath(store_root)), "heartbeats"),
                                       address, localray.tested(self.ray.__version__))
        if note:
            print(note, file=sys.stderr)
        self.beats: dict[str, tuple[int, float]] = {}  # token -> (its beat count, when the driver saw it change)

    def submit(self, node: Node, resources: Resources) -> None:
        token = f"{node.id}#{next(self.serial)}"
        # The task's name is its worker's process title while it runs: `ps` shows ray::rd3:posteval.
        options = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "name": f"rd3:{node.stage}"}
        if resources.memory:
            options["memory"] = resources.memory  # bytes: Ray schedules on it; worker.memory_limit enforces it
        ref = self.remote.options(**options).remote(*_job_args(node, self.store_root, resources), self.board,
                                                    token, self.heartbeat_s)
        self.pending[ref] = (node, token)

    def inflight(self) -> int:
        return len(self.pending) + len(self.lost)

    def next_outcome(self) -> Outcome:
        while not self.lost:
            if time.monotonic() >= self.next_check:  # due even while results keep arriving
                self.check()
                continue
            if self.ready:
                return self._collect(self.ready.popleft())
            refs = list(self.pending)
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=max(0.0, self.next_check - time.monotonic()))
            if ready:
                # Take every finished job in one call: one pass over the refs per batch, not per result.
                more, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                self.ready.extend(dict.fromkeys([*ready, *more]))
            else:
                self.check()
        return self.lost.popleft()

    def _collect(self, ref) -> Outcome:
        node, token = self.pending.pop(ref)
        self.beats.pop(token, None)
        errors = self.ray.exceptions
        try:
            return outcome_of(node, self.ray.get(ref))
        except errors.RayTaskError as exc:  # raised outside the job's own code (e.g. its arguments)
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return Outcome(node, failure=failures.from_exception(cause, str(exc)))
        except errors.RayError as exc:  # worker died, node lost, killed for memory, ...
            return Outcome(node, failure=failures.from_exception(exc, str(exc)))

    def check(self) -> None:
        """Liveness: jobs that stopped beating or whose node is gone become
        WorkerLost failures; the rest are reported to ``on_tick``."""
        self.next_check = time.monotonic() + self.heartbeat_s
        try:
            beats = self.board.read()
            alive_nodes = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        except Exception as exc:  # noqa: BLE001 - skip this round; Ray reports dead workers on its own
            print(f"warning: heartbeat check failed ({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        try:
            records = self.board.progress()
        except Exception:  # noqa: BLE001 - progress is for watching: liveness goes on without it
            records = {}
        now = time.monotonic()
        running, gone, where = [], [], []
        for ref, (node, token) in list(self.pending.items()):
            if token not in beats:
                continue  # still queued: no judgement before its first beat
            count, node_id, pid, host = beats[token]
            seen = self.beats.get(token)
            if seen is None or seen[0] != count:
                self.beats[token] = seen = (count, now)
            age = now - seen[1]
            if node_id not in alive_nodes:
                reason = f"its node {node_id[:12]} ({host}) left the cluster"
            elif age > LOST_AFTER_BEATS * self.heartbeat_s:
                reason = f"no heartbeat for {age:.0f} s from pid {pid} on {host}"
            else:
                running.append(node)
                where.append((node, records.get(token)))
                continue
            try:
                self.ray.cancel(ref, force=True)  # frees its resources once Ray has killed the worker
            except Exception:  # noqa: BLE001 - its node may be gone already
                pass
            del self.pending[ref]
            del self.beats[token]
            gone.append(token)
            self.lost.append(Outcome(node, failure=Failure(failures.WORKER_LOST, f"the {node.stage} job was "
                                                           f"lost: {reason}")))
        if gone:
            self._clear(gone)  # a lost job cannot clear its own key
        if self.on_tick is not None:
            self.on_tick(running)
        if self.on_progress is not None:
            self.on_progress(where)

    def _clear(self, tokens: list[str] | None = None) -> None:
        """Drop board keys: of ``tokens``, else of the whole run."""
        try:
            self.board.clear(tokens) if tokens is not None else self.board.clear_run()
        except Exception:  # noqa: BLE001 - a stale key only costs a few bytes in the GCS
            pass

    def slots(self) -> dict[str, float]:
        return {k: v for k, v in self.ray.cluster_resources().items() if k in ("CPU", "GPU")}

    def node_capacity(self) -> dict[str, float]:
        """What one job could use at most: the largest node's CPUs and GPUs (a task
        runs on one node), and no more than the cluster has."""
        try:
            nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        except Exception:  # noqa: BLE001 - no widening rather than no run
            return {}
        total = self.slots()
        return {k: min(max((n.get(k, 0.0) for n in nodes), default=0.0), total.get(k, 0.0)) for k in ("CPU", "GPU")}

    def close(self) -> None:
        for ref in self.pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort while stopping
                pass
        self.pending.clear()
        self._clear()  # keys of cancelled jobs: a joined cluster keeps its key-value store
        stop_ray(self.ray, self.head, self.started)


def start_ray(address: str | None, num_cpus: int | None, num_gpus: int | None) -> tuple[Any, Any, bool]:
    """Connect this driver to Ray: the cluster at ``address`` (else RAY_ADDRESS),
    or an embedded local instance (orchestrator.execution.localray: loopback,
    only the processes a one-machine run uses, temp files outside the repo).
    Returns (ray, the embedded head or None, whether this call connected)."""
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

    head = None
    started = not ray.is_initialized()
    if started:
        if address:
            # Dataset locations given to this driver (run --data, RD3_DATA_*) reach the
            # cluster's workers too; an embedded instance's workers inherit them.
            data = {k: v for k, v in os.environ.items() if k.startswith("RD3_DATA_")}
            ray.init(address=address, logging_level="ERROR", log_to_driver=True,
                     runtime_env={"env_vars": data} if data else None)
        else:
            num_cpus, num_gpus = embedded_size(num_cpus, num_gpus)
            head = localray.start(ray, num_cpus, num_gpus, os.path.join(tempfile.gettempdir(), f"rd3-ray-{os.getuid()}"))
    return ray, head, started


def stop_ray(ray, head, started: bool) -> None:
    """Undo :func:`start_ray` (a cluster joined is left running; an embedded instance ends)."""
    if started:
        ray.shutdown()
        localray.stop(head)


@contextmanager
def ray_session(address: str | None, num_cpus: int | None, num_gpus: int | None):
    ray, head, started = start_ray(address, num_cpus, num_gpus)
    try:
        yield ray
    finally:
        stop_ray(ray, head, started)


def embedded_size(num_cpus: int | None, num_gpus: int | None) -> tuple[int, int]:
    """CPUs and GPUs of the embedded Ray instance: as given, else what this machine has."""
    return num_cpus or available_cpus(), num_gpus if num_gpus is not None else detect_gpus()


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


def widen(asked: Resources, node: dict[str, float]) -> Resources:
    """A critical-path job's request: every CPU of ``node`` (at least what it asked
    for) and, when it asked for part of a GPU, the whole GPU."""
    cpus = max(asked.cpus, float(int(node.get("CPU", 0.0))))
    gpus = asked.gpus
    if 0 < gpus < 1 and node.get("GPU", 0.0) >= 1:
        gpus = 1.0
    return replace(asked, cpus=cpus, gpus=gpus)


def critical(plan: Plan) -> set[str]:
    """The shared-stage nodes that every result still to run depends on (the
    teacher of a study whose cells all need it, the one synthesis of a
    single-method study): each of them alone stands between the run and any result."""
    dependents: dict[str, list[str]] = {}
    for nid, n in plan.nodes.items():
        for dep in n.deps:
            dependents.setdefault(dep, []).append(nid)
    results = {nid for nid, n in plan.nodes.items() if n.stage in RESULT_STAGES and not n.cached}
    out = set()
    for nid, n in plan.nodes.items():
        if n.cached or n.stage in RESULT_STAGES or not results:
            continue
        seen, todo, reached = {nid}, [nid], 0
        while todo:
            for child in dependents.get(todo.pop(), []):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
                    reached += child in results
        if reached == len(results):
            out.add(nid)
    return out


def execute(plan: Plan, executor, resources: ResourcesSpec | Resources,
            on_outcome: Callable[[Outcome], None], max_retries: int = 0) -> None:
    """Run every non-cached node of ``plan`` in dependency order, each with its
    node's resources (else its stage's from ``resources``), at most
    ``resources.max_concurrent`` at a time; a transient failure puts its node
    back, up to ``max_retries`` times. A critical-path job gets every CPU of a
    node (``widen``, within ``resources.max_cpus``).
    ``on_outcome`` sees every outcome, retried ones too (``retrying``), and one
    failure per node that cannot run because an upstream node failed."""
    flat = resources if isinstance(resources, Resources) else None
    cap = None if flat else resources.max_concurrent
    capacity = dict(getattr(executor, "node_capacity", dict)())
    if not flat and resources.max_cpus is not None and "CPU" in capacity:
        capacity["CPU"] = min(capacity["CPU"], float(resources.max_cpus))
    widened = critical(plan) if capacity else set()
    done = {nid for nid, n in plan.nodes.items() if n.cached}
    failed: set[str] = set()
    tries: Counter[str] = Counter()
    waiting = {nid: set(n.deps) - done for nid, n in plan.nodes.items() if not n.cached}
    dependents: dict[str, list[str]] = {}
    for nid in waiting:
        for dep in plan.nodes[nid].deps:
            dependents.setdefault(dep, []).append(nid)
    ready: deque[str] = deque()

    def submit_ready() -> None:
        while ready and (cap is None or executor.inflight() < cap):
            node = plan.nodes[ready.popleft()]
            asked = node.resources or flat or resources.for_stage(node.stage)
            executor.submit(node, widen(asked, capacity) if node.id in widened else asked)

    def release(nid: str) -> None:
        for child in dependents.get(nid, []):
            waiting[child].discard(nid)
            if not waiting[child] and child not in failed:
                ready.append(child)

    def fail_downstream(nid: str, cause: Failure) -> None:
        for child in dependents.get(nid, []):
            if child not in failed:
                failed.add(child)
                on_outcome(Outcome(plan.nodes[child], failure=cause))
                fail_downstream(child, cause)

    ready.extend(nid for nid, deps in waiting.items() if not deps)
    submit_ready()
    while executor.inflight():
        outcome = executor.next_outcome()
        nid = outcome.node.id
        tries[nid] += 1
        outcome.tries = tries[nid]
        if outcome.failure is None:
            on_outcome(outcome)
            done.add(nid)
            release(nid)
        elif outcome.failure.transient and tries[nid] <= max_retries:
            outcome.retrying = True
            on_outcome(outcome)
            ready.appendleft(nid)  # ahead of the queue: it was due already
        else:
            on_outcome(outcome)
            failed.add(nid)
            fail_downstream(nid, failures.upstream(outcome.node.stage, outcome.node.key, outcome.failure))
        submit_ready()
