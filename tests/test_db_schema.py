"""The schema: migrations produce exactly the models, an upgrade from the
previous revision keeps every row, newer databases are refused, and values
(NaN, +-inf, UTC times) round-trip faithfully, on SQLite and PostgreSQL."""
import math
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from db import records
from db.models import Attempt, Base, Cell, CellFactor, EpochMetric, Metric
from db.queries import epoch_frame, metrics_frame, results_frame
from db.schema import current_revision, downgrade, head_revision, upgrade
from db.session import BUSY_TIMEOUT_S, DatabaseError, make_engine, session_scope
from db_helpers import cell_dicts, finish_cell, make_study


def test_models_equal_the_migrated_schema(db_engine):
    with db_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert current_revision(db_engine) == head_revision() == "0005"


def test_sqlite_engine_pragmas(tmp_path):
    # What docs/DATABASE.md promises: WAL (readers while a study writes), a busy
    # timeout (writers wait rather than fail), foreign keys enforced, NORMAL sync.
    engine = make_engine(f"sqlite:///{tmp_path / 'rd3.sqlite'}")
    upgrade(engine)
    with engine.connect() as conn:
        pragma = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                  for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")}
    assert pragma == {"journal_mode": "wal", "busy_timeout": BUSY_TIMEOUT_S * 1000, "foreign_keys": 1,
                      "synchronous": 1}
    assert pragma["busy_timeout"] > 0
    engine.dispose()
    reader = make_engine(f"sqlite:///{tmp_path / 'rd3.sqlite'}", read_only=True)
    with reader.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"  # stored in the file
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_S * 1000
        assert conn.exec_driver_sql("PRAGMA query_only").scalar() == 1
    reader.dispose()


def test_compare_catches_a_difference(db_engine):
    # The check above can fail: a column the migrations do not create shows up.
    meta = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(meta)
    meta.tables["metric"].append_column(sa.Column("extra", sa.Integer()))
    with db_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), meta)
    assert any(d[0] == "add_column" and d[3].name == "extra" for d in diff)


def _t(name, *cols):
    return sa.table(name, *(sa.column(c) for c in cols))


def test_upgrade_from_0001_keeps_rows_and_fills_new_tables(db_url):
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    factors = {"protocol.epochs": 50, "protocol.optim.lr": 0.1, "protocol.labels.mode": "hard",
               "flag": True, "teachers": ["a", "b"]}
    with engine.begin() as conn:
        conn.execute(_t("study", "id", "name", "spec_text", "spec_hash", "created_at").insert(),
                     [{"id": 1, "name": "old", "spec_text": "name: old", "spec_hash": "h", "created_at": created}])
        cell = sa.table("cell", sa.column("id"), sa.column("study_id"), sa.column("cell_key"), sa.column("seed"),
                        sa.column("factors", sa.JSON), sa.column("config", sa.JSON), sa.column("status"))
        conn.execute(cell.insert(), [
            {"id": 1, "study_id": 1, "cell_key": "k1", "seed": 0, "factors": factors, "config": {}, "status": "done"},
            {"id": 2, "study_id": 1, "cell_key": "k2", "seed": 1, "factors": {**factors, "protocol.epochs": 150},
             "config": {}, "status": "failed"},
            {"id": 3, "study_id": 1, "cell_key": "k3", "seed": 0, "factors": factors, "config": {},
             "status": "pending"}])
        conn.execute(_t("metric", "cell_id", "name", "value").insert(),
                     [{"cell_id": 1, "name": "top1", "value": 0.75}, {"cell_id": 1, "name": "final_loss",
                                                                      "value": 0.5}])
        conn.execute(_t("epoch_metric", "cell_id", "epoch", "loss", "test_top1").insert(),
                     [{"cell_id": 1, "epoch": e, "loss": 1.0 / e, "test_top1": 0.7} for e in (1, 2)])
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with session_scope(engine) as s:
        assert s.get(Cell, 1).factors == factors  # original JSON kept
        assert {(m.name, m.value) for m in s.scalars(select(Metric))} == {("top1", 0.75), ("final_loss", 0.5)}
        assert [e.loss for e in s.scalars(select(EpochMetric).order_by(EpochMetric.epoch))] == [1.0, 0.5]
        typed = {f.name: f for f in s.scalars(select(CellFactor).where(CellFactor.cell_id == 1))}
        assert {n: f.kind.value for n, f in typed.items()} == {
            "protocol.epochs": "int", "protocol.optim.lr": "float", "protocol.labels.mode": "str", "flag": "bool",
            "teachers": "json"}
        attempts = {a.cell_id: a for a in s.scalars(select(Attempt))}
        assert set(attempts) == {1, 2}  # the pending cell never ran
        assert attempts[1].status.value == "done" and attempts[1].number == 1 and attempts[1].started_at is None
        assert attempts[2].status.value == "failed"
        assert {m.attempt_id for m in s.scalars(select(Metric))} == {attempts[1].id}
        assert {e.attempt_id for e in s.scalars(select(EpochMetric))} == {attempts[1].id}
        assert all(m.is_nan is False for m in s.scalars(select(Metric)))
    frame = results_frame(engine, "old")
    assert len(frame) == 1 and frame.loc[0, "top1"] == 0.75
    assert frame["protocol.epochs"].dtype == "int64" and frame["flag"].dtype == bool
    assert frame.loc[0, "teachers"] == ["a", "b"]
    # And the upgraded database takes new results.
    finish_cell(engine, 3, 0.6)
    assert len(results_frame(engine, "old")) == 2
    engine.dispose()


