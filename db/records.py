"""Writes. Only the orchestrator's driver calls these, each inside one
session_scope (one transaction), so a result is either fully stored or not at all."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Cell, CellStatus, EpochMetric, Metric, Study, utcnow


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
    """Insert cells not yet stored; return cell_key -> row id for all given."""
    existing = dict(session.execute(select(Cell.cell_key, Cell.id).where(Cell.study_id == study.id)).all())
    for cell in cells:
        if cell["cell_key"] not in existing:
            row = Cell(study_id=study.id, cell_key=cell["cell_key"], seed=cell["seed"], factors=dict(cell["factors"]),
                       config=dict(cell["config"]), status=CellStatus.pending)
            session.add(row)
            session.flush()
            existing[row.cell_key] = row.id
    return existing


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def record_result(session: Session, cell_id: int, metrics: Mapping[str, float], epochs: Iterable[Mapping[str, Any]]) -> None:
    cell = session.get(Cell, cell_id)
    for old in list(cell.metrics):  # a rerun replaces, never duplicates
        session.delete(old)
    session.flush()
    for name, value in metrics.items():
        session.add(Metric(cell_id=cell_id, name=name, value=_num(value)))
    session.query(EpochMetric).filter(EpochMetric.cell_id == cell_id).delete()
    for row in epochs:
        session.add(EpochMetric(cell_id=cell_id, epoch=int(row["epoch"]), loss=_num(row.get("loss")),
                                lr=_num(row.get("lr")), test_top1=_num(row.get("test_top1")),
                                heldout_top1=_num(row.get("heldout_top1")), time_s=_num(row.get("time_s"))))
    cell.status = CellStatus.done


def set_status(session: Session, cell_id: int, status: CellStatus) -> None:
    session.get(Cell, cell_id).status = status


def finish_study(session: Session, study_id: int) -> None:
    session.get(Study, study_id).finished_at = utcnow()
