"""Where each running job is: the progress record its loops write (worker
side, :class:`Reporter`) and what the driver makes of it (:func:`eta_s`,
:func:`describe`), and the run's progress file that `status` reads from
another shell (:func:`write_run_file`, :func:`read_run_file`).

The record travels on the heartbeat board (orchestrator.execution.worker), a
sibling key of the job's beat. The run's file is the driver's mirror of what
its display shows, since a local embedded Ray's key-value store cannot be
reached from another shell: ``OUT/<study>/progress.json``, rewritten
atomically at every heartbeat check and removed when the run ends.

Light on purpose (json, time): the worker imports it before ``import torch``.
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

REPORT_EVERY_S = 1.0  # a job writes its progress at most this often (and at each loop's start and end)
KEEP_ROWS = 64  # epoch rows a record carries: the driver writes those it has not seen (the rest come at the end)
RUN_FILE = "progress.json"


class Reporter:
    """Where a job's loops report progress (``rd3core.loop.ProgressFn``, one
    per stage: :meth:`stage`). Each call updates the job's record; the record
    is written to the board when a loop starts or ends and otherwise at most
    once per ``every_s``, so a loop may call it at every step for free (metrics
    given as tensors are read only then).

    The record (JSON): ``stage``, ``unit`` (epoch, iteration, batch), ``done``,
    ``total``, ``t`` (the worker's clock when written), ``since`` ([time, done]
    when this loop started: its rate is (done - since done) / (t - since time),
    both on the worker's clock), ``metrics`` (the latest call's numbers:
    loss, train_top1, test_top1 on evaluated epochs, ...) and ``rows`` (the
    last ``keep_rows`` epochs' metrics, with ``epoch``: what the driver writes
    as the cell's epoch rows while it runs)."""

    def __init__(self, board, token: str, every_s: float = REPORT_EVERY_S, keep_rows: int = KEEP_ROWS,
                 clock: Callable[[], float] = time.time):
        self.board, self.token, self.every_s, self.clock = board, token, every_s, clock
        self.loop: tuple | None = None  # (stage, unit, total) of the loop reporting now
        self.since = (0.0, 0)
        self.done = 0
        self.rows: deque[dict] = deque(maxlen=keep_rows)
        self.written_at = -float("inf")

    def stage(self, stage: str) -> Callable[..., None]:
        """The callback that ``stage``'s loops report to."""
        return functools.partial(self.report, stage)

    def report(self, stage: str, done: int, total: int, unit: str, **metrics: Any) -> None:
        now = self.clock()
        loop = (stage, unit, total)
        if loop != self.loop or done < self.done:  # another loop began: its rate counts from here
            self.loop, self.since = loop, (now, done)
            self.rows.clear()
        self.done = done
        if unit == "epoch" and done:
            self.rows.append(metrics)
        if 0 < done < total and now - self.written_at < self.every_s:
            return
        self.written_at = now
        record = {"stage": stage, "unit": unit, "done": done, "total": total, "t": now, "since": list(self.since),
                  "metrics": _numbers(metrics), "rows": [_numbers(r) for r in self.rows]}
        try:
            self.board.report(self.token, json.dumps(record))
        except Exception:  # noqa: BLE001 - progress is for watching: a failed write never fails the job
            pass


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are numbers (or 0-d tensors, read here), as floats."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def fmt_duration(seconds: float) -> str:
    h, rest = divmod(int(seconds + 0.5), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta_s(record: dict) -> float | None:
    """Seconds left in the record's loop at the rate it has gone since it
    started; None before its first unit is done."""
    since_t, since_done = record.get("since", (record.get("t", 0.0), 0))
    gone, elapsed = record["done"] - since_done, record.get("t", 0.0) - since_t
    if gone <= 0 or elapsed <= 0:
        return None
    return (record["total"] - record["done"]) * elapsed / gone


def describe(record: dict | None, eta: float | None, stage: str | None = None) -> str:
    """``epoch 3/10 30% loss 1.234 train 45.6% test 40.1% eta 1m20s`` (the
    latest accuracies as percentages); the loop's stage in front when it is not
    the job's own (a teacher rebuilt inside a post-evaluation)."""
    if record is None:
        return "running"
    done, total = record["done"], record["total"]
    parts = [] if record.get("stage") in (None, stage) else [f"({record['stage']})"]
    parts.append(f"{record['unit']} {done}/{total} {100 * done / max(total, 1):.0f}%")
    metrics = record.get("metrics", {})
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4g}")
    for name, short in (("train_top1", "train"), ("test_top1", "test"), ("heldout_top1", "heldout")):
        if name in metrics:
            parts.append(f"{short} {100 * metrics[name]:.1f}%")
    parts.append(f"eta {fmt_duration(eta) if eta is not None else '--'}")
    return " ".join(parts)


def run_file(out: Path, study: str) -> Path:
    return Path(out) / study / RUN_FILE


def write_run_file(path: Path, snapshot: dict) -> None:
    """Atomically replace the run's progress file (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot))
    os.replace(tmp, path)


def read_run_file(path: Path) -> dict | None:
    try:
        snapshot = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return snapshot if isinstance(snapshot, dict) else None