def _downgrade(engine, revision):
    downgrade(engine, revision)
    assert current_revision(engine) == revision


def test_train_top1_and_temperature_round_trip(db_engine):
    ids = make_study(db_engine, "epochs", cell_dicts({"x": [1]}, seeds=[0]))
    cell_id = next(iter(ids.values()))
    # As rd3core.loop.train reports them: every epoch has both, test_top1 only when evaluated.
    history = [{"epoch": 1, "loss": 2.0, "train_top1": 0.125, "lr": 0.1, "temperature": 4.0, "time_s": 0.5},
               {"epoch": 2, "loss": 1.5, "train_top1": math.nan, "lr": 0.05, "temperature": 2.5, "time_s": 0.5,
                "test_top1": 0.375}]
    with session_scope(db_engine) as s:
        attempt = records.start_attempt(s, cell_id)
        records.record_result(s, cell_id, {"top1": 0.375}, history, attempt_id=attempt)
        records.finish_attempt(s, attempt, records.AttemptStatus.done)
    with session_scope(db_engine) as s:
        rows = list(s.scalars(select(EpochMetric).where(EpochMetric.cell_id == cell_id).order_by(EpochMetric.epoch)))
        assert [(r.train_top1, r.temperature) for r in rows] == [(0.125, 4.0), (None, 2.5)]
        assert rows[1].nan_fields == "train_top1"
        values = [r.values() for r in rows]
    assert values[0] == {"loss": 2.0, "lr": 0.1, "test_top1": None, "heldout_top1": None, "time_s": 0.5,
                         "train_top1": 0.125, "temperature": 4.0}
    assert math.isnan(values[1]["train_top1"]) and values[1]["temperature"] == 2.5
    frame = epoch_frame(db_engine, "epochs")
    assert frame["train_top1"].tolist()[0] == 0.125 and math.isnan(frame["train_top1"].tolist()[1])
    assert frame["temperature"].tolist() == [4.0, 2.5] and frame["epoch"].tolist() == [1, 2]


def test_upgrade_from_0002_keeps_epoch_rows(db_url):
    engine = make_engine(db_url)
    upgrade(engine, "0002")
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with engine.begin() as conn:
        conn.execute(_t("study", "id", "name", "spec_text", "spec_hash", "created_at").insert(),
                     [{"id": 1, "name": "old", "spec_text": "name: old", "spec_hash": "h", "created_at": created}])
        cell = sa.table("cell", sa.column("id"), sa.column("study_id"), sa.column("cell_key"), sa.column("seed"),
                        sa.column("factors", sa.JSON), sa.column("config", sa.JSON), sa.column("status"))
        conn.execute(cell.insert(), [{"id": c, "study_id": 1, "cell_key": f"k{c}", "seed": 0, "factors": {"x": c},
                                      "config": {}, "status": s} for c, s in ((1, "done"), (2, "pending"))])
        conn.execute(_t("attempt", "id", "cell_id", "number", "status").insert(),
                     [{"id": 7, "cell_id": 1, "number": 1, "status": "done"}])
        conn.execute(_t("epoch_metric", "cell_id", "attempt_id", "epoch", "loss", "lr", "test_top1", "time_s",
                        "nan_fields").insert(),
                     [{"cell_id": 1, "attempt_id": 7, "epoch": e, "loss": 1.0 / e, "lr": 0.1, "test_top1": None,
                       "time_s": 0.25, "nan_fields": "test_top1" if e == 2 else None} for e in (1, 2)])
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with session_scope(engine) as s:
        rows = list(s.scalars(select(EpochMetric).order_by(EpochMetric.epoch)))
        assert [(r.cell_id, r.attempt_id, r.epoch, r.loss, r.lr, r.time_s) for r in rows] == [
            (1, 7, 1, 1.0, 0.1, 0.25), (1, 7, 2, 0.5, 0.1, 0.25)]
        assert [(r.train_top1, r.temperature) for r in rows] == [(None, None), (None, None)]
        assert rows[0].values()["test_top1"] is None and math.isnan(rows[1].values()["test_top1"])
    # The upgraded database stores the new columns...
    with session_scope(engine) as s:
        records.record_result(s, 2, {"top1": 0.5}, [{"epoch": 1, "loss": 0.75, "train_top1": 0.25,
                                                      "temperature": 4.0}])
    assert epoch_frame(engine, "old")[["epoch", "train_top1", "temperature"]].values.tolist()[-1] == [1, 0.25, 4.0]
    # ...and a downgrade to 0002 drops them, keeping every row.
    _downgrade(engine, "0002")
    with engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT cell_id, epoch, loss FROM epoch_metric ORDER BY cell_id, epoch")).all()
    assert [tuple(r) for r in kept] == [(1, 1, 1.0), (1, 2, 0.5), (2, 1, 0.75)]
    engine.dispose()


