"""Loading a study's cells, typed factors and metrics into numpy/pandas fast.

A 100,000-cell study has about a million metric rows; what costs is turning
each row into Python objects. So the metrics are read from the packed copy on
each cell row (db.types.pack_metrics: one row per cell, decoded by numpy per
distinct set of names), the other rows go from the driver's cursor straight
into numpy (np.fromiter over the cursor: no SQLAlchemy Row, no list of tuples),
the pivot is numpy indexing, and the database is asked for a cell-id range
rather than a join (exact membership is a numpy mask afterwards).
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, String, func, select, type_coerce

from .models import Cell, CellFactor, CellStatus, Study
from .types import FactorKind, decode_factor

_CELL_ID = ("cell_id", np.int64)


def _rows(conn: Connection, query, dtype: list[tuple[str, Any]]) -> np.ndarray:
    """A Core select's rows as a structured array, straight from the cursor
    (the select's few parameters are rendered as escaped literals)."""
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        return np.fromiter(cursor, dtype=dtype)
    finally:
        cursor.close()


class StudyCells:
    """The finished cells of one study: sorted ids, keys, seeds and packed metrics."""

    def __init__(self, conn: Connection, study: str):
        self.conn = conn
        cells = _rows(conn, select(Cell.id, Cell.cell_key, Cell.seed, Cell.metric_names, Cell.metric_values)
                      .join(Study).where(Study.name == study, Cell.status == CellStatus.done).order_by(Cell.id),
                      [_CELL_ID, ("cell_key", object), ("seed", np.int64), ("names", object), ("packed", object)])
        self.ids, self.keys, self.seeds = cells["cell_id"], cells["cell_key"], cells["seed"]
        self._names, self._packed = cells["names"], cells["packed"]
        # One study in the database: read whole tables (a scan beats an index
        # range here); otherwise only the study's id range.
        self.whole_tables = conn.execute(select(func.count()).select_from(Study)).scalar() == 1

    def __len__(self) -> int:
        return len(self.ids)

    def restrict(self, query, column):
        if self.whole_tables or not len(self.ids):
            return query
        return query.where(column.between(int(self.ids[0]), int(self.ids[-1])))

    def positions(self, cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row positions, mask) of ``cell_ids`` among this study's finished cells."""
        pos = np.searchsorted(self.ids, cell_ids)
        pos_clipped = np.minimum(pos, max(len(self.ids) - 1, 0))
        mask = (pos < len(self.ids)) & (self.ids[pos_clipped] == cell_ids) if len(self.ids) else \
            np.zeros(len(cell_ids), bool)
        return pos_clipped[mask], mask

    def factors(self) -> dict[str, pd.Series]:
        """One Series per factor over the cells, dtype from the stored kinds:
        int64 (Int64 if some cell lacks it), float64, bool (boolean), object."""
        fetch = {
            FactorKind.int: (CellFactor.value_int, np.int64),
            FactorKind.float: (CellFactor.value_float, np.float64),  # NULL (NaN) arrives as nan
            FactorKind.bool: (CellFactor.value_bool, np.int64),
            FactorKind.str: (CellFactor.value_str, object),
        }
        parts: dict[str, list[tuple[FactorKind, np.ndarray, np.ndarray]]] = {}
        for kind, (column, dtype) in fetch.items():
            rows = _rows(self.conn, self.restrict(select(CellFactor.cell_id, CellFactor.name, column)
                                                  .where(CellFactor.kind == kind), CellFactor.cell_id),
                         [_CELL_ID, ("name", object), ("value", dtype)])
            pos, mask = self.positions(rows["cell_id"])
            rows = rows[mask]
            for name in pd.unique(rows["name"]):
                chosen = rows["name"] == name
                parts.setdefault(name, []).append((kind, pos[chosen], rows["value"][chosen]))
        others = _rows(self.conn, self.restrict(
            select(CellFactor.cell_id, CellFactor.name, type_coerce(CellFactor.kind, String), CellFactor.value_int,
                   CellFactor.value_float, CellFactor.value_str, CellFactor.value_bool)
            .where(CellFactor.kind.in_([FactorKind.null, FactorKind.json])), CellFactor.cell_id),
            [_CELL_ID, ("name", object)] + [(c, object) for c in ("kind", "vi", "vf", "vs", "vb")])
        pos, mask = self.positions(others["cell_id"])
        for p, row in zip(pos, others[mask]):
            value = decode_factor(row["kind"], row["vi"], row["vf"], row["vs"], row["vb"])
            parts.setdefault(row["name"], []).append((FactorKind.json, np.array([p]), _objects([value])))
        return {name: self._column(pieces) for name, pieces in parts.items()}

    def _column(self, pieces: list[tuple[FactorKind, np.ndarray, np.ndarray]]) -> pd.Series:
        kinds = {kind for kind, _, _ in pieces}
        covered = sum(len(p) for _, p, _ in pieces) == len(self)
        if kinds <= {FactorKind.int, FactorKind.float} and kinds != {FactorKind.int}:
            out = np.full(len(self), math.nan)
        elif kinds == {FactorKind.int} and covered:
            out = np.zeros(len(self), np.int64)
        elif kinds == {FactorKind.bool} and covered:
            out = np.zeros(len(self), bool)
        else:  # missing levels, mixed kinds or JSON: Python objects
            out = np.full(len(self), None, object)
        for kind, pos, values in pieces:
            out[pos] = values.astype(bool) if kind is FactorKind.bool else values
        series = pd.Series(out)
        if kinds == {FactorKind.int} and not covered:
            series = series.astype("Int64")
        elif kinds == {FactorKind.bool} and not covered:
            series = series.astype("boolean")
        return series

    def metrics(self) -> pd.DataFrame:
        """One float64 column per metric name; NaN where a cell lacks it (and
        where it is NaN), from the packed copies: the cells that share a set of
        names (usually all) are decoded as one float64 matrix."""
        codes, name_sets = pd.factorize(self._names)  # NULL (a cell without metrics): code -1
        columns: dict[str, np.ndarray] = {}
        for code, text in enumerate(name_sets):
            rows = np.flatnonzero(codes == code)
            names = json.loads(text)
            values = np.frombuffer(b"".join(self._packed[rows]), "<f8").reshape(len(rows), len(names))
            for j, name in enumerate(names):
                columns.setdefault(name, np.full(len(self), math.nan))[rows] = values[:, j]
        return pd.DataFrame(columns, columns=list(columns))


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), object)
    out[:] = values
    return out
