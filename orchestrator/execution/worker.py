"""What wraps every job where it runs (a Ray worker, or the driver itself with
``--executor local``): heartbeats, the job's memory limit, and failures
returned as data.

- Heartbeats: a thread rewrites the job's key on the run's board (:class:`Board`
  in the cluster's key-value store, or :class:`FileBoard`, files in the shared
  output folder, where that store is not known to work) every ``period``
  seconds while the job runs. The driver reads them to
  record liveness on the attempt rows and to declare a job lost when its
  beats stop (its process is frozen, its machine gone or cut off) or its node
  leaves the cluster; Ray alone reports a worker that *died*, not one that
  stopped answering.
- Progress: the job's loops (teacher epochs, synthesis iterations, stored-label
  batches, post-evaluation epochs) report to a :class:`Reporter`, which writes
  a small JSON record to a sibling key of the job's beat on the same board, at
  most once a second (and at each loop's start and end). The driver reads it
  with the beats: the display's per-job fraction and ETA, the cell's epoch rows
  written as they arrive. A record is only ever read, never needed: liveness
  is the beats' alone.
- Memory: a job with ``resources.memory`` and no GPU runs under an address-space
  cap (RLIMIT_AS) of that many bytes above what its process had mapped when the
  job started; allocations past it fail inside the job (a clean, recorded
  MemoryError) instead of the kernel's OOM killer taking the worker (or the
  machine). It caps virtual memory, which a CPU job's allocations track
  closely; GPU jobs are not capped (CUDA maps large virtual ranges).
- Failures: any exception of the job comes back as a :class:`Failure` with the
  worker's own traceback (no exception crosses the wire, so nothing depends on
  unpickling the job's exception classes on the driver).

This module imports nothing heavy at import time, so that a job's heartbeats
start before its worker's first ``import torch`` (seconds on a small machine).
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable
from urllib.parse import quote, unquote

from . import failures
from .jobprogress import Reporter


NAMESPACE = b"rd3-heartbeats"
PROGRESS_NAMESPACE = b"rd3-progress"  # the jobs' progress records, keyed as their beats
BOARD_ENV = "RD3_HEARTBEATS"  # "files": heartbeats through files even where the key-value store works


def _parse_beat(value: str) -> tuple[int, str, int, str]:
    count, node, pid, host = value.split(" ", 3)
    return int(count), node, int(pid), host


@dataclass(frozen=True)
class Board:
    """A run's heartbeat board in the Ray cluster's own key-value store (its
    GCS, ``ray.experimental.internal_kv``, where Ray's libraries keep such
    small state): one key ``<run>/<token>`` per running job, holding
    ``<count> <node id> <pid> <host>``; each beat rewrites it with the count one
    higher. The driver reads every key of its run at each check and times a
    job by when it last saw the count change, on its own clock, so the clocks
    of other machines do not matter. Not an actor: an actor is one more worker
    process, which on a small machine takes a prestarted worker and the CPU
    just while the first jobs start.

    The store's functions are underscore names of Ray (no public key-value API
    exists); :func:`choose_board` uses this board only where they are known to
    work and otherwise a :class:`FileBoard`."""

    run: str

    @property
    def prefix(self) -> bytes:
        return f"{self.run}/".encode()

    def key(self, token: str) -> bytes:
        return self.prefix + token.encode()

    def beat(self, token: str, count: int, node: str, pid: int, host: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key(token), f"{count} {node} {pid} {host}", overwrite=True,
                                     namespace=NAMESPACE)

    def report(self, token: str, record: str) -> None:
        """Rewrite the job's progress record (JSON text, see :class:`Reporter`)."""
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key(token), record, overwrite=True, namespace=PROGRESS_NAMESPACE)

    def clear(self, tokens: list[str]) -> None:
        """Drop the jobs' beats and progress records."""
        from ray.experimental import internal_kv

        for token in tokens:
            for namespace in (NAMESPACE, PROGRESS_NAMESPACE):
                internal_kv._internal_kv_del(self.key(token), namespace=namespace)

    def clear_run(self) -> None:
        """Drop every key of the run (those of jobs that were cancelled or lost)."""
        from ray.experimental import internal_kv

        for namespace in (NAMESPACE, PROGRESS_NAMESPACE):
            internal_kv._internal_kv_del(self.prefix, del_by_prefix=True, namespace=namespace)

    def read(self) -> dict[str, tuple[int, str, int, str]]:
        """token -> (beat count, node id, pid, host) of every job that has beaten
        and not cleared its key: two calls to the GCS, whatever the number of jobs."""
        from ray.experimental import internal_kv

        gcs, prefix = internal_kv.internal_kv_get_gcs_client(), self.prefix
        keys = gcs.internal_kv_keys(prefix, NAMESPACE)
        return {key[len(prefix):].decode(): _parse_beat(value.decode())
                for key, value in (gcs.internal_kv_multi_get(keys, NAMESPACE) if keys else {}).items()}

    def progress(self) -> dict[str, dict]:
        """token -> the latest progress record of every job that has reported one."""
        from ray.experimental import internal_kv

        gcs, prefix = internal_kv.internal_kv_get_gcs_client(), self.prefix
        keys = gcs.internal_kv_keys(prefix, PROGRESS_NAMESPACE)
        found = gcs.internal_kv_multi_get(keys, PROGRESS_NAMESPACE) if keys else {}
        return {key[len(prefix):].decode(): record for key, value in found.items()
                if (record := _parse_record(value.decode())) is not None}


