"""What each job asks the scheduler for: the study's ``resources:`` block.

Study-wide defaults (``cpus``, ``gpus``, ``memory``) apply to every stage; a
stage block (``teacher``, ``synth``, ``labels``, ``posteval``) overrides any of
them for that stage's jobs. ``max_cpus``/``max_gpus`` say how much the study may
use at once (a job that asks for more could never be scheduled: Ray would leave
it pending forever, so it is refused up front), and ``max_concurrent`` caps the
jobs in flight. ``checkpoint_every`` says how often a long job saves its
resumable state (docs/EXECUTION.md); like everything here it says how to run,
not what is computed, so it never enters a cell id or a stage key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from rd3core.config import bounded

RESOURCE_STAGES = ("teacher", "synth", "labels", "posteval")

# Bounds of a request: Ray counts resources in units of 0.0001; beyond these
# counts no cluster exists, so a larger number is a typo.
RAY_UNIT = 0.0001
MAX_CPUS, MAX_GPUS = 100_000, 10_000

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


DEFAULT_CHECKPOINT_EVERY = 300.0  # seconds
_INTERVAL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$", re.IGNORECASE)
_INTERVAL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_interval(value: float | str | bool | None) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"5m"``, ``"1h"``;
    0, ``off`` or ``false`` (YAML reads a bare ``off`` as false): 0, never.
    ValueError with what was expected otherwise."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "false")):
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected seconds >= 0 (0: off), got {value}")
        return float(value)
    match = _INTERVAL_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected seconds or a duration such as '90s', '5m' or '1h', or 'off', got {value!r}")
    return float(match.group(1)) * _INTERVAL_UNITS[(match.group(2) or "").lower()]


def parse_memory(value: int | str | None) -> int | None:
    """Bytes from an int or a string such as ``"8GB"``, ``"512MiB"``, ``"2.5G"``;
    ValueError with what was expected otherwise."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"expected a positive size, got {value}")
        return value
    match = _MEMORY_RE.match(str(value))
    if not match:
        raise ValueError(f"expected bytes or a size such as '8GB' or '512MiB', got {value!r}")
    unit = (match.group(2) or "").upper().rstrip("B")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"expected a positive size, got {value!r}")
    return size


@dataclass(frozen=True)
class Resources:
    """What one job asks for (resolved: no inheritance left)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None  # bytes; None: no reservation
    checkpoint_every: float = DEFAULT_CHECKPOINT_EVERY  # seconds between a job's checkpoints; 0: none

    @property
    def threads(self) -> int:
        # Same torch thread count in every executor, so the numbers match.
        return max(1, int(self.cpus))


def _job_problems(cpus: float | None, gpus: float | None, memory: int | str | None,
                  checkpoint_every: float | str | bool | None):
    if cpus is not None and cpus < RAY_UNIT:
        yield "cpus", f"expected a number of CPUs >= {RAY_UNIT} per job (Ray's smallest unit), got {cpus}"
    if gpus is not None:
        if gpus < 0 or 0 < gpus < RAY_UNIT:
            yield "gpus", f"expected 0 or a number of GPUs >= {RAY_UNIT} per job (Ray's smallest unit), got {gpus}"
        elif gpus > 1 and gpus != int(gpus):
            # Ray shares a GPU only below one; above one it must be whole GPUs.
            yield "gpus", f"expected a fraction below 1 or a whole number of GPUs, got {gpus}"
    try:
        parse_memory(memory)
    except ValueError as exc:
        yield "memory", str(exc)
    if checkpoint_every is not None:
        try:
            parse_interval(checkpoint_every)
        except ValueError as exc:
            yield "checkpoint_every", str(exc)


@dataclass(frozen=True)
class StageResources:
    """One stage's overrides; None inherits the study-wide value."""

    cpus: float | None = bounded(None, le=MAX_CPUS)
    gpus: float | None = bounded(None, le=MAX_GPUS)
    memory: int | str | None = None
    checkpoint_every: float | bool | str | None = None

    def validate(self):
        yield from _job_problems(self.cpus, self.gpus, self.memory, self.checkpoint_every)


