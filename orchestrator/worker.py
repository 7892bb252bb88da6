"""What wraps every job where it runs (a Ray worker, or the driver itself with
``--executor local``): heartbeats, the job's memory limit, and failures
returned as data.

- Heartbeats: a thread sends ``beat(token, node, pid, host)`` to the run's
  :class:`Heartbeats` actor every ``period`` seconds while the job runs. The
  driver reads them to record liveness on the attempt rows and to declare a job
  lost when its beats stop (its process is frozen, its machine gone or cut
  off) or its node leaves the cluster; Ray alone reports a worker that *died*,
  not one that stopped answering.
- Memory: a job with ``resources.memory`` and no GPU runs under an address-space
  cap (RLIMIT_AS) of that many bytes above what its process had mapped when the
  job started; allocations past it fail inside the job (a clean, recorded
  MemoryError) instead of the kernel's OOM killer taking the worker (or the
  machine). It caps virtual memory, which a CPU job's allocations track
  closely; GPU jobs are not capped (CUDA maps large virtual ranges).
- Failures: any exception of the job comes back as a :class:`Failure` with the
  worker's own traceback (no exception crosses the wire, so nothing depends on
  unpickling the job's exception classes on the driver).

This module imports nothing heavy at import time: the heartbeat actor's worker
imports it and should not pay for torch.
"""
from __future__ import annotations

import os
import resource
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from . import failures


class Heartbeats:
    """The run's heartbeat board, a Ray actor on the driver's node: when each
    job token last beat (the actor's own clock, so clocks of other machines do
    not matter), from which node, process and host."""

    def __init__(self):
        self.seen: dict[str, tuple[float, str, int, str]] = {}

    def beat(self, token: str, node: str, pid: int, host: str) -> None:
        self.seen[token] = (time.monotonic(), node, pid, host)

    def snapshot(self, forget: list[str] | tuple = ()) -> dict[str, tuple[float, str, int, str]]:
        """token -> (seconds since its last beat, node id, pid, host); first
        drops the tokens the driver no longer waits for."""
        for token in forget:
            self.seen.pop(token, None)
        now = time.monotonic()
        return {t: (now - at, node, pid, host) for t, (at, node, pid, host) in self.seen.items()}


@contextmanager
def heartbeat(board, token: str, period: float):
    """Beat to ``board`` (an actor handle; None: no heartbeats) until the block ends."""
    if board is None:
        yield
        return
    import ray

    node = ray.get_runtime_context().get_node_id()
    who = (node, os.getpid(), socket.gethostname())
    stop = threading.Event()

    def loop() -> None:
        # Never ray.get here: a task blocked in ray.get lends its CPU to Ray,
        # which then starts one more job (and worker) than there are CPUs.
        while True:
            try:
                board.beat.remote(token, *who)
            except Exception:  # noqa: BLE001 - the board is gone (the run is ending): the job goes on
                return
            if stop.wait(period):
                return

    thread = threading.Thread(target=loop, name="rd3-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def mapped_bytes() -> int | None:
    """The process's virtual memory size (Linux), None where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def memory_limit(limit: int | None):
    """Cap the process's address space at ``limit`` bytes above what it maps
    now, until the block ends (then the previous limit is restored: Ray reuses
    the worker for other jobs)."""
    base = mapped_bytes() if limit else None
    if base is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = base + limit
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            cap = min(cap, bound)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _out_of_memory(exc: BaseException) -> bool:
    # numpy raises MemoryError; torch's CPU allocator a RuntimeError that says so.
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def run_job(stage: str, key: str, payload: dict, store_root: str, threads: int, memory: int | None = None,
            gpus: float = 0.0, board=None, token: str = "", period: float = 5.0) -> dict[str, Any]:
    """Run one plan node (orchestrator.jobs.run_node) under the wrapping above.
    Returns the job's result, or ``{"failure": {...}, "wall_s": ...}``; both
    with ``job`` = when (epoch seconds) and in which process it ran."""
    t0, started = time.perf_counter(), time.time()
    with heartbeat(board, token, period):
        from .jobs import run_node  # here, not at import: see the module docstring

        limit = memory if memory and not gpus else None
        try:
            with memory_limit(limit):
                out = run_node(stage, key, payload, store_root, threads)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, classified by failures
            failure = failures.from_exception(exc, traceback.format_exc())
            if limit and _out_of_memory(exc):
                failure = failures.Failure(failures.MEMORY, f"the {stage} job went over its memory limit "
                                           f"(resources.memory: {limit / 2**20:.0f} MiB): {failure}",
                                           failure.traceback)
            out = {"failure": asdict(failure), "wall_s": time.perf_counter() - t0, "host": socket.gethostname()}
    out["job"] = {"start": started, "end": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    return out
