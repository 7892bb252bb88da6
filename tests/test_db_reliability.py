"""Crash safety and concurrency with real processes: a writer killed with
SIGKILL mid-write leaves a sound database with every committed result whole;
readers work while a study writes. On SQLite and PostgreSQL."""
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from db.models import Cell, CellStatus, EpochMetric, Metric
from db.queries import results_frame, status_counts
from db.session import make_engine, session_scope

WRITER = Path(__file__).resolve().parent / "db_writer.py"
METRICS_PER_RESULT = 10


def start_writer(url: str, cells: int, n_epochs: int, pause: float = 0.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(WRITER), url, str(cells), str(n_epochs), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def test_sigkill_mid_write_keeps_every_committed_result(db_url):
    n_epochs = 300  # big transactions: the kill most likely lands inside one
    writer = start_writer(db_url, cells=2000, n_epochs=n_epochs)
    committed = []
    while len(committed) < 25:
        line = writer.stdout.readline()
        assert line, writer.stderr.read()
        committed.append(line.strip())
    time.sleep(0.013)  # somewhere inside the next result's writes
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    committed += [line.strip() for line in writer.stdout.read().splitlines()]  # printed, so committed
    assert writer.returncode == -signal.SIGKILL

    engine = make_engine(db_url)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
    with session_scope(engine) as s:
        done = set(s.scalars(select(Cell.cell_key).where(Cell.status == CellStatus.done)))
        metrics = dict(s.execute(select(Cell.cell_key, func.count(Metric.id)).join(Metric)
                                 .group_by(Cell.cell_key)).all())
        epochs = dict(s.execute(select(Cell.cell_key, func.count(EpochMetric.id)).join(EpochMetric)
                                .group_by(Cell.cell_key)).all())
    assert set(committed) <= done  # every committed result is there...
    assert len(done - set(committed)) <= 1  # (one may have committed and died before printing)
    for key in done:  # ...and whole: no result is half written
        assert metrics[key] == METRICS_PER_RESULT and epochs[key] == n_epochs
    assert set(metrics) == done and set(epochs) == done
    assert len(results_frame(engine, "writer")) == len(done)
    engine.dispose()


def test_readers_work_while_a_study_writes(db_url):
    total = 60
    writer = start_writer(db_url, cells=total, n_epochs=20, pause=0.01)
    reader = make_engine(db_url, read_only=True) if db_url.startswith("sqlite") else make_engine(db_url)
    seen = []
    try:
        while writer.poll() is None:
            frame = results_frame(reader, "writer")
            counts = status_counts(reader, "writer")
            assert counts["done"] >= len(frame)  # a cell may finish between the two reads
            seen.append(len(frame))
        assert writer.returncode == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
    final = results_frame(reader, "writer")
    reader.dispose()
    assert len(final) == total
    assert seen == sorted(seen)  # results only ever appear
    assert any(0 < n < total for n in seen), seen  # some reads happened mid-study