@dataclass(frozen=True)
class ResourcesSpec:
    cpus: float = bounded(1.0, le=MAX_CPUS)  # per job, every stage unless the stage says otherwise
    gpus: float = bounded(0.0, le=MAX_GPUS)  # per job; a fraction below 1 lets jobs share a GPU
    memory: int | str | None = None  # per job: bytes or '8GB', '512MiB'; None: no reservation
    # How often a long job saves its resumable state: seconds, '90s', '5m'; 0 or 'off': never.
    checkpoint_every: float | bool | str = DEFAULT_CHECKPOINT_EVERY
    max_concurrent: int | None = bounded(None, ge=1, le=1_000_000)  # jobs in flight at once (None: as many as fit)
    max_cpus: int | None = bounded(None, ge=1, le=MAX_CPUS)  # the most CPUs the study may use at once
    max_gpus: int | None = bounded(None, ge=0, le=MAX_GPUS)  # the most GPUs the study may use at once
    teacher: StageResources = field(default_factory=StageResources)
    synth: StageResources = field(default_factory=StageResources)
    labels: StageResources = field(default_factory=StageResources)
    posteval: StageResources = field(default_factory=StageResources)

    def validate(self):
        yield from _job_problems(self.cpus, self.gpus, self.memory, self.checkpoint_every)
        for kind, limit in {"cpus": self.max_cpus, "gpus": self.max_gpus}.items():
            if limit is not None and limit >= 0:
                for path, who, value in self.asks_above(kind, limit):
                    yield path, (f"{who} job asks for {value:g} {kind.upper()[:-1]}s but the study "
                                 f"allows at most max_{kind}={limit}: such a job could never start")

    def asks_above(self, kind: str, limit: float):
        """(key path, whose jobs, value) of every ``kind`` ("cpus"/"gpus") request
        above ``limit``: the study-wide default once, then each stage that sets its own."""
        asks = [("", "every", getattr(self, kind))] + [
            (f"{stage}.", stage, getattr(getattr(self, stage), kind)) for stage in RESOURCE_STAGES]
        for prefix, who, value in asks:
            if value is not None and value > limit:
                yield f"{prefix}{kind}", who, value

    def capacity_problems(self, cpus: float, gpus: float):
        """(key path, message) for every request that a Ray instance with
        ``cpus`` CPUs and ``gpus`` GPUs could never schedule (Ray would leave
        such a job pending forever)."""
        for kind, total in {"cpus": cpus, "gpus": gpus}.items():
            for path, who, value in self.asks_above(kind, total):
                yield path, (f"{who} job asks for {value:g} {kind.upper()[:-1]}s but this machine's Ray instance "
                             f"has {total:g} (--num-{kind}): such a job could never start; run it where the "
                             f"{kind.upper()[:-1]}s are (--address), or with --executor local (in-process, on "
                             f"the GPU when there is one)")

    def _merge(self, own: StageResources) -> Resources:
        def pick(name):
            value = getattr(own, name)
            return getattr(self, name) if value is None else value
        memory = pick("memory")
        try:
            memory = parse_memory(memory)
        except ValueError:
            memory = None  # reported by validate()
        try:
            checkpoint_every = parse_interval(pick("checkpoint_every"))
        except ValueError:
            checkpoint_every = DEFAULT_CHECKPOINT_EVERY  # reported by validate()
        return Resources(cpus=float(pick("cpus")), gpus=float(pick("gpus")), memory=memory,
                         checkpoint_every=checkpoint_every)

    def for_stage(self, stage: str) -> Resources:
        """The resolved request of one job of ``stage`` (stages without their own
        block, such as ones added later, get the study-wide defaults)."""
        own = getattr(self, stage, None)
        return self._merge(own if isinstance(own, StageResources) else StageResources())
