"""Typed SQLAlchemy 2.0 models. The schema changes only through Alembic
migrations in db/migrations; tests check that the migrations produce exactly
these models, on SQLite and PostgreSQL."""
from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, Enum, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .types import FactorKind, UTCDateTime, join_float

# As the training loop reports them (rd3core.loop.train), one column each.
EPOCH_FLOATS = ("loss", "lr", "test_top1", "heldout_top1", "time_s", "train_top1", "temperature")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class CellStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


# One concept: a cell's status is the status of its latest attempt (pending
# before the first one).
AttemptStatus = CellStatus


def _status_column():
    return Enum(CellStatus, native_enum=False, length=16)


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
    factors: Mapped[dict[str, Any]]  # factor path -> value, as expanded (typed copy: cell_factor)
    config: Mapped[dict[str, Any]]  # the full resolved config
    status: Mapped[CellStatus] = mapped_column(_status_column(), default=CellStatus.pending)
    # A copy of the cell's metric rows (types.pack_metrics), written with them:
    # results_frame reads one row per cell instead of one per metric. The metric
    # table is the record; SQL reads that.
    metric_names: Mapped[Optional[str]] = mapped_column(Text)
    metric_values: Mapped[Optional[bytes]] = mapped_column(LargeBinary)

    study: Mapped[Study] = relationship(back_populates="cells")
    metrics: Mapped[list["Metric"]] = relationship(back_populates="cell", cascade="all, delete-orphan",
                                                   passive_deletes=True)
    factor_values: Mapped[list["CellFactor"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    attempts: Mapped[list["Attempt"]] = relationship(back_populates="cell", cascade="all, delete-orphan",
                                                     passive_deletes=True, order_by="Attempt.number")


class CellFactor(Base):
    """One factor level of a cell, typed: ``kind`` says which value column holds
    it (a float factor with a NULL value_float is NaN; kind 'null' is None)."""

    __tablename__ = "cell_factor"

    cell_id: Mapped[int] = mapped_column(ForeignKey("cell.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[FactorKind] = mapped_column(Enum(FactorKind, native_enum=False, length=8))
    value_int: Mapped[Optional[int]] = mapped_column(BigInteger)
    value_float: Mapped[Optional[float]] = mapped_column(Float)
    value_str: Mapped[Optional[str]] = mapped_column(Text)
    value_bool: Mapped[Optional[bool]] = mapped_column(Boolean)


class Attempt(Base):
    """One run of a cell's job. Numbered per cell from 1; times are UTC."""

    __tablename__ = "attempt"
    __table_args__ = (UniqueConstraint("cell_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cell.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[CellStatus] = mapped_column(_status_column(), default=CellStatus.pending)
    started_at: Mapped[Optional[datetime]]  # handed to the executor
    ended_at: Mapped[Optional[datetime]]
    heartbeat_at: Mapped[Optional[datetime]]
    host: Mapped[Optional[str]] = mapped_column(String(255))
    device: Mapped[Optional[str]] = mapped_column(String(64))
    error_type: Mapped[Optional[str]] = mapped_column(String(200))
    error_message: Mapped[Optional[str]] = mapped_column(Text)
    traceback: Mapped[Optional[str]] = mapped_column(Text)

    cell: Mapped[Cell] = relationship(back_populates="attempts")
    provenance: Mapped[Optional["Provenance"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class Provenance(Base):
    """What produced an attempt's numbers: the code (git commit, dirty flag,
    package versions), the machine (Python, CUDA, GPU), the data and the seed.
    ``env`` keeps everything the worker reported, verbatim."""

    __tablename__ = "provenance"

    attempt_id: Mapped[int] = mapped_column(ForeignKey("attempt.id", ondelete="CASCADE"), primary_key=True)
    git_commit: Mapped[Optional[str]] = mapped_column(String(64))
    git_dirty: Mapped[Optional[bool]] = mapped_column(Boolean)
    project_version: Mapped[Optional[str]] = mapped_column(String(64))
    python: Mapped[Optional[str]] = mapped_column(String(64))
    torch: Mapped[Optional[str]] = mapped_column(String(64))
    torchvision: Mapped[Optional[str]] = mapped_column(String(64))
    timm: Mapped[Optional[str]] = mapped_column(String(64))
    ray: Mapped[Optional[str]] = mapped_column(String(64))
    cuda: Mapped[Optional[str]] = mapped_column(String(32))
    gpu: Mapped[Optional[str]] = mapped_column(String(200))
    dataset_fingerprint: Mapped[Optional[str]] = mapped_column(String(128))
    seed: Mapped[Optional[int]] = mapped_column(BigInteger)
    env: Mapped[dict[str, Any]]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A stage output in an artifact store: ``stage`` is its kind (teacher,
    synth, ...), ``key`` its content key, ``config`` what produced it."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("stage", "key", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactUse(Base):
    """Which artifacts an attempt read (its distilled set, its teachers)."""

    __tablename__ = "artifact_use"

    attempt_id: Mapped[int] = mapped_column(ForeignKey("attempt.id", ondelete="CASCADE"), primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifact.id", ondelete="CASCADE"), primary_key=True,
                                             index=True)


class Metric(Base):
    """One named number of a finished cell. ``top1`` is the final-epoch test
    accuracy; anything selected on the test set carries that in its name
    (``*_on_test``), see records.check_metric_name. NaN: value NULL, is_nan true."""

    __tablename__ = "metric"
    # The unique index leads with cell_id: it serves cell lookups too (one index
    # fewer to write per result).
    __table_args__ = (UniqueConstraint("cell_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cell.id", ondelete="CASCADE"))
    attempt_id: Mapped[Optional[int]] = mapped_column(ForeignKey("attempt.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[Optional[float]] = mapped_column(Float)
    is_nan: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    cell: Mapped[Cell] = relationship(back_populates="metrics")

    @property
    def number(self) -> float | None:
        """The value with NaN restored."""
        return join_float(self.value, self.is_nan)


class EpochMetric(Base):
    """Per-epoch history. ``nan_fields`` names the columns (comma separated)
    whose NULL stands for NaN."""

    __tablename__ = "epoch_metric"
    __table_args__ = (UniqueConstraint("cell_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cell.id", ondelete="CASCADE"))
    attempt_id: Mapped[Optional[int]] = mapped_column(ForeignKey("attempt.id", ondelete="SET NULL"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    loss: Mapped[Optional[float]] = mapped_column(Float)
    lr: Mapped[Optional[float]] = mapped_column(Float)
    test_top1: Mapped[Optional[float]] = mapped_column(Float)
    heldout_top1: Mapped[Optional[float]] = mapped_column(Float)
    time_s: Mapped[Optional[float]] = mapped_column(Float)
    train_top1: Mapped[Optional[float]] = mapped_column(Float)  # on the augmented training batches
    temperature: Mapped[Optional[float]] = mapped_column(Float)  # the distillation loss's, this epoch
    nan_fields: Mapped[Optional[str]] = mapped_column(String(200))

    def values(self) -> dict[str, float | None]:
        """The float columns with NaN restored."""
        nan = set((self.nan_fields or "").split(","))
        return {f: join_float(getattr(self, f), f in nan) for f in EPOCH_FLOATS}
