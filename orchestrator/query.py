"""`query` and `status`: read the results database, never write it.

Both open the database read-only (the engine itself cannot write) and refuse a
schema other than the one this code reads, with a message saying what to do.
`status` also shows where the running jobs of a run in progress are, from the
progress file its driver keeps in the results folder (execution.jobprogress).
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from db import queries
from db.schema import check_revision, explain, head_revision
from db.session import DatabaseError, describe, make_engine, results_url

from .execution.jobprogress import describe as describe_job, read_run_file, run_file

STALE_S = 60.0  # a progress file not rewritten for this long may be a stopped run's


def open_read_only(db: str | None, out) -> Engine:
    engine = make_engine(results_url(db, out), read_only=True)
    current = check_revision(engine)
    if current is None:
        raise DatabaseError(f"{describe(engine.url)} holds no results schema (not an rd3 results database?)")
    if current != head_revision():
        raise DatabaseError(f"the results database {describe(engine.url)} has schema revision {current!r}, older "
                            f"than this code's {head_revision()!r}; any `python -m orchestrator run` with this "
                            f"database upgrades it")
    return engine


def parse_where(items: list[str]) -> dict[str, list[str]]:
    """FACTOR=VALUE items; a factor given twice keeps either level. Values stay
    text here: results_frame types them by the factor's stored kind."""
    where: dict[str, list[str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise queries.QueryError(f"--where {item!r}: expected FACTOR=VALUE, e.g. protocol.epochs=50")
        where.setdefault(name.strip(), []).append(value.strip())
    return where


def _json_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None  # in a frame NaN also stands for "missing"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, (datetime, pd.Timestamp)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return _json_value(value.item())
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):  # a BLOB (e.g. cell.metric_values): hex, as SQL's hex()
        return bytes(value).hex()
    return value


def emit(frame: pd.DataFrame, fmt: str, stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "csv":
        frame.to_csv(stream, index=False)
    elif fmt == "json":
        records = [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
        stream.write(json.dumps(records, indent=1, allow_nan=False) + "\n")
    elif frame.empty:
        stream.write("(no rows)\n")
    else:
        stream.write(frame.to_string(index=False) + "\n")


def run_query(args) -> int:
    engine = open_read_only(args.db, args.out)
    try:
        if args.sql:
            if args.study or args.where:
                raise queries.QueryError("--sql runs on its own: drop --study/--where (filter in the SQL)")
            frame = queries.run_sql(engine, args.sql)
        elif args.study:
            queries.require_study(engine, args.study)
            frame = queries.results_frame(engine, args.study, where=parse_where(args.where))
        else:
            if args.where:
                raise queries.QueryError("--where needs --study NAME (the studies are listed without --study)")
            frame = queries.studies_frame(engine)
        emit(frame, args.format)
    except DBAPIError as exc:
        raise explain(engine, exc) from None
    finally:
        engine.dispose()
    return 0


def show_status(args, stream=None) -> int:
    stream = stream or sys.stdout
    engine = open_read_only(args.db, args.out)
    try:
        study = queries.require_study(engine, args.study)
        counts = queries.status_counts(engine, args.study)
        attempts = queries.attempts_frame(engine, args.study)
        searches = search_lines(engine, args.study)
    except DBAPIError as exc:
        raise explain(engine, exc) from None
    finally:
        engine.dispose()
    total = sum(counts.values())
    state = f"finished {study.finished_at:%Y-%m-%d %H:%M:%S} UTC" if study.finished_at else "not finished"
    print(f"study {study.name}: {total} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" ({state})", file=stream)
    for line in searches:
        print(line, file=stream)
    show_jobs(args.out, study.name, stream)
    for status in ("running", "failed"):
        rows = attempts[attempts.status == status]
        if rows.empty:
            continue
        print(f"{status}:", file=stream)
        for r in rows.itertuples(index=False):
            host, device = (v if isinstance(v, str) else None for v in (r.host, r.device))  # None reads as NaN
            where = f" on {host}" + (f" ({device})" if device else "") if host else ""
            since = f" since {r.started_at:%Y-%m-%d %H:%M:%S} UTC" if pd.notna(r.started_at) else ""
            error = f": {r.error_type}: {r.error_message}" if status == "failed" else ""
            print(f"  {r.cell_key[:10]} seed={r.seed} attempt {r.number}{where}{since}{error}", file=stream)
    return 0


def search_lines(engine, study: str) -> list[str]:
    """A tuned design's searches: trials spent of the budget, pruned (at which
    epochs), failed and running, and the trial chosen so far."""
    from .analysis.tuning import search_budget, search_summary, trials_frame, values_text

    trials = trials_frame(engine, study)
    if trials.empty:
        return []
    lines = []
    for method, s in search_summary(trials, search_budget(queries.study_spec_text(engine, study))).items():
        pruned = ", ".join(f"{n} at epoch {e}" for e, n in s["pruned_at"].items())
        chosen = s["chosen"]
        best = "none trained every epoch yet" if chosen is None else (
            f"best trial {chosen['trial']} ({values_text(chosen['values'])}): "
            f"heldout_top1 {100 * chosen['heldout_top1']:.1f}%")
        lines.append(f"search {method}: {s['budget']}, {s['pruned']} pruned"
                     + (f" ({pruned})" if pruned else "") + f", {s['failed']} failed, {s['running']} running, "
                     f"{s['epochs']:.0f} epochs trained; {best}")
    return lines


def show_jobs(out: Path, study: str, stream, now: float | None = None) -> None:
    """The running jobs of a run in progress: what its driver last wrote to the
    run's progress file (nothing when no run is in progress)."""
    snapshot = read_run_file(run_file(out, study))
    if snapshot is None:
        return
    age = max(0.0, (now if now is not None else time.time()) - snapshot.get("updated", 0.0))
    pid, host = snapshot.get("pid"), snapshot.get("host")
    print(f"run in progress (driver pid {pid} on {host}, updated {age:.0f} s ago): {snapshot.get('status', '')}",
          file=stream)
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        print(f"  its driver (pid {pid}) is no longer running: what follows is where it stopped", file=stream)
    elif age > STALE_S:
        print(f"  not updated for {age:.0f} s: the run may have stopped", file=stream)
    for job in snapshot.get("jobs", []):
        eta = None if job.get("eta_s") is None else max(0.0, job["eta_s"] - age)
        print(f"  {job['label']} {describe_job(job.get('record'), eta, job.get('stage'))}", file=stream)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
