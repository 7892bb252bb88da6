"""Reads: find_* / list_* and results_frame(). Analysis, plots, the CLI and
notebooks read the results only through these."""
from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, select

from .models import Cell, CellStatus, EpochMetric, Metric, Study
from .session import session_scope


def find_study(engine: Engine, name: str) -> Study | None:
    with session_scope(engine) as s:
        return s.scalar(select(Study).where(Study.name == name))


def list_studies(engine: Engine) -> list[str]:
    with session_scope(engine) as s:
        return list(s.scalars(select(Study.name).order_by(Study.name)))


def cell_status(engine: Engine, study: str) -> dict[str, str]:
    """cell_key -> status for every stored cell of ``study``."""
    with session_scope(engine) as s:
        rows = s.execute(select(Cell.cell_key, Cell.status).join(Study).where(Study.name == study)).all()
    return {key: status.value for key, status in rows}


def results_frame(engine: Engine, study: str) -> pd.DataFrame:
    """One row per finished cell (a cell is one seed of one factor combination):
    cell_key, seed, one column per factor, one column per metric."""
    with session_scope(engine) as s:
        cells = s.execute(select(Cell.id, Cell.cell_key, Cell.seed, Cell.factors).join(Study)
                          .where(Study.name == study, Cell.status == CellStatus.done)).all()
        metrics = s.execute(select(Metric.cell_id, Metric.name, Metric.value).join(Cell).join(Study)
                            .where(Study.name == study, Cell.status == CellStatus.done)).all()
    rows = {cid: {"cell_key": key, "seed": seed, **factors} for cid, key, seed, factors in cells}
    for cid, name, value in metrics:
        rows[cid][name] = value
    frame = pd.DataFrame(list(rows.values()))
    return frame.sort_values(["cell_key"]).reset_index(drop=True) if len(frame) else frame


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


EPOCH_COLUMNS = ["cell_key", "epoch", "loss", "lr", "test_top1", "heldout_top1", "time_s"]


def epoch_frame(engine: Engine, study: str) -> pd.DataFrame:
    """Per-epoch metrics of ``study``'s finished cells, one row per (cell, epoch):
    cell_key, epoch, loss, lr, test_top1, heldout_top1, time_s (accuracies are
    only present on evaluated epochs)."""
    with session_scope(engine) as s:
        rows = s.execute(select(Cell.cell_key, EpochMetric.epoch, EpochMetric.loss, EpochMetric.lr,
                                EpochMetric.test_top1, EpochMetric.heldout_top1, EpochMetric.time_s)
                         .join(Cell, EpochMetric.cell_id == Cell.id).join(Study)
                         .where(Study.name == study, Cell.status == CellStatus.done)
                         .order_by(Cell.cell_key, EpochMetric.epoch)).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=EPOCH_COLUMNS)


def study_spec_text(engine: Engine, study: str) -> str | None:
    with session_scope(engine) as s:
        return s.scalar(select(Study.spec_text).where(Study.name == study))


def provenance_frame(engine: Engine, study: str) -> pd.DataFrame | None:
    """Rows of the ``provenance`` table that belong to ``study`` (linked by
    cell_id, attempt_id -> attempt.cell_id, or study_id), or None when this
    database has no provenance table. Read by reflection so that it works with
    whichever provenance schema the database carries."""
    from sqlalchemy import MetaData, inspect

    names = set(inspect(engine).get_table_names())
    if "provenance" not in names:
        return None
    meta = MetaData()
    meta.reflect(engine, only=[n for n in ("provenance", "attempt", "cell", "study") if n in names])
    prov, cell, st = meta.tables["provenance"], meta.tables["cell"], meta.tables["study"]
    query = select(prov)
    if "cell_id" in prov.c:
        query = query.join(cell, prov.c.cell_id == cell.c.id).join(st, cell.c.study_id == st.c.id)
    elif "attempt_id" in prov.c and "attempt" in meta.tables and "cell_id" in meta.tables["attempt"].c:
        attempt = meta.tables["attempt"]
        query = (query.join(attempt, prov.c.attempt_id == attempt.c.id)
                 .join(cell, attempt.c.cell_id == cell.c.id).join(st, cell.c.study_id == st.c.id))
    elif "study_id" in prov.c:
        query = query.join(st, prov.c.study_id == st.c.id)
    else:
        return pd.DataFrame([dict(r._mapping) for r in _all(engine, query)])
    return pd.DataFrame([dict(r._mapping) for r in _all(engine, query.where(st.c.name == study))])


def _all(engine: Engine, query) -> list:
    with engine.connect() as conn:
        return list(conn.execute(query))
