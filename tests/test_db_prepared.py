"""db.prepared: the driver's statements on the DBAPI cursor must store exactly
what Connection.execute stores, and fail the way it fails (both engines)."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db import records
from db.models import Attempt, AttemptStatus, Provenance
from db.prepared import Prepared
from db.session import session_scope
from db_helpers import cell_dicts, make_study

_attempt = Attempt.__table__


def _row(engine, table, where):
    with engine.connect() as conn:
        return conn.execute(sa.select(table).where(where)).one()


def test_same_values_as_connection_execute(db_engine):
    """Enum, UTC datetime (given in another zone), NULL, JSON and a RETURNING id:
    a row written through Prepared reads back equal to one written by Core."""
    ids = list(make_study(db_engine, "prep", cell_dicts({"x": [1, 2]}, seeds=[0])).values())
    at = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-7)))
    values = {"number": 1, "status": AttemptStatus.running, "started_at": at, "heartbeat_at": at,
              "host": "h", "device": None}
    statement = _attempt.insert().returning(_attempt.c.id)
    prepared = Prepared(statement, ["cell_id", *values])
    with db_engine.begin() as conn:
        core_id = conn.execute(statement, {"cell_id": ids[0], **values}).scalar()
        fast_id = prepared.scalar(conn, {"cell_id": ids[1], **values})
    assert isinstance(fast_id, int) and fast_id != core_id
    core, fast = (_row(db_engine, _attempt, _attempt.c.id == i) for i in (core_id, fast_id))
    assert fast._mapping == {**core._mapping, "id": fast_id, "cell_id": ids[1]}
    assert fast.started_at == at and fast.started_at.utcoffset() == timedelta(0)

    env = {"nested": {"a": [1, 2.5, None]}, "text": "é"}
    with db_engine.begin() as conn:
        records.record_provenance(conn, fast_id, seed=7, git_dirty=True, env=env)
    stored = _row(db_engine, Provenance.__table__, Provenance.attempt_id == fast_id)
    assert stored.env == env and stored.git_dirty is True and stored.seed == 7 and stored.cuda is None


def test_literals_in_a_statement_are_bound(db_engine):
    """start_attempt's max(number) + 1 has literal binds of its own."""
    cell = next(iter(make_study(db_engine, "lit", cell_dicts({"x": [1]}, seeds=[0])).values()))
    with db_engine.begin() as conn:
        first = records.start_attempt(conn, cell)
        second = records.start_attempt(conn, cell)
    numbers = [_row(db_engine, _attempt, _attempt.c.id == a).number for a in (first, second)]
    assert numbers == [1, 2]


def test_database_errors_are_sqlalchemy_errors(db_engine):
    cell = next(iter(make_study(db_engine, "err", cell_dicts({"x": [1]}, seeds=[0])).values()))
    with pytest.raises(sa.exc.IntegrityError):  # no such artifact: a foreign key refuses it
        with db_engine.begin() as conn:
            attempt = records.start_attempt(conn, cell)
            records.use_artifacts(conn, attempt, [987654])
    with pytest.raises(sa.exc.IntegrityError):  # the same metric twice in one result
        with db_engine.begin() as conn:
            records._INSERT_METRICS.executemany(conn, [{"cell_id": cell, "attempt_id": None, "name": "top1",
                                                        "value": 0.5, "is_nan": False}] * 2)
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):  # refused by its type, as Core does
        with db_engine.begin() as conn:
            records.heartbeat(conn, 1, at=datetime(2026, 6, 1))
    # Each failure rolled back its own transaction only; the engine goes on.
    with db_engine.begin() as conn:
        attempt = records.start_attempt(conn, cell)
        records.record_result(conn, cell, {"top1": math.nan}, [], attempt_id=attempt)
        records.finish_attempt(conn, attempt, AttemptStatus.done)
    with session_scope(db_engine) as s:
        assert [a.number for a in s.scalars(sa.select(Attempt).where(Attempt.cell_id == cell))] == [1]
