"""Reads: find_* / list_* and results_frame(). Analysis, plots, the CLI and
notebooks read the results only through these."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from sqlalchemy import Engine, String, and_, func, select, type_coerce
from sqlalchemy.exc import DBAPIError

from .frames import StudyCells
from .models import EPOCH_FLOATS, Attempt, Cell, CellStatus, EpochMetric, Metric, Provenance, Study
from .session import DatabaseError, session_scope


class QueryError(DatabaseError):
    """A query a user can fix: an unknown study or factor, bad SQL, ..."""


def find_study(engine: Engine, name: str) -> Study | None:
    with session_scope(engine) as s:
        return s.scalar(select(Study).where(Study.name == name))


def list_studies(engine: Engine) -> list[str]:
    with session_scope(engine) as s:
        return list(s.scalars(select(Study.name).order_by(Study.name)))


def require_study(engine: Engine, name: str) -> Study:
    study = find_study(engine, name)
    if study is None:
        known = list_studies(engine)
        raise QueryError(f"no study named {name!r} in the results database "
                         f"(studies: {', '.join(known) if known else 'none yet'})")
    return study


def cell_status(engine: Engine, study: str) -> dict[str, str]:
    """cell_key -> status for every stored cell of ``study``."""
    with session_scope(engine) as s:
        rows = s.execute(select(Cell.cell_key, Cell.status).join(Study).where(Study.name == study)).all()
    return {key: status.value for key, status in rows}


def status_counts(engine: Engine, study: str) -> dict[str, int]:
    """Cells per status (every status present, zeros included)."""
    with session_scope(engine) as s:
        rows = s.execute(select(Cell.status, func.count()).join(Study).where(Study.name == study)
                         .group_by(Cell.status)).all()
    counts = {status.value: 0 for status in CellStatus}
    counts.update({status.value: n for status, n in rows})
    return counts


def studies_frame(engine: Engine) -> pd.DataFrame:
    """One row per study: name, cells per status, created and finished times (UTC)."""
    with session_scope(engine) as s:
        studies = s.execute(select(Study.name, Study.created_at, Study.finished_at).order_by(Study.name)).all()
        counts = s.execute(select(Study.name, Cell.status, func.count()).join(Cell)
                           .group_by(Study.name, Cell.status)).all()
    rows = {name: {"study": name, **{st.value: 0 for st in CellStatus}, "created_at": created,
                   "finished_at": finished} for name, created, finished in studies}
    for name, status, n in counts:
        rows[name][status.value] = n
    return pd.DataFrame(list(rows.values()),
                        columns=["study", *(st.value for st in CellStatus), "created_at", "finished_at"])


def attempts_frame(engine: Engine, study: str, latest_only: bool = True) -> pd.DataFrame:
    """The attempts of a study's cells (by default each cell's latest one):
    cell_key, seed, number, status, times (UTC), host, device, error."""
    latest = (select(Attempt.cell_id, func.max(Attempt.number).label("number")).group_by(Attempt.cell_id)
              .subquery())
    query = (select(Cell.cell_key, Cell.seed, Attempt.number, type_coerce(Attempt.status, String).label("status"),
                    Attempt.started_at, Attempt.ended_at, Attempt.heartbeat_at, Attempt.host, Attempt.device,
                    Attempt.error_type, Attempt.error_message)
             .join(Cell, Cell.id == Attempt.cell_id).join(Study).where(Study.name == study))
    if latest_only:
        query = query.join(latest, and_(latest.c.cell_id == Attempt.cell_id, latest.c.number == Attempt.number))
    with session_scope(engine) as s:
        rows = s.execute(query.order_by(Cell.cell_key, Attempt.number)).all()
    return pd.DataFrame([r._asdict() for r in rows], columns=list(query.selected_columns.keys()))


def _coerce(value: Any, column: pd.Series) -> Any:
    """A --where value typed by the column it filters: text from the command
    line becomes an int, float or bool when the factor holds those."""
    types = pd.api.types
    if not isinstance(value, str):
        return value
    try:
        if types.is_bool_dtype(column.dtype):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if types.is_integer_dtype(column.dtype):
            return int(value)
        if types.is_float_dtype(column.dtype):
            return float(value)
    except ValueError:
        kind = "true/false" if types.is_bool_dtype(column.dtype) else \
            "an integer" if types.is_integer_dtype(column.dtype) else "a number"
        raise QueryError(f"--where {column.name}={value}: {column.name} holds {kind}, not {value!r}") from None
    return value


def _apply_where(frame: pd.DataFrame, where: Mapping[str, Any], filterable: Iterable[str]) -> pd.DataFrame:
    filterable = list(filterable)
    for name, wanted in where.items():
        if name not in filterable:
            raise QueryError(f"--where {name}: not a factor of this study (factors: {', '.join(filterable)})")
        column = frame[name]
        values = [_coerce(v, column) for v in (wanted if isinstance(wanted, (list, tuple, set)) else [wanted])]
        mask = column.isin(values) if column.dtype != object else column.map(lambda v: v in values).astype(bool)
        if not mask.any():
            levels = column.dropna().unique().tolist()
            try:
                levels = sorted(levels)
            except TypeError:  # mixed kinds
                levels = sorted(levels, key=repr)
            shown = " or ".join(map(repr, values))
            raise QueryError(f"--where {name}: no finished cell has {name} = {shown} "
                             f"(levels: {', '.join(map(repr, levels))})")
        frame = frame[mask]
    return frame


def results_frame(engine: Engine, study: str, where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per finished cell (a cell is one seed of one factor combination):
    cell_key, seed, one typed column per factor (ints int64, floats float64,
    bools bool, strings object), one float column per metric (``top1`` first:
    THE result). ``where`` keeps cells whose factor (or seed) is one of the
    given levels; text is typed by the factor's stored kind."""
    with engine.connect() as conn:
        cells = StudyCells(conn, study)
        if not len(cells):
            return pd.DataFrame()
        order = list(conn.execute(select(Cell.factors).where(Cell.id == int(cells.ids[0]))).scalar() or {})
        factors = cells.factors()
        metrics = cells.metrics()
    frame = pd.DataFrame({"cell_key": cells.keys, "seed": cells.seeds})
    names = sorted(factors, key=lambda n: (order.index(n) if n in order else len(order), n))
    for name in names:
        frame[name] = factors[name]
    frame = pd.concat([frame, metrics[sorted(metrics.columns, key=lambda n: (n != "top1", n))]], axis=1)
    if where:
        frame = _apply_where(frame, where, ["seed", "cell_key", *names])
    return frame.sort_values("cell_key").reset_index(drop=True)