@dataclass(frozen=True)
class FileBoard:
    """The same board as files: ``<folder>/<run>/<token>``, one per running job,
    each beat an atomic rewrite (temporary file + ``os.replace``); progress
    records likewise in ``<folder>/<run>.progress/<token>`` (a sibling folder:
    readers of the beats see only beats). Plain POSIX,
    so it works under any Ray release and over a Ray Client (``ray://``)
    connection, whose driver has no GCS client; it needs what the artifact store
    already needs, a folder every worker and the driver share (``--out``)."""

    folder: str
    run: str

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.run)

    @property
    def progress_path(self) -> str:
        return self.path + ".progress"

    def file(self, token: str, folder: str | None = None) -> str:
        return os.path.join(folder or self.path, quote(token, safe=""))

    def beat(self, token: str, count: int, node: str, pid: int, host: str) -> None:
        _write_atomically(self.path, self.file(token), f"{count} {node} {pid} {host}")

    def report(self, token: str, record: str) -> None:
        _write_atomically(self.progress_path, self.file(token, self.progress_path), record)

    def clear(self, tokens: list[str]) -> None:
        for token in tokens:
            for folder in (self.path, self.progress_path):
                try:
                    os.unlink(self.file(token, folder))
                except FileNotFoundError:
                    pass

    def clear_run(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.progress_path, ignore_errors=True)

    def read(self) -> dict[str, tuple[int, str, int, str]]:
        return _read_folder(self.path, _parse_beat)

    def progress(self) -> dict[str, dict]:
        return {token: record for token, record in _read_folder(self.progress_path, _parse_record).items()
                if record is not None}


def _write_atomically(folder: str, target: str, text: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, target)


def _read_folder(folder: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """token -> parse(text) of every file in ``folder`` (none when it does not exist)."""
    out = {}
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return out
    for name in names:
        if name.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(folder, name)) as fh:
                out[unquote(name)] = parse(fh.read())
        except (FileNotFoundError, ValueError):  # cleared, or caught between create and write
            continue
    return out


def _parse_record(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def choose_board(ray, run: str, folder: str, address: str | None, tested: bool) -> tuple[Board | FileBoard, str | None]:
    """The run's board and, when it is files, a line for the log saying why.
    The key-value store where it is known to work (the tested Ray release, a
    driver connected to the GCS, a probe write and read back); files otherwise,
    so that a Ray upgrade or a ``ray://`` address costs speed, never liveness."""
    files = FileBoard(folder, run)
    if os.environ.get(BOARD_ENV, "").lower() == "files":
        return files, f"heartbeats through files under {files.path} ({BOARD_ENV}=files)"
    if address and address.startswith("ray://"):
        return files, f"heartbeats through files under {files.path} (a Ray Client driver has no GCS key-value store)"
    if not tested:
        return files, f"heartbeats through files under {files.path} (Ray {ray.__version__} is not the tested release)"
    board = Board(run)
    try:
        board.beat("probe", 0, "", 0, "")
        seen = board.read()
        board.clear(["probe"])
        if "probe" not in seen:
            raise RuntimeError("a probe beat was not read back")
    except Exception as exc:  # noqa: BLE001 - internals that changed or are missing: files still work
        return files, (f"heartbeats through files under {files.path} (the cluster's key-value store failed: "
                       f"{type(exc).__name__}: {exc})")
    return board, None


@contextmanager
def heartbeat(board: Board | FileBoard | None, token: str, period: float):
    """Beat to ``board`` (None: no heartbeats) until the block ends, then clear the job's key."""
    if board is None:
        yield
        return
    import ray

    who = (ray.get_runtime_context().get_node_id(), os.getpid(), socket.gethostname())
    stop = threading.Event()

    def loop() -> None:
        # A put is a plain call to the GCS; never ray.get here: a task blocked
        # in ray.get lends its CPU to Ray, which then starts one more job (and
        # worker) than there are CPUs.
        for count in itertools.count(1):
            try:
                board.beat(token, count, *who)
            except Exception:  # noqa: BLE001 - the cluster is going away (the run is ending): the job goes on
                return
            if stop.wait(period):
                return

    thread = threading.Thread(target=loop, name="rd3-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=max(period, 1.0))  # so that no beat lands after the key is cleared
        try:
            board.clear([token])
        except Exception:  # noqa: BLE001 - the driver clears the run's keys at its end anyway
            pass


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
            gpus: float = 0.0, checkpoint_every: float | None = None, board: Board | FileBoard | None = None,
            token: str = "", period: float = 5.0, report_to=None) -> dict[str, Any]:
    """Run one plan node (orchestrator.execution.jobs.run_node) under the wrapping above,
    checkpointing every ``checkpoint_every`` seconds (None or 0: never).
    Returns the job's result, or ``{"failure": {...}, "wall_s": ...}``; both
    with ``job`` = when (epoch seconds) and in which process it ran.
    ``report_to``: where the job's progress records go when it has no board (an
    object with ``report(token, record)``: the in-process executor's relay)."""
    t0, started = time.perf_counter(), time.time()
    with heartbeat(board, token, period):
        from .jobs import run_node  # here, not at import: see the module docstring

        limit = memory if memory and not gpus else None
        reports = board if board is not None else report_to
        report = Reporter(reports, token).stage if reports is not None else None
        try:
            with memory_limit(limit):
                out = run_node(stage, key, payload, store_root, threads, checkpoint_every=checkpoint_every,
                               report=report)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, classified by failures
            failure = failures.from_exception(exc, traceback.format_exc())
            if limit and _out_of_memory(exc):
                failure = failures.Failure(failures.MEMORY, f"the {stage} job went over its memory limit "
                                           f"(resources.memory: {limit / 2**20:.0f} MiB): {failure}",
                                           failure.traceback)
            out = {"failure": asdict(failure), "wall_s": time.perf_counter() - t0, "host": socket.gethostname()}
    out["job"] = {"start": started, "end": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
                  "threads": max(1, int(threads))}
    return out
