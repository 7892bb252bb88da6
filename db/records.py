"""Writes. Only the orchestrator's driver calls these, each inside one
session_scope (one transaction), so a result is either fully stored or not at all.

The per-result calls take a Session or a plain Connection (``engine.begin()``:
less overhead per result, which the driver uses).

Attempts: ``start_attempt`` when a cell's job is handed to an executor,
``heartbeat`` while it runs, ``finish_attempt`` with done/failed (error type,
message and traceback on failure), ``record_provenance`` for what produced it.
The cell's status follows its latest attempt.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import Connection, Integer, String, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from . import views
from .models import (EPOCH_FLOATS, Artifact, ArtifactUse, Attempt, AttemptStatus, Cell, CellFactor, CellStatus,
                     EpochMetric, Metric, Provenance, Study, utcnow)
from .prepared import Prepared
from .types import UTCDateTime, encode_factor, pack_metrics, split_float

Tx = Session | Connection  # one transaction: session_scope(engine) or engine.begin()


def _conn(tx: Tx) -> Connection:
    return tx.connection() if isinstance(tx, Session) else tx


def ensure_study(session: Session, name: str, spec_text: str, spec_hash: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        study = Study(name=name, spec_text=spec_text, spec_hash=spec_hash)
        session.add(study)
    elif study.spec_hash != spec_hash:
        # The definition changed: keep every stored cell (they are keyed by their
        # own resolved config) and record the text that is now being run.
        study.spec_text, study.spec_hash, study.finished_at = spec_text, spec_hash, None
    session.flush()
    return study


def sync_cells(session: Session, study: Study, cells: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Insert cells not yet stored, with their typed factor rows, and give stored
    cells whose factor labels the study now names differently (a column added,
    such as ``recipe``) the current labels; when either happened, rebuild the
    study's view (db.views); return cell_key -> row id for all stored cells of
    the study."""
    def stored() -> dict[str, int]:
        return dict(session.execute(select(Cell.cell_key, Cell.id).where(Cell.study_id == study.id)).all())

    cells = list(cells)
    existing = {key: (cid, factors) for key, cid, factors in session.execute(
        select(Cell.cell_key, Cell.id, Cell.factors).where(Cell.study_id == study.id)).all()}
    new = {c["cell_key"]: c for c in cells if c["cell_key"] not in existing}
    relabel = {existing[c["cell_key"]][0]: dict(c["factors"]) for c in cells
               if c["cell_key"] in existing and dict(existing[c["cell_key"]][1] or {}) != dict(c["factors"])}
    conn = _conn(session)  # Core executemany: a 100k-cell study syncs in seconds
    if relabel:
        conn.execute(update(Cell.__table__).where(Cell.__table__.c.id == bindparam("cid")).values(
            factors=bindparam("labels")), [{"cid": cid, "labels": f} for cid, f in relabel.items()])
        conn.execute(CellFactor.__table__.delete().where(CellFactor.__table__.c.cell_id.in_(list(relabel))))
        conn.execute(CellFactor.__table__.insert(), [{"cell_id": cid, "name": name, **encode_factor(value)}
                                                     for cid, f in relabel.items() for name, value in f.items()])
    ids = {key: cid for key, (cid, _) in existing.items()}
    if not new and not relabel:
        return ids
    if new:
        conn.execute(Cell.__table__.insert(), [{"study_id": study.id, "cell_key": key, "seed": c["seed"],
                                                "factors": dict(c["factors"]), "config": dict(c["config"]),
                                                "status": CellStatus.pending} for key, c in new.items()])
        ids = stored()
        factors = [{"cell_id": ids[key], "name": name, **encode_factor(value)}
                   for key, c in new.items() for name, value in c["factors"].items()]
        if factors:
            conn.execute(CellFactor.__table__.insert(), factors)
    # Its columns are the stored factors, typed by their levels: both changed.
    views.refresh_study_view(conn, study.id, study.name)
    return ids


_SELECTED = re.compile(r"(^|_)(best|max|selected|peak)(_|$)")
_ACCURACY = re.compile(r"top\d|acc")


def check_metric_name(name: str) -> str:
    """An accuracy picked by a selection rule must say where it was selected
    (``*_on_test`` or ``*heldout*``), so it is never mistaken for ``top1``, the
    final-epoch test accuracy."""
    if _ACCURACY.search(name) and _SELECTED.search(name) and not (name.endswith("_on_test") or "heldout" in name):
        raise ValueError(f"metric {name!r} is a selected accuracy without its selection split: name it "
                         f"'{name}_on_test' (chosen on the test set) or '..._heldout_selected'")
    return name


