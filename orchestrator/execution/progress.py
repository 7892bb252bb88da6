"""The run's progress display.

On a terminal: one permanent line per finished cell and, below them, a status
line redrawn in place (cells done/failed/total, jobs done per stage, elapsed,
ETA), refreshed every second so a long job does not look like a hang. Not on a
terminal (a log file, CI): exactly one line per finished cell, nothing else,
each with the counts and the ETA.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import Counter
from typing import Callable, TextIO

CLEAR = "\r\x1b[K"  # to the line's start, then erase it


def _fmt(seconds: float) -> str:
    h, rest = divmod(int(seconds + 0.5), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


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
                    f"({counts}elapsed {_fmt(self.elapsed())}, eta {self.eta()})")
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
        return _fmt(self.elapsed() / finished * (self.total - finished))

    def status(self) -> str:
        """Counts first, then time, then stages: a narrow terminal cuts the end."""
        parts = [f"cells {self.done} done, {self.failed} failed, {self.total} total",
                 f"elapsed {_fmt(self.elapsed())}, eta {self.eta()}"]
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
            self.stream.write(CLEAR + line + "\n")
            self._draw()
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        # Cut to the terminal's width: a wrapped status line cannot be redrawn in place.
        width = shutil.get_terminal_size((100, 24)).columns
        self.stream.write(CLEAR + self.status()[: max(20, width - 1)])
        self.stream.flush()

    def _refresh(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                if self.live:
                    self._draw()
