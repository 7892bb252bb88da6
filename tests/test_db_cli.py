"""`python -m orchestrator query` and `status` on both engines, and the
database errors every command reports as one clear line with exit status 2."""
import json
import os
import shutil
import socket
import struct
import subprocess

import pandas as pd
import pytest
from sqlalchemy import func, select, text

from db import records
from db.models import Metric
from db.schema import upgrade
from db.session import make_engine, session_scope
from db_helpers import cell_dicts, finish_cell, make_study
from conftest import run_cli
from orchestrator.cli import main

GRID = {"protocol.labels.mode": ["hard", "epochwise"], "protocol.epochs": [50, 150]}


@pytest.fixture
def filled(db_engine, db_url):
    """A study with cells in every state: 5 done, 1 running, 1 failed, 1 pending."""
    cells = cell_dicts(GRID, seeds=[0, 1])
    ids = make_study(db_engine, "ablation", cells)
    order = [ids[c["cell_key"]] for c in cells]
    for i, cell_id in enumerate(order[:5]):
        finish_cell(db_engine, cell_id, 0.5 + i / 10)
    with session_scope(db_engine) as s:
        records.start_attempt(s, order[5], host="worker-1")
        failed = records.start_attempt(s, order[6])
        records.finish_attempt(s, failed, records.AttemptStatus.failed, error_type="NonFiniteLoss",
                               error_message="loss became nan in epoch 3")
    return db_url


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_query_lists_studies_then_a_study_in_every_format(filled, capsys):
    code, out, _ = cli(capsys, "query", "--db", filled)
    assert code == 0 and "ablation" in out and "done" in out
    code, out, _ = cli(capsys, "query", "--db", filled, "--format", "json")
    (study,) = json.loads(out)
    assert study["study"] == "ablation" and study["done"] == 5 and study["finished_at"] is None
    assert study["created_at"].endswith("+00:00")
    code, out, _ = cli(capsys, "query", "--db", filled, "--study", "ablation", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 5
    assert {type(r["protocol.epochs"]) for r in rows} == {int} and {r["protocol.labels.mode"] for r in rows} == {
        "hard", "epochwise"}
    assert all(0.5 <= r["top1"] <= 0.9 for r in rows)
    code, out, _ = cli(capsys, "query", "--db", filled, "--study", "ablation", "--where", "protocol.epochs=50",
                       "--where", "protocol.labels.mode=hard", "--format", "csv")
    frame = pd.read_csv(pd.io.common.StringIO(out))
    assert code == 0 and len(frame) >= 1 and set(frame["protocol.epochs"]) == {50}
    assert set(frame["protocol.labels.mode"]) == {"hard"}
    code, out, _ = cli(capsys, "query", "--db", filled, "--study", "ablation")
    assert code == 0 and "top1" in out.splitlines()[0]


def test_status_shows_cells_per_state(filled, capsys):
    code, out, _ = cli(capsys, "status", "ablation", "--db", filled)
    assert code == 0
    assert "8 cells: 1 pending, 1 running, 5 done, 1 failed" in out
    assert "worker-1" in out and "NonFiniteLoss: loss became nan in epoch 3" in out
    code, _, err = cli(capsys, "status", "nope", "--db", filled)
    assert code == 2 and "no study named 'nope'" in err and "ablation" in err


def test_query_errors_are_one_line_exit_2(filled, capsys):
    for args, message in [(["--study", "nope"], "no study named"),
                          (["--study", "ablation", "--where", "epochs=50"], "not a factor"),
                          (["--study", "ablation", "--where", "protocol.epochs"], "expected FACTOR=VALUE"),
                          (["--where", "protocol.epochs=50"], "needs --study"),
                          (["--sql", "SELECT 1", "--study", "ablation"], "--sql runs on its own"),
                          (["--sql", "SELECT * FROM no_such_table"], "refused by the database")]:
        code, _, err = cli(capsys, "query", "--db", filled, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


WRITES = ["DELETE FROM metric", "UPDATE metric SET value = 0", "INSERT INTO study (name, spec_text, spec_hash, "
          "created_at) VALUES ('x', '', '', '2026-01-01')", "DROP TABLE metric", "CREATE TABLE sneaky (x INTEGER)",
          "SELECT 1; DELETE FROM metric", "COMMIT; DELETE FROM metric",
          "WITH gone AS (DELETE FROM metric RETURNING id) SELECT count(*) FROM gone"]


def test_sql_is_read_only_at_the_database_level(filled, capsys, tmp_path):
    code, out, _ = cli(capsys, "query", "--db", filled, "--sql",
                       "SELECT name, count(*) AS n FROM metric WHERE name LIKE 'top%' GROUP BY name", "--format",
                       "json")
    assert code == 0 and json.loads(out) == [{"name": "top1", "n": 5}]
    code, out, _ = cli(capsys, "query", "--db", filled, "--sql", "SELECT metric_names, metric_values FROM cell "
                       "WHERE metric_values IS NOT NULL", "--format", "json")
    packed = json.loads(out)  # a BLOB column comes out as hex
    assert code == 0 and len(packed) == 5 and {r["metric_names"] for r in packed} == {'["top1"]'}
    assert sorted(struct.unpack("<d", bytes.fromhex(r["metric_values"]))[0] for r in packed) == pytest.approx(
        [0.5, 0.6, 0.7, 0.8, 0.9])
    sneaky = tmp_path / "sneaky.sqlite"
    engine = make_engine(filled)
    with session_scope(engine) as s:
        before = s.scalar(select(func.count()).select_from(Metric))
    for sql in WRITES + [f"ATTACH DATABASE '{sneaky}' AS sneaky"]:
        code, _, err = cli(capsys, "query", "--db", filled, "--sql", sql)
        assert code == 2 and "error:" in err, (sql, err)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Metric)) == before
        tables = s.execute(text("SELECT count(*) FROM study")).scalar()
    assert tables == 1 and not sneaky.exists()
    engine.dispose()