# The per-result statements, compiled once per dialect and run on the DBAPI
# cursor (db.prepared: a result is about ten of them, bench/db_scale.py).
_metric, _epoch, _cell, _attempt = (Metric.__table__, EpochMetric.__table__, Cell.__table__, Attempt.__table__)
_DELETE_METRICS = Prepared(_metric.delete().where(_metric.c.cell_id == bindparam("cid")))
_DELETE_EPOCHS = Prepared(_epoch.delete().where(_epoch.c.cell_id == bindparam("cid")))
_INSERT_METRICS = Prepared(_metric.insert(), ("cell_id", "attempt_id", "name", "value", "is_nan"))
_INSERT_EPOCHS = Prepared(_epoch.insert(), ("cell_id", "attempt_id", "epoch", "nan_fields") + EPOCH_FLOATS)
_SET_PACK = Prepared(_cell.update().where(_cell.c.id == bindparam("cid")).values(
    metric_names=bindparam("names"), metric_values=bindparam("packed")))
_SET_STATUS = Prepared(_cell.update().where(_cell.c.id == bindparam("cid")).values(status=bindparam("new_status")))
_SET_STATUS_OF_ATTEMPT = Prepared(_cell.update().where(_cell.c.id == select(_attempt.c.cell_id).where(
    _attempt.c.id == bindparam("aid")).scalar_subquery()).values(status=bindparam("new_status")))
_STATUS = _attempt.c.status.type
# Number and insert in one statement: max(number) + 1 of the cell's attempts.
_START_ATTEMPT = Prepared(_attempt.insert().from_select(
    ["cell_id", "number", "status", "started_at", "heartbeat_at", "host", "device"],
    select(bindparam("cid", type_=Integer), func.coalesce(func.max(_attempt.c.number), 0) + 1,
           bindparam("new_status", type_=_STATUS), bindparam("at", type_=UTCDateTime),
           bindparam("at", type_=UTCDateTime), bindparam("host", type_=String), bindparam("device", type_=String))
    .where(_attempt.c.cell_id == bindparam("cid"))).returning(_attempt.c.id))
_FINISH_ATTEMPT = Prepared(_attempt.update().where(_attempt.c.id == bindparam("aid")).values(
    status=bindparam("new_status"), ended_at=bindparam("at"), heartbeat_at=bindparam("at"),
    error_type=bindparam("error_type"), error_message=bindparam("error_message"), traceback=bindparam("tb"),
    **{c: func.coalesce(bindparam(c, type_=_attempt.c[c].type), _attempt.c[c]) for c in ("host", "device",
                                                                                         "started_at")}))
_HEARTBEAT = Prepared(_attempt.update().where(_attempt.c.id == bindparam("aid")).values(heartbeat_at=bindparam("at")))


def _metric_rows(cell_id: int, attempt_id: int | None, metrics: Mapping[str, float]) -> list[dict]:
    rows = []
    for name, value in metrics.items():
        stored, is_nan = split_float(value)
        rows.append({"cell_id": cell_id, "attempt_id": attempt_id, "name": check_metric_name(name),
                     "value": stored, "is_nan": is_nan})
    return rows


def _pack_row(cell_id: int, metrics: Mapping[str, float]) -> dict:
    names, packed = pack_metrics(metrics)
    return {"cid": cell_id, "names": names, "packed": packed}


def _epoch_rows(cell_id: int, attempt_id: int | None, epochs: Iterable[Mapping[str, Any]]) -> list[dict]:
    rows = []
    for row in epochs:
        values = {f: split_float(row.get(f)) for f in EPOCH_FLOATS}
        nan = ",".join(f for f, (_, is_nan) in values.items() if is_nan) or None
        rows.append({"cell_id": cell_id, "attempt_id": attempt_id, "epoch": int(row["epoch"]), "nan_fields": nan,
                     **{f: v for f, (v, _) in values.items()}})
    return rows


def record_result(session: Tx, cell_id: int, metrics: Mapping[str, float], epochs: Iterable[Mapping[str, Any]],
                  attempt_id: int | None = None) -> None:
    """Store a cell's metrics and per-epoch history (a rerun replaces both).
    Without ``attempt_id`` the cell is marked done here; with one, the cell's
    status follows that attempt: call ``finish_attempt(..., done)`` in the same
    transaction (one status write per result)."""
    metric_rows = _metric_rows(cell_id, attempt_id, metrics)
    epoch_rows = _epoch_rows(cell_id, attempt_id, epochs)
    conn = _conn(session)
    _DELETE_METRICS.execute(conn, {"cid": cell_id})
    _DELETE_EPOCHS.execute(conn, {"cid": cell_id})
    _INSERT_METRICS.executemany(conn, metric_rows)
    _INSERT_EPOCHS.executemany(conn, epoch_rows)
    _SET_PACK.execute(conn, _pack_row(cell_id, metrics))
    if attempt_id is None:
        set_status(session, cell_id, CellStatus.done)


