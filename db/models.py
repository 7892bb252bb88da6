"""Typed SQLAlchemy 2.0 models. The schema changes only through Alembic
migrations in db/migrations; tests check that the migrations produce exactly
these models."""
from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, DateTime, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class CellStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec_text: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[datetime]]

    cells: Mapped[list["Cell"]] = relationship(back_populates="study")


class Cell(Base):
    __tablename__ = "cell"
    __table_args__ = (UniqueConstraint("study_id", "cell_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    # Stable id: hash of the fully resolved config.
    cell_key: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    factors: Mapped[dict[str, Any]]  # factor path -> value, as expanded
    config: Mapped[dict[str, Any]]  # the full resolved config
    status: Mapped[CellStatus] = mapped_column(Enum(CellStatus, native_enum=False, length=16),
                                               default=CellStatus.pending)

    study: Mapped[Study] = relationship(back_populates="cells")
    metrics: Mapped[list["Metric"]] = relationship(back_populates="cell", cascade="all, delete-orphan")


class Metric(Base):
    """One named number of a finished cell. ``top1`` is the final-epoch test
    accuracy; anything selected on the test set carries that in its name."""

    __tablename__ = "metric"
    __table_args__ = (UniqueConstraint("cell_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cell.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[Optional[float]] = mapped_column(Float)

    cell: Mapped[Cell] = relationship(back_populates="metrics")


class EpochMetric(Base):
    __tablename__ = "epoch_metric"
    __table_args__ = (UniqueConstraint("cell_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cell.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    loss: Mapped[Optional[float]] = mapped_column(Float)
    lr: Mapped[Optional[float]] = mapped_column(Float)
    test_top1: Mapped[Optional[float]] = mapped_column(Float)
    heldout_top1: Mapped[Optional[float]] = mapped_column(Float)
    time_s: Mapped[Optional[float]] = mapped_column(Float)
