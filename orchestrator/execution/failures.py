"""What a failed job was, and whether running it again could help: the one
place that decides (docs/EXECUTION.md, "Failures").

A failure is named by the exception's qualified type (``ValueError`` for
builtins, ``rd3core.loop.NonFiniteLoss``, ``ray.exceptions.WorkerCrashedError``)
and its message; that pair is what the attempt row stores (``error_type``,
``error_message``), so the same rule decides in the run that saw the exception
(retry now, up to ``--max-retries``) and in a later run that only reads the
database (rerun by default, or only with ``--retry-failed``):

- *transient*: the job did not fail, its machine did: the worker process died
  (killed, segfault, the kernel's OOM killer), Ray's memory monitor killed it
  because the node ran short, the node died or stopped answering heartbeats,
  a Ray system error, GPU memory taken by other jobs on a shared GPU (CUDA out
  of memory). Retried.
- *deterministic*: everything else, i.e. exceptions from our code or the
  study's settings (a corrupt external set, a NaN/inf loss, a job over its own
  memory limit). The same job would fail the same way: never retried
  automatically; ``--retry-failed`` reruns them (after a fix).
- *stopped*: the driver was stopped (Ctrl-C, SIGTERM, SIGKILL) while the job
  ran; not the job's fault: a plain rerun runs it again.

A cell whose upstream stage failed fails with ``UpstreamFailed`` and a message
that embeds the upstream's own failure, so it is classified like that failure.
"""
from __future__ import annotations

from dataclasses import dataclass

UPSTREAM = "UpstreamFailed"
INTERRUPTED = "Interrupted"  # the driver was stopped (Ctrl-C, SIGTERM) while the job ran
DRIVER_STOPPED = "DriverStopped"  # the driver died (SIGKILL, crash): set by db.records.abandon_attempts
WORKER_LOST = "WorkerLost"  # the job's heartbeats stopped, or its node left the cluster
MEMORY = "MemoryError"  # the job went over its own memory limit (resources.memory)

_RAY = "ray.exceptions."
TRANSIENT = frozenset({WORKER_LOST} | {_RAY + name for name in (
    "WorkerCrashedError",  # the worker process died: killed, segfault, the kernel's OOM killer
    "NodeDiedError", "LocalRayletDiedError",
    "OutOfMemoryError",  # Ray's memory monitor killed the worker: the node as a whole ran short
    "RaySystemError", "RpcError", "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError",
    "ObjectReconstructionFailedError",
    "TaskCancelledError",  # cancelled by someone else (the driver forgets the jobs it cancels)
)})
STOPPED = frozenset({INTERRUPTED, DRIVER_STOPPED})
# GPU memory is shared with other jobs (fractional GPUs) and other processes:
# the same job may fit next time. Host memory under the job's own limit is not.
_CUDA_OOM = ("CUDA out of memory", "CUDA error: out of memory")


@dataclass(frozen=True)
class Failure:
    type: str
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type

    @property
    def transient(self) -> bool:
        return is_transient(self.type, self.message)

    @property
    def kind(self) -> str:
        return kind(self.type, self.message)


def type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def from_exception(exc: BaseException, traceback: str | None = None) -> Failure:
    return Failure(type_name(exc), str(exc), traceback)


def upstream(stage: str, key: str, failure: Failure) -> Failure:
    """The failure of a job whose upstream ``stage`` job failed."""
    return Failure(UPSTREAM, f"{stage} {key[:10]} failed: {failure}", failure.traceback)


def _cause(error_type: str, message: str) -> tuple[str, str]:
    """The failure an UpstreamFailed message embeds (nested ones too)."""
    while error_type == UPSTREAM and " failed: " in message:
        inner = message.split(" failed: ", 1)[1]
        head, sep, rest = inner.partition(": ")
        error_type, message = (head, rest) if sep else (inner, "")
    return error_type, message


def kind(error_type: str | None, message: str | None) -> str:
    """'transient', 'deterministic' or 'stopped'."""
    error_type, message = _cause(error_type or "", message or "")
    if error_type in STOPPED:
        return "stopped"
    if error_type in TRANSIENT or any(text in message for text in _CUDA_OOM):
        return "transient"
    return "deterministic"


def is_transient(error_type: str | None, message: str | None) -> bool:
    """Retry it now (up to --max-retries)."""
    return kind(error_type, message) == "transient"


def rerun_by_default(error_type: str | None, message: str | None) -> bool:
    """Does a plain rerun of the study run a cell whose last attempt failed so?"""
    return kind(error_type, message) != "deterministic"
