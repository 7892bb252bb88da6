"""The run's progress display.

On a terminal: one permanent line per finished cell and, below them, a live
table redrawn in place: a line per running job (where its loop is, its latest
loss and accuracy, its ETA) above the status line (cells done/failed/total,
jobs done per stage, elapsed, ETA), refreshed every second so a long job does
not look like a hang. Not on a terminal (a log file, CI): one line per
finished cell, each with the counts and the ETA, and one line per job each
time the driver sees it advance (at most once per heartbeat check).

Plain ANSI (cursor up, erase) rather than tqdm or rich: the table is a few
lines, and neither is a dependency of the project.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, TextIO

from .jobprogress import describe, eta_s, fmt_duration

CLEAR = "\r\x1b[K"  # to the line's start, then erase it
ERASE_BELOW = "\x1b[J"  # erase from the cursor to the end of the screen


def _up(lines: int) -> str:
    return f"\x1b[{lines}A" if lines else ""


@dataclass
class Job:
    """A running job as the display shows it."""

    label: str  # "teacher 3f2a1b9c0d"
    stage: str
    record: dict | None  # its latest progress record (jobprogress.Reporter); None before the first
    seen_at: float  # the display's clock when this record was first seen
    eta: float | None  # seconds left in its loop, as of seen_at

    def eta_left(self, now: float) -> float | None:
        return None if self.eta is None else max(0.0, self.eta - (now - self.seen_at))

    def line(self, now: float) -> str:
        return f"  {self.label} {describe(self.record, self.eta_left(now), self.stage)}"


def _advanced(old: dict | None, new: dict | None) -> bool:
    if new is None or old is None:
        return new is not old
    return any(old.get(k) != new.get(k) for k in ("stage", "unit", "done", "total"))


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, stages: dict[str, int] | None = None,
                 refresh_s: float | None = 1.0, clock: Callable[[], float] = time.monotonic):
        """``total``: cells to run; ``stages``: stage -> jobs to run (shown on
        the status line); ``refresh_s``: redraw period on a terminal (None: only
        when something happens)."""
        self.total, self.done, self.failed = total, 0, 0
        self.stream = stream if stream is not None else sys.stdout
        self.stages = {s: n for s, n in (stages or {}).items() if n}
        self.stage_done: Counter[str] = Counter()
        self.stage_failed: Counter[str] = Counter()
        self.clock = clock
        self.start = clock()
        self.running: dict[str, Job] = {}  # node id -> the job, while it runs
        self._rows = 0  # job lines drawn above the status line (a terminal)
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.live:
            self._draw()
            if refresh_s:
                self._thread = threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True,
                                                name="rd3-progress")
                self._thread.start()

    # -- events ---------------------------------------------------------------------

    def cell(self, label: str, ok: bool, detail: str) -> None:
        """A cell finished (its post-evaluation succeeded or failed)."""
        with self._lock:
            if ok:
                self.done += 1
            else:
                self.failed += 1
            (self.stage_done if ok else self.stage_failed)["posteval"] += 1
            finished = self.done + self.failed
            status = "done" if ok else "FAILED"
            counts = f"{self.failed} failed, " if self.failed else ""
            line = (f"[{finished}/{self.total}] {status} {label} {detail}  "
                    f"({counts}elapsed {fmt_duration(self.elapsed())}, eta {self.eta()})")
            self._emit(line)

    def stage(self, stage: str, key: str, seconds: float | None = None, error: str | None = None) -> None:
        """A job of an upstream stage (teacher, synth, labels) finished. Shown on
        the status line only: the cells it feeds report any failure."""
        with self._lock:
            (self.stage_failed if error else self.stage_done)[stage] += 1
            if self.live and error:
                self._emit(f"    {stage} {key[:10]} FAILED: {error}")
            elif self.live:
                self._draw()

    def jobs(self, running: list[tuple[str, str, str, dict | None]]) -> None:
        """The jobs running now, each (node id, stage, key, its latest progress
        record or None), replacing those known before."""
        with self._lock:
            now, changed, known = self.clock(), [], {}
            for node_id, stage, key, record in running:
                job = self.running.get(node_id)
                if job is None or _advanced(job.record, record):
                    job = Job(f"{stage} {key[:10]}", stage, record, now, eta_s(record) if record else None)
                    if record is not None:
                        changed.append(job)
                known[node_id] = job
            self.running = known
            if self.live:
                self._draw()
            else:
                for job in changed:
                    self.stream.write(f"{job.line(now)}  ({self.done + self.failed}/{self.total} cells, "
                                      f"elapsed {fmt_duration(self.elapsed())}, eta {self.eta()})\n")
                self.stream.flush()

    def job_done(self, node_id: str) -> None:
        """A job finished (its outcome arrived): off the table."""
        with self._lock:
            if self.running.pop(node_id, None) is not None and self.live:
                self._draw()

    def snapshot(self) -> dict:
        """What the display shows, as data (the run's progress file for `status`)."""
        with self._lock:
            now = self.clock()
            return {"cells": {"done": self.done, "failed": self.failed, "total": self.total},
                    "status": self.status(),
                    "jobs": [{"label": j.label, "stage": j.stage, "record": j.record, "eta_s": j.eta_left(now)}
                             for j in self.running.values()]}

    def note(self, line: str) -> None:
        """A line that is not a finished cell (a job being retried), shown in both modes."""
        with self._lock:
            self._emit(line)

    def close(self) -> None:
        """Stop redrawing; leave the last status line on screen."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.live:
            with self._lock:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
                self.live = False

    # -- what is shown -----------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> str:
        finished = self.done + self.failed
        if not finished:
            return "--"
        return fmt_duration(self.elapsed() / finished * (self.total - finished))

    def status(self) -> str:
        """Counts first, then time, then stages: a narrow terminal cuts the end."""
        parts = [f"cells {self.done} done, {self.failed} failed, {self.total} total",
                 f"elapsed {fmt_duration(self.elapsed())}, eta {self.eta()}"]
        stages = []
        for stage, need in self.stages.items():
            failed = f" ({self.stage_failed[stage]} failed)" if self.stage_failed[stage] else ""
            stages.append(f"{stage} {self.stage_done[stage] + self.stage_failed[stage]}/{need}{failed}")
        if stages:
            parts.append(" ".join(stages))
        return " | ".join(parts)

    # -- output --------------------------------------------------------------------------

    def _emit(self, line: str) -> None:
        if self.live:
            # Over the table's first line; the table is drawn again below it.
            self.stream.write("\r" + _up(self._rows) + ERASE_BELOW + CLEAR + line + "\n")
            self._rows = 0
            self._draw()
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        # Cut to the terminal's width: a wrapped line cannot be redrawn in place.
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        now = self.clock()
        lines = [job.line(now)[:width] for job in self.running.values()] + [self.status()[:width]]
        self.stream.write("\r" + _up(self._rows) + ERASE_BELOW + "\n".join(CLEAR + line for line in lines))
        self._rows = len(lines) - 1
        self.stream.flush()

    def _refresh(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                if self.live:
                    self._draw()