def record_epochs(session: Tx, cell_id: int, attempt_id: int, epochs: Iterable[Mapping[str, Any]]) -> None:
    """Epoch rows of a running attempt, as they arrive: the driver writes them
    while the cell trains, so that the curve of a running cell can be drawn
    and a crash keeps what was measured. The cell's rows from the first epoch
    given on are replaced: the same rows sent twice are stored once, a rerun
    from scratch replaces an earlier attempt's curve, and one that resumed
    from a checkpoint keeps the epochs before it. ``record_result`` at the
    cell's end replaces them all with the full history."""
    rows = _epoch_rows(cell_id, attempt_id, epochs)
    if not rows:
        return
    conn = _conn(session)
    conn.execute(_epoch.delete().where(_epoch.c.cell_id == cell_id, _epoch.c.epoch >= min(r["epoch"] for r in rows)))
    _INSERT_EPOCHS.executemany(conn, rows)


def set_status(session: Tx, cell_id: int, status: CellStatus) -> None:
    _SET_STATUS.execute(_conn(session), {"cid": cell_id, "new_status": status})


def start_attempt(session: Tx, cell_id: int, host: str | None = None, device: str | None = None,
                  started_at: datetime | None = None) -> int:
    """A new running attempt of ``cell_id`` (numbered from 1); returns its id."""
    conn = _conn(session)
    attempt_id = _START_ATTEMPT.scalar(conn, {"cid": cell_id, "new_status": AttemptStatus.running,
                                              "at": started_at or utcnow(), "host": host, "device": device})
    set_status(session, cell_id, CellStatus.running)
    return attempt_id


def heartbeat(session: Tx, attempt_id: int, at: datetime | None = None) -> None:
    _HEARTBEAT.execute(_conn(session), {"aid": attempt_id, "at": at or utcnow()})


def heartbeats(session: Tx, attempt_ids: Iterable[int], at: datetime | None = None) -> None:
    """``heartbeat`` for many attempts in one statement (the driver's periodic beat)."""
    at = at or utcnow()
    rows = [{"aid": a, "at": at} for a in attempt_ids]
    _HEARTBEAT.executemany(_conn(session), rows)


def finish_attempt(session: Tx, attempt_id: int, status: AttemptStatus, *, error_type: str | None = None,
                   error_message: str | None = None, traceback: str | None = None, host: str | None = None,
                   device: str | None = None, started_at: datetime | None = None,
                   ended_at: datetime | None = None) -> None:
    """End an attempt as done or failed; its cell takes the same status.
    ``host``/``device`` fill in what the worker reported; ``started_at``, when
    given, replaces the hand-over time with the time the worker really started
    (a job can wait in the executor's queue)."""
    if status not in (AttemptStatus.done, AttemptStatus.failed):
        raise ValueError(f"an attempt finishes as done or failed, not {status!r}")
    conn = _conn(session)
    _FINISH_ATTEMPT.execute(conn, {"aid": attempt_id, "new_status": status, "at": ended_at or utcnow(),
                                    "error_type": error_type, "error_message": error_message, "tb": traceback,
                                    "host": host, "device": device, "started_at": started_at})
    _SET_STATUS_OF_ATTEMPT.execute(conn, {"aid": attempt_id, "new_status": status})


def abandon_attempts(session: Session, study_id: int, reason: str) -> int:
    """Mark attempts a previous driver left running (it was killed or crashed)
    as failed; returns how many. Only the one driver of a study may call this."""
    cells = select(Cell.id).where(Cell.study_id == study_id)
    stale = list(session.scalars(select(Attempt.id).where(Attempt.cell_id.in_(cells),
                                                          Attempt.status.in_([AttemptStatus.running,
                                                                              AttemptStatus.pending]))))
    for attempt_id in stale:
        finish_attempt(session, attempt_id, AttemptStatus.failed, error_type="DriverStopped", error_message=reason)
    session.execute(update(Cell).where(Cell.study_id == study_id, Cell.status == CellStatus.running)
                    .values(status=CellStatus.failed))
    return len(stale)


