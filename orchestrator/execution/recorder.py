"""What the driver writes for each job: an attempt per run of a cell (running
when handed to the executor, then done or failed), its provenance, the stage
artifacts produced and used, and the result itself, each outcome in one
transaction on one Core connection held for the run (per result, an ORM
session or a pool checkout would cost more than the statements themselves;
after a quiet spell it is taken from the pool afresh, see IDLE_RECHECK_S).
The driver is the only writer; workers report back as plain data.
"""
from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from db import records
from db.models import AttemptStatus
from rd3core.artifacts import ArtifactStore

from . import failures
from .plan import Node, Plan
from .runner import Outcome

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A connection unused this long goes back to the pool and is taken out again
# before the next write: the pool's pre-ping (PostgreSQL) then replaces one that
# the server or the network dropped while long jobs ran. Results that arrive
# faster than this keep the one connection.
IDLE_RECHECK_S = 30.0


def checkout_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """git commit and dirty flag of the project checkout (None when it is not
    a git checkout or git is missing). Dirty: tracked files differ from the
    commit; untracked files (results folders) do not count."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit.strip() if commit else None,
            "git_dirty": None if status is None else bool(status.strip())}


def provenance_fields(checkout: dict[str, Any], result: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    """records.record_provenance fields from the checkout and what the worker
    reported (nothing from a worker that died: then only checkout and seed)."""
    env = dict((result or {}).get("env", {}))
    dataset = (result or {}).get("dataset", {})
    return {**checkout, "seed": seed, "project_version": env.get("rd3bench"), "python": env.get("python"),
            "torch": env.get("torch"), "torchvision": env.get("torchvision"), "timm": env.get("timm"),
            "ray": env.get("ray"), "cuda": env.get("cuda"), "gpu": env.get("gpu"),
            "dataset_fingerprint": dataset.get("fingerprint"),
            "env": {**env, "runtime": (result or {}).get("runtime")}}


class Recorder:
    """The driver's writes for one run, keyed by plan node: ``submitted`` when a
    job is handed to the executor, ``heartbeat`` while jobs run, ``epochs`` as
    running post-evaluations report epochs, ``stage_done``
    / ``cell_done`` / ``cell_failed`` as outcomes arrive (a retried job's
    failure too: its next run is a new attempt), ``close`` when the run ends."""

    def __init__(self, engine: Engine, store: ArtifactStore, plan: Plan, cell_ids: dict[str, int],
                 seeds: dict[str, int]):
        self.engine, self.store, self.plan = engine, store, plan
        self.cell_ids, self.seeds = cell_ids, seeds
        self.checkout = checkout_state()
        self.attempts: dict[str, int] = {}  # cell key -> its attempt in flight
        self.epochs_written: dict[int, int] = {}  # attempt -> the last epoch row written while it ran
        self.conn = engine.connect()  # closed by close()
        self.used_at = time.monotonic()
        # (stage, key) -> artifact row id, once committed: a distilled set or
        # teacher is used by many cells, its row is looked up once per run.
        self.artifact_ids: dict[tuple[str, str], int] = {}
        self._recorded: dict[tuple[str, str], int] = {}  # in the open transaction

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction on the held connection: committed on exit, rolled
        back on any error (the connection stays usable)."""
        if time.monotonic() - self.used_at > IDLE_RECHECK_S:
            self.conn.close()
            self.conn = self.engine.connect()
        self._recorded = {}
        try:
            with self.conn.begin():
                yield self.conn
        finally:
            self.used_at = time.monotonic()
        self.artifact_ids.update(self._recorded)

    def submitted(self, node: Node) -> None:
        if node.stage == "posteval":
            with self.transaction() as s:
                self.attempts[node.key] = records.start_attempt(s, self.cell_ids[node.key])

    def heartbeat(self, nodes: list[Node]) -> None:
        """Their jobs are alive: one transaction for all their attempts."""
        alive = [self.attempts[n.key] for n in nodes if n.stage == "posteval" and n.key in self.attempts]
        if alive:
            with self.transaction() as s:
                records.heartbeats(s, alive)

    def epochs(self, running: list[tuple[Node, list[dict]]]) -> None:
        """Post-evaluations' epoch rows reported so far (each its latest rows,
        jobprogress.Reporter): those not written yet, in one transaction for
        all. A row that never arrives (more epochs between two checks than a
        record carries) comes with the full history at the cell's end."""
        new = []
        for node, rows in running:
            attempt = self.attempts.get(node.key)
            if node.stage != "posteval" or attempt is None:
                continue
            fresh = [r for r in rows if "epoch" in r and r["epoch"] > self.epochs_written.get(attempt, 0)]
            if fresh:
                new.append((self.cell_ids[node.key], attempt, fresh))
        if not new:
            return
        with self.transaction() as s:
            for cell_id, attempt, fresh in new:
                records.record_epochs(s, cell_id, attempt, fresh)
        for _, attempt, fresh in new:
            self.epochs_written[attempt] = max(int(r["epoch"]) for r in fresh)

    def stage_done(self, node: Node) -> None:
        with self.transaction() as s:
            self._artifact(s, node)

    def cell_done(self, outcome: Outcome, metrics: dict[str, float]) -> None:
        key, result = outcome.node.key, outcome.result
        attempt = self.attempts[key]
        with self.transaction() as s:  # one transaction per result, committed as it arrives
            records.record_result(s, self.cell_ids[key], metrics, result["epochs"], attempt_id=attempt)
            records.finish_attempt(s, attempt, AttemptStatus.done, host=result["env"].get("host"),
                                   device=result.get("runtime", {}).get("device"),
                                   started_at=_parse_time(result.get("started_at")))
            records.record_provenance(s, attempt, **provenance_fields(self.checkout, result, self.seeds[key]))
            used = [self._artifact(s, self.plan.nodes[dep]) for dep in outcome.node.deps]
            records.use_artifacts(s, attempt, [a for a in used if a is not None])
        del self.attempts[key]  # only once committed: an interrupted commit leaves it for close()

    def cell_failed(self, outcome: Outcome) -> None:
        key, failure = outcome.node.key, outcome.failure
        with self.transaction() as s:
            attempt = self.attempts.get(key)
            if attempt is None:  # never handed over: a stage it needs failed
                attempt = records.start_attempt(s, self.cell_ids[key])
            records.finish_attempt(s, attempt, AttemptStatus.failed, error_type=failure.type[:200],
                                   error_message=failure.message, traceback=failure.traceback, host=outcome.host)
            records.record_provenance(s, attempt, **provenance_fields(self.checkout, None, self.seeds[key]))
        self.attempts.pop(key, None)

    def close(self, reason: str) -> None:
        """Attempts still in flight when the driver stops (interrupt, error) end
        failed as ``Interrupted`` (a plain rerun runs them again). Best effort:
        if the database itself is what failed, the next run marks them
        (records.abandon_attempts) and the first error stands."""
        try:
            if self.attempts:
                with self.transaction() as s:
                    for attempt in self.attempts.values():
                        records.finish_attempt(s, attempt, AttemptStatus.failed, error_type=failures.INTERRUPTED,
                                               error_message=reason)
        except SQLAlchemyError:
            pass
        finally:
            self.attempts.clear()
            self.conn.close()  # a no-op the second time

    def _artifact(self, conn: Connection, node: Node) -> int | None:
        found = self.artifact_ids.get((node.stage, node.key))
        if found is None:
            info = self.store.info(node.stage, node.key, verify=False)
            if info is None:
                return None
            found = self._recorded[node.stage, node.key] = records.record_artifact(
                conn, node.stage, node.key, str(info.path.resolve()), info.bytes, info.sha256, node.payload)
        return found


class Announcing:
    """An executor that tells ``on_submit`` about each job it is handed."""

    def __init__(self, executor, on_submit: Callable[[Node], None]):
        self.executor, self.on_submit = executor, on_submit

    def submit(self, node: Node, resources) -> None:
        self.on_submit(node)
        self.executor.submit(node, resources)

    def inflight(self) -> int:
        return self.executor.inflight()

    def next_outcome(self) -> Outcome:
        return self.executor.next_outcome()

    def node_capacity(self) -> dict[str, float]:
        return self.executor.node_capacity()


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
