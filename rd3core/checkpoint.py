"""Checkpoints of the long loops (teacher training and post-evaluation in
:func:`rd3core.loop.train`, SRe2L/CDA recovery in :func:`rd3core.synth.sre2l.recover`),
so that a job killed part-way resumes where it was instead of starting over.

A loop given a :class:`Checkpoint` calls

- ``load()`` once before its first step: the newest saved state, or None;
- ``due()`` at each boundary (an epoch, an iteration): has ``interval_s`` passed
  since the last save (or since the checkpoint was made)? One clock read, so a
  checkpoint that is never due (interval 0 or None) costs nothing;
- ``save(state, at)`` when due, ``at`` saying where in human words ("epoch 3").

Resuming is exact: a loop saves everything its next step reads (weights,
optimiser, EMA, its own generators, its position) and :meth:`Checkpoint.save`
adds the process-wide random states (torch CPU and CUDA, numpy, Python), which
:meth:`Checkpoint.load` puts back. On the CPU with the same thread count a
resumed run ends bit-identical to one that was never interrupted. CPU reductions
round differently with another thread count, so a checkpoint made under another
count (or another torch) is ignored and the loop starts afresh.

Where the bytes live is the caller's business: any object with ``read() ->
bytes | None`` and ``write(data)`` (``data`` bytes-like), where a write is atomic (a reader sees
the previous checkpoint or the new one, never a torn file).
:meth:`rd3core.artifacts.ArtifactStore.checkpoint` gives one in the artifact store.
"""
from __future__ import annotations

import io
import random
import time
from typing import Any, Protocol

import numpy as np
import torch

FORMAT = 1


class CheckpointStore(Protocol):
    def read(self) -> bytes | None: ...

    def write(self, data: bytes | memoryview) -> None: ...


def _guard() -> dict[str, Any]:
    """What must match for a resumed run to give the same numbers."""
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def random_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              # as a tensor: a plain numpy array does not pass torch.load(weights_only=True)
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def decode(data: bytes) -> dict[str, Any]:
    """A checkpoint file's content: ``at``, ``guard``, ``random`` and the loop's ``state``."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def saved_at(path) -> str | None:
    """Where the checkpoint file at ``path`` was taken ("epoch 3"), without
    reading its tensors (memory-mapped); None when it cannot be read."""
    try:
        return str(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["at"])
    except Exception:  # noqa: BLE001 - a listing shows what it can
        return None


class Checkpoint:
    """The hook a loop saves to and resumes from; see the module docstring.
    ``interval_s`` 0 or None: never due (nothing is ever written)."""

    def __init__(self, store: CheckpointStore, interval_s: float | None):
        self.store = store
        self.interval_s = interval_s or 0.0
        self.last = time.monotonic()
        self.resumed_at: str | None = None  # where load() resumed from ("epoch 3"), None: from the start
        self.ignored: str | None = None  # why a checkpoint found was not used
        self.saves = 0
        self.save_s = 0.0  # time spent in save(), all saves together

    def due(self) -> bool:
        return self.interval_s > 0 and time.monotonic() - self.last >= self.interval_s

    def save(self, state: dict[str, Any], at: str) -> None:
        t0 = time.perf_counter()
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "at": at, "guard": _guard(), "random": random_states(), "state": state},
                   buffer)
        self.store.write(buffer.getbuffer())  # a view, not a copy: checkpoints can be large
        self.saves += 1
        self.save_s += time.perf_counter() - t0
        self.last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved loop state (the random states already restored), or None."""
        data = self.store.read()
        if data is None:
            return None
        try:
            saved = decode(data)
        except Exception as exc:  # noqa: BLE001 - unreadable (written by other code): start afresh
            self.ignored = f"unreadable ({type(exc).__name__}: {exc})"
            return None
        if saved.get("format") != FORMAT or saved.get("guard") != _guard():
            self.ignored = f"made under {saved.get('guard')}, this run is {_guard()}"
            return None
        set_random_states(saved["random"])
        self.resumed_at = saved["at"]
        self.last = time.monotonic()
        return saved["state"]