def test_downgrade_to_0001_and_back(db_engine):
    ids = make_study(db_engine, "s", cell_dicts({"x": [1, 2]}, seeds=[0]))
    finish_cell(db_engine, ids[next(iter(ids))], 0.5)
    _downgrade(db_engine, "0001")
    upgrade(db_engine)
    assert len(results_frame(db_engine, "s")) == 1


def test_database_from_newer_code_is_refused(db_engine):
    with db_engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(DatabaseError, match="newer than this code"):
        upgrade(db_engine)


def test_nan_and_infinities_round_trip(db_engine):
    ids = make_study(db_engine, "floats", cell_dicts({"lr": [math.inf, math.nan, -0.5]}, seeds=[0]))
    metrics = {"top1": 0.5, "nan_metric": math.nan, "pos_inf": math.inf, "neg_inf": -math.inf, "tiny": 5e-324,
               "missing": None}
    history = [{"epoch": 1, "loss": math.nan, "lr": math.inf, "test_top1": -math.inf, "time_s": 1.0},
               {"epoch": 2, "loss": 0.25}]
    for cell_id in ids.values():
        with session_scope(db_engine) as s:
            records.record_result(s, cell_id, metrics, history)
    with session_scope(db_engine) as s:
        stored = {m.name: m.number for m in s.scalars(select(Metric).where(Metric.cell_id == next(iter(ids.values()))))}
        rows = [e.values() for e in s.scalars(select(EpochMetric).where(EpochMetric.cell_id == next(
            iter(ids.values()))).order_by(EpochMetric.epoch))]
    assert math.isnan(stored.pop("nan_metric"))
    assert stored == {"top1": 0.5, "pos_inf": math.inf, "neg_inf": -math.inf, "tiny": 5e-324, "missing": None}
    assert math.isnan(rows[0]["loss"]) and rows[0]["lr"] == math.inf and rows[0]["test_top1"] == -math.inf
    assert rows[1] == {"loss": 0.25, "lr": None, "test_top1": None, "heldout_top1": None, "time_s": None,
                       "train_top1": None, "temperature": None}
    long = metrics_frame(db_engine, "floats")
    nan_rows = long[long.name == "nan_metric"]
    assert len(nan_rows) == 3 and nan_rows.value.isna().all()
    assert (long[long.name == "missing"].value.isna()).all()  # NULL stays NULL (NaN in a float frame)
    assert (long[long.name == "neg_inf"].value == -math.inf).all()
    frame = results_frame(db_engine, "floats")
    levels = frame["lr"].tolist()
    assert frame["lr"].dtype == "float64" and math.inf in levels and -0.5 in levels
    assert sum(math.isnan(v) for v in levels) == 1
    assert (frame["pos_inf"] == math.inf).all()


def test_times_are_utc_and_timezone_aware(db_engine):
    ids = make_study(db_engine, "times", cell_dicts({"x": [1]}, seeds=[0]))
    india = timezone(timedelta(hours=5, minutes=30))
    started = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=india)
    with session_scope(db_engine) as s:
        attempt = records.start_attempt(s, next(iter(ids.values())), started_at=started)
    with session_scope(db_engine) as s:
        row = s.get(Attempt, attempt)
        assert row.started_at == started  # the same instant...
        assert row.started_at.utcoffset() == timedelta(0)  # ...expressed in UTC
        assert row.started_at.hour == 6 and row.started_at.minute == 30
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        with session_scope(db_engine) as s:
            records.heartbeat(s, attempt, at=datetime(2026, 6, 1, 12, 0))
