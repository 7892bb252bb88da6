"""Results for plain SQL: views with one row per cell and typed columns, so
``sqlite3 rd3.sqlite 'SELECT ...'``, psql and BI tools read results without
the packed metric blob or a pivot of their own.

- ``results``: every cell of every study: study, cell_id, cell_key, seed,
  status, method, then the main metrics (MAIN_METRICS) as float columns.
- ``results_<study>`` (study_view_name): one study's cells, the same columns
  plus one per factor, named by its path and typed by its stored levels.

Views, not tables: nothing more to write per result (the driver's throughput
stays as measured) and nothing to backfill (rows written by any revision
show). Each column is a scalar subquery on a unique index (metric's
(cell_id, name), cell_factor's primary key): no join limit (SQLite: 64
tables), and a column from one table keeps its declared type in SQLite's
``PRAGMA table_info``, which BI tools read.

They are derived objects, rebuilt by this code: db.schema drops them before
any migration step (so no migration meets them: SQLite's batch rebuild of a
table they read fails, PostgreSQL refuses to drop a column they read) and
creates them again when the schema reaches head (so a change here comes with a
new revision, which may have empty steps); records.sync_cells rebuilds a
study's view when its factors change. Views named ``results`` or
``results_*`` belong to rd3: they are dropped and rebuilt.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

from sqlalchemy import Connection, ColumnElement, Float, Text, case, cast, func, inspect, select

from .models import Cell, CellFactor, Metric, Study
from .types import FactorKind

RESULTS = "results"
# The numbers analysis reads first: THE result, the selected variants (each
# says where it was selected), the final loss, and the cost axes. Any other
# metric is a row of the metric table.
MAIN_METRICS = ("top1", "top1_heldout_selected", "top1_best_on_test", "final_loss", "synth_wall_s", "synth_bytes",
                "time_train_s", "gpu_hours", "cpu_hours")
# A study whose cells include a tuned design's search trials (a `trial` factor)
# also shows the trials' own metrics (they have no top1: they never see the test set).
# No revision needed: only such a study's view changes, rebuilt when its trials are stored.
TRIAL_METRICS = ("heldout_top1", "trial_epochs", "trial_rung", "pruned", "trial_wall_s")
# PostgreSQL's identifier limit (bytes; longer names are cut silently), kept
# on SQLite too so a name works on both.
MAX_NAME = 63

_cell, _study, _factor, _metric = Cell.__table__, Study.__table__, CellFactor.__table__, Metric.__table__
_VALUE = {FactorKind.int: "value_int", FactorKind.float: "value_float", FactorKind.bool: "value_bool",
          FactorKind.str: "value_str", FactorKind.json: "value_str"}


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def _fit(name: str) -> str:
    """``name`` when it fits MAX_NAME bytes, else its start plus a hash of all of it."""
    raw = name.encode()
    if len(raw) <= MAX_NAME:
        return name
    return f"{raw[:MAX_NAME - 9].decode(errors='ignore')}_{_digest(name)}"


def study_view_name(study: str) -> str:
    """``results_<study>`` when the study's name is plain lowercase SQL (a-z,
    0-9, _: no quotes needed on either engine) and fits; otherwise the name
    made plain and cut, plus a hash of the real name, so that two studies
    never share a view (``a.b`` and ``a_b``; ``Foo`` and ``foo``)."""
    plain = re.sub(r"[^a-z0-9_]", "_", study.lower())
    name = f"{RESULTS}_{plain}"
    if plain == study and len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 9]}_{_digest(study)}"


def _metric_column(name: str) -> ColumnElement:
    # NaN is stored as NULL (metric.is_nan says so): NULL here too, on both
    # engines, so AVG skips it alike.
    return (select(_metric.c.value).where(_metric.c.cell_id == _cell.c.id, _metric.c.name == name)
            .scalar_subquery().label(name))


def _factor_value(kinds: set[FactorKind]) -> ColumnElement:
    """The value column that holds every level of a factor of these kinds."""
    kinds = kinds - {FactorKind.null}  # NULL in any column
    if len({_VALUE[k] for k in kinds}) <= 1:
        return _factor.c[_VALUE[next(iter(kinds))] if kinds else "value_str"]
    if kinds == {FactorKind.int, FactorKind.float}:
        return func.coalesce(_factor.c.value_float, cast(_factor.c.value_int, Float))
    # Levels of several kinds (e.g. batch_size 'rded' or 128): text.
    return case((_factor.c.kind == FactorKind.int, cast(_factor.c.value_int, Text)),
                (_factor.c.kind == FactorKind.float, cast(_factor.c.value_float, Text)),
                (_factor.c.kind == FactorKind.bool, case((_factor.c.value_bool, "true"), else_="false")),
                else_=_factor.c.value_str)


def _factor_column(name: str, kinds: set[FactorKind]) -> ColumnElement:
    return (select(_factor_value(kinds)).where(_factor.c.cell_id == _cell.c.id, _factor.c.name == name)
            .scalar_subquery().label(_fit(name)))


def _cell_columns() -> list[ColumnElement]:
    # A study with one method has no `method` factor: then its name from the config.
    method = func.coalesce(select(_factor.c.value_str).where(_factor.c.cell_id == _cell.c.id,
                                                             _factor.c.name == "method").scalar_subquery(),
                           _cell.c.config[("method", "name")].as_string())
    return [_cell.c.id.label("cell_id"), _cell.c.cell_key, _cell.c.seed, _cell.c.status, method.label("method")]


def _create(conn: Connection, name: str, query) -> None:
    sql = query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    quoted = conn.dialect.identifier_preparer.quote(name)
    conn.exec_driver_sql(f"DROP VIEW IF EXISTS {quoted}")
    conn.exec_driver_sql(f"CREATE VIEW {quoted} AS {sql}")


def _study_factors(conn: Connection, study_id: int) -> dict[str, set[FactorKind]]:
    """The study's stored factors in its order (the first cell's), each with
    the kinds of its levels."""
    kinds: dict[str, set[FactorKind]] = {}
    for name, kind in conn.execute(select(_factor.c.name, _factor.c.kind).join(_cell, _cell.c.id == _factor.c.cell_id)
                                   .where(_cell.c.study_id == study_id).group_by(_factor.c.name, _factor.c.kind)):
        kinds.setdefault(name, set()).add(FactorKind(kind))
    first = conn.execute(select(_cell.c.factors).where(_cell.c.study_id == study_id).order_by(_cell.c.id)
                         .limit(1)).scalar() or {}
    order = {n: i for i, n in enumerate(first)}
    return {n: kinds[n] for n in sorted(kinds, key=lambda n: (order.get(n, len(order)), n))}


def refresh_study_view(conn: Connection, study_id: int, study: str) -> str:
    """(Re)create the study's view from its stored factors; returns its name."""
    columns: dict[str, Any] = {c.name: c for c in _cell_columns()}
    factors = _study_factors(conn, study_id)
    for name, kinds in factors.items():
        column = _factor_column(name, kinds)
        columns[column.name] = column  # a `method` or `seed` factor is that column, typed by its levels
    for name in MAIN_METRICS + (TRIAL_METRICS if "trial" in factors else ()):
        columns.setdefault(name, _metric_column(name))
    view = study_view_name(study)
    _create(conn, view, select(*columns.values()).select_from(_cell).where(_cell.c.study_id == study_id))
    return view


def create_views(conn: Connection) -> None:
    """``results`` and every stored study's view (db.schema, at head)."""
    columns = [_study.c.name.label("study"), *_cell_columns(), *map(_metric_column, MAIN_METRICS)]
    _create(conn, RESULTS, select(*columns).select_from(_cell.join(_study, _study.c.id == _cell.c.study_id)))
    for study_id, name in conn.execute(select(_study.c.id, _study.c.name)).all():
        refresh_study_view(conn, study_id, name)


def drop_views(conn: Connection) -> None:
    """Every view this module made (before a migration step)."""
    for name in inspect(conn).get_view_names():
        if name == RESULTS or name.startswith(f"{RESULTS}_"):
            conn.exec_driver_sql(f"DROP VIEW {conn.dialect.identifier_preparer.quote(name)}")