def test_newer_schema_is_refused_by_every_command(filled, capsys, tiny_study, tmp_path):
    engine = make_engine(filled)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    for args in (["query", "--db", filled], ["status", "ablation", "--db", filled],
                 ["run", str(tiny_study()), "--db", filled, "--out", str(tmp_path / "out"), "--executor", "local"]):
        code, out, err = cli(capsys, *args)
        assert code == 2 and "newer than this code" in err and "9999_future" in err, args
        assert "study" not in out  # refused before any job ran


def test_query_on_an_old_schema_says_how_to_upgrade(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = make_engine(url)
    upgrade(engine, "0001")
    engine.dispose()
    code, _, err = cli(capsys, "query", "--db", url)
    assert code == 2 and "older than this code" in err and "0001" in err


# Real processes: the messages reach the terminal without a traceback.

def assert_clean_failure(proc, *phrases):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_bad_urls_and_unreachable_servers(tmp_path, capsys):
    for args, message in [(["query", "--db", "not a url"], "not a database URL"),
                          (["status", "x", "--db", "mysqlx://nowhere/db"], "unsupported database URL"),
                          (["query", "--out", str(tmp_path / "empty")], "no results database")]:
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    proc = run_cli("query", "--db", f"postgresql://rd3:secret@127.0.0.1:{port}/rd3")
    assert_clean_failure(proc, "cannot connect", f"127.0.0.1:{port}")
    assert "secret" not in proc.stderr  # passwords never printed


@pytest.fixture
def read_only_db(tmp_path):
    """The URL of a results database the current user cannot write: chmod for a
    normal user; root ignores permissions, so then the immutable attribute, or
    where that is not allowed (containers without CAP_LINUX_IMMUTABLE) SQLite's
    own read-only open (mode=ro), which fails writes the same way."""
    path = tmp_path / "ro" / "rd3.sqlite"
    path.parent.mkdir()
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    make_study(engine, "ablation", cell_dicts(GRID, seeds=[0]))
    engine.dispose()
    if os.geteuid() != 0:
        path.chmod(0o444)
        path.parent.chmod(0o555)
        yield f"sqlite:///{path}"
        path.parent.chmod(0o755)
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        try:
            yield f"sqlite:///{path}"
        finally:
            subprocess.run(["chattr", "-i", str(path)])
    else:
        yield f"sqlite:///file:{path}?mode=ro&uri=true"


def test_read_only_database_file(read_only_db, tiny_study, tmp_path):
    url = read_only_db
    proc = run_cli("run", str(tiny_study()), "--db", url, "--out", str(tmp_path / "out"), "--executor", "local")
    assert_clean_failure(proc, "read-only")
    assert "to run" not in proc.stdout  # no job started
    # Reading a read-only file works.
    proc = run_cli("status", "ablation", "--db", url)
    assert proc.returncode == 0 and "4 cells: 4 pending" in proc.stdout, proc.stderr