def import_results(session: Tx, results: Sequence[Mapping[str, Any]]) -> list[int]:
    """Bulk import: many finished results in the caller's one transaction, a
    few executemany statements for the lot (for results produced elsewhere,
    e.g. copied from another database; the driver records one result per
    transaction instead). Each item: ``cell_id``, ``metrics``, ``epochs``, and
    optionally ``host``, ``device``, ``started_at``, ``ended_at`` and
    ``provenance`` (record_provenance fields). Each result becomes a new done
    attempt of its cell (a cell at most once per call); returns their ids."""
    conn = _conn(session)
    cell_ids = [int(r["cell_id"]) for r in results]
    if len(set(cell_ids)) != len(cell_ids):
        raise ValueError("import_results: a cell appears twice in one batch")
    numbers: dict[int, int] = {}
    for chunk in range(0, len(cell_ids), 5000):  # under every engine's bound-parameter limit
        part = cell_ids[chunk:chunk + 5000]
        numbers.update(conn.execute(select(_attempt.c.cell_id, func.max(_attempt.c.number))
                                    .where(_attempt.c.cell_id.in_(part)).group_by(_attempt.c.cell_id)).all())
        conn.execute(_metric.delete().where(_metric.c.cell_id.in_(part)))
        conn.execute(_epoch.delete().where(_epoch.c.cell_id.in_(part)))
    now = utcnow()
    attempt_rows = [{"cell_id": r["cell_id"], "number": numbers.get(r["cell_id"], 0) + 1,
                     "status": AttemptStatus.done, "started_at": r.get("started_at"),
                     "ended_at": r.get("ended_at") or now, "heartbeat_at": r.get("ended_at") or now,
                     "host": r.get("host"), "device": r.get("device")} for r in results]
    ids = list(conn.execute(_attempt.insert().returning(_attempt.c.id, sort_by_parameter_order=True),
                            attempt_rows).scalars())
    metric_rows, epoch_rows, provenance_rows = [], [], []
    for attempt_id, r in zip(ids, results):
        metric_rows += _metric_rows(r["cell_id"], attempt_id, r["metrics"])
        epoch_rows += _epoch_rows(r["cell_id"], attempt_id, r["epochs"])
        if "provenance" in r:
            unknown = set(r["provenance"]) - PROVENANCE_FIELDS
            if unknown:
                raise ValueError(f"unknown provenance fields {sorted(unknown)}")
            provenance_rows.append({**dict.fromkeys(PROVENANCE_FIELDS), "env": {}, **r["provenance"],
                                    "attempt_id": attempt_id, "recorded_at": now})
    _INSERT_METRICS.executemany(conn, metric_rows)
    _INSERT_EPOCHS.executemany(conn, epoch_rows)
    _INSERT_PROVENANCE.executemany(conn, provenance_rows)
    _SET_PACK.executemany(conn, [_pack_row(r["cell_id"], r["metrics"]) for r in results])
    _SET_STATUS.executemany(conn, [{"cid": c, "new_status": CellStatus.done} for c in cell_ids])
    return ids


PROVENANCE_FIELDS = frozenset(c.name for c in Provenance.__table__.columns) - {"attempt_id", "recorded_at"}
_INSERT_PROVENANCE = Prepared(Provenance.__table__.insert(),
                              sorted(PROVENANCE_FIELDS) + ["attempt_id", "recorded_at"])


def record_provenance(session: Tx, attempt_id: int, **fields: Any) -> None:
    """What produced an attempt (once per attempt): git_commit, git_dirty,
    project_version, python, torch, torchvision, timm, ray, cuda, gpu,
    dataset_fingerprint, seed, env."""
    unknown = set(fields) - PROVENANCE_FIELDS
    if unknown:
        raise ValueError(f"unknown provenance fields {sorted(unknown)} (known: {sorted(PROVENANCE_FIELDS)})")
    fields.setdefault("env", {})
    _INSERT_PROVENANCE.execute(_conn(session), {"attempt_id": attempt_id, "recorded_at": utcnow(),
                                                **dict.fromkeys(PROVENANCE_FIELDS), **fields})


def record_artifact(session: Tx, stage: str, key: str, path: str, bytes: int, sha256: str,
                    config: Mapping[str, Any]) -> int:
    """The artifact's row id, inserting it the first time it is seen."""
    found = session.scalar(select(Artifact.id).where(Artifact.stage == stage, Artifact.key == key,
                                                     Artifact.path == path))
    if found is not None:
        return found
    return session.scalar(insert(Artifact).values(stage=stage, key=key, path=path, bytes=int(bytes), sha256=sha256,
                                                  config=dict(config), created_at=utcnow()).returning(Artifact.id))


_USE_ARTIFACT = Prepared(ArtifactUse.__table__.insert(), ("attempt_id", "artifact_id"))


def use_artifacts(session: Tx, attempt_id: int, artifact_ids: Iterable[int]) -> None:
    _USE_ARTIFACT.executemany(_conn(session), [{"attempt_id": attempt_id, "artifact_id": a}
                                               for a in dict.fromkeys(artifact_ids)])


def finish_study(session: Session, study_id: int) -> None:
    session.execute(update(Study).where(Study.id == study_id).values(finished_at=utcnow()))