def metrics_frame(engine: Engine, study: str) -> pd.DataFrame:
    """Long form, faithful: one row per stored metric (cell_key, seed, attempt
    number, name, value); NaN is NaN and a metric a cell never reported has no row."""
    query = (select(Cell.cell_key, Cell.seed, Attempt.number.label("attempt"), Metric.name, Metric.value,
                    Metric.is_nan)
             .join(Cell, Cell.id == Metric.cell_id).join(Study).outerjoin(Attempt, Attempt.id == Metric.attempt_id)
             .where(Study.name == study).order_by(Cell.cell_key, Metric.name))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    frame = pd.DataFrame.from_records(rows, columns=["cell_key", "seed", "attempt", "name", "value", "is_nan"])
    frame["value"] = np.where(frame["is_nan"].astype(bool), math.nan, frame["value"].astype(float))
    return frame.drop(columns="is_nan")


def run_sql(engine: Engine, sql: str) -> pd.DataFrame:
    """One user-typed SQL statement on a read-only engine (make_engine(...,
    read_only=True)): the database refuses writes, and only one statement runs
    (sqlite3 refuses several; PostgreSQL's prepared statements cannot hold several)."""
    dbapi = engine.dialect.loaded_dbapi
    try:
        with engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                if engine.dialect.name == "postgresql":
                    cursor.execute(sql, prepare=True)
                else:
                    cursor.execute(sql)
                if cursor.description is None:
                    return pd.DataFrame()
                columns = [d[0] for d in cursor.description]
                return pd.DataFrame.from_records(cursor.fetchall(), columns=columns)
            finally:
                cursor.close()
                conn.connection.dbapi_connection.rollback()
    except (dbapi.Error, DBAPIError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise QueryError(f"--sql refused by the database: {detail} (queries are read-only, one statement)") from None


def finished_cells(engine: Engine, metrics: list[str]) -> list[tuple[dict, dict[str, float]]]:
    """(resolved config, {metric: value}) of every finished cell of every study,
    restricted to the named metrics: the run history that cost estimates use."""
    with session_scope(engine) as s:
        cells = s.execute(select(Cell.id, Cell.config).where(Cell.status == CellStatus.done)).all()
        rows = s.execute(select(Metric.cell_id, Metric.name, Metric.value).join(Cell)
                         .where(Cell.status == CellStatus.done, Metric.name.in_(metrics))).all()
    values: dict[int, dict[str, float]] = {cid: {} for cid, _ in cells}
    for cid, name, value in rows:
        if value is not None:
            values[cid][name] = value
    return [(config, values[cid]) for cid, config in cells]


# --- reads for orchestrator.analysis (attribution, plots, report) -----------------------


def cells_frame(engine: Engine, study: str) -> pd.DataFrame:
    """One row per stored cell of ``study`` whatever its status (so analysis can
    list what is missing or failed): cell_key, seed, status, one column per factor
    (raw values as expanded; None where a cell lacks a factor). Rows in storage
    order, which is the order the study expanded its cells."""
    status = cell_status(engine, study)
    with session_scope(engine) as s:
        cells = s.execute(select(Cell.cell_key, Cell.seed, Cell.factors).join(Study)
                          .where(Study.name == study).order_by(Cell.id)).all()
    frame = pd.DataFrame([{"cell_key": key, "seed": seed, "status": status.get(key), **(factors or {})}
                          for key, seed, factors in cells])
    return frame if len(frame) else pd.DataFrame(columns=["cell_key", "seed", "status"])


EPOCH_COLUMNS = ["cell_key", "epoch", *EPOCH_FLOATS]


def epoch_frame(engine: Engine, study: str, unfinished: bool = False) -> pd.DataFrame:
    """Per-epoch metrics of ``study``'s finished cells, one row per (cell, epoch):
    cell_key, epoch, loss, lr, test_top1, heldout_top1, time_s, train_top1,
    temperature (test/held-out accuracies are only present on evaluated epochs).
    ``unfinished``: every cell's, also of those running now or failed (the
    epochs their attempts measured so far)."""
    query = (select(Cell.cell_key, EpochMetric.epoch, *(getattr(EpochMetric, f) for f in EPOCH_FLOATS))
             .join(Cell, EpochMetric.cell_id == Cell.id).join(Study).where(Study.name == study)
             .order_by(Cell.cell_key, EpochMetric.epoch))
    if not unfinished:
        query = query.where(Cell.status == CellStatus.done)
    with session_scope(engine) as s:
        rows = s.execute(query).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=EPOCH_COLUMNS)


def study_spec_text(engine: Engine, study: str) -> str | None:
    with session_scope(engine) as s:
        return s.scalar(select(Study.spec_text).where(Study.name == study))


def provenance_frame(engine: Engine, study: str) -> pd.DataFrame:
    """One row per attempt of ``study``'s cells that recorded provenance:
    cell_key, attempt number, then the provenance fields (commit, versions,
    hardware, dataset fingerprint, seed); empty when nothing was recorded."""
    fields = [c for c in Provenance.__table__.c if c.name not in ("attempt_id", "env")]
    query = (select(Cell.cell_key, Attempt.number.label("attempt"), *fields)
             .join(Attempt, Attempt.id == Provenance.attempt_id).join(Cell, Cell.id == Attempt.cell_id)
             .join(Study).where(Study.name == study).order_by(Cell.cell_key, Attempt.number))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return pd.DataFrame([r._asdict() for r in rows], columns=list(query.selected_columns.keys()))
