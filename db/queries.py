"""Reads: find_* / list_* and results_frame(). Analysis, plots, the CLI and
notebooks read the results only through these."""
from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, select

from .models import Cell, CellStatus, Metric, Study
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
