"""Results for plain SQL (db/views.py): the ``results`` and ``results_<study>``
views give one row per cell with typed columns, the SQL that docs/DATABASE.md
shows runs there as written (read from the page, so the two cannot drift), on
SQLite, through the sqlite3 command and on PostgreSQL, and the views follow
the studies and the migrations."""
import json
import math
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from db import records, views
from db.models import AttemptStatus
from db.queries import run_sql
from db.schema import downgrade, upgrade
from db.session import make_engine, session_scope, sqlite_url
from db_helpers import cell_dicts, finish_cell, make_study

DOC = Path(__file__).resolve().parents[1] / "docs" / "DATABASE.md"
FIXTURE = Path(__file__).parent / "data" / "db"


def _doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)


def _doc_queries() -> dict[str, str]:
    """The one-line queries of the page's plain-SQL block, by the comment above each."""
    block = next(b for b in _doc_blocks("sql") if "FROM results " in b)
    lines = block.strip().splitlines()
    return {comment.removeprefix("--").strip(): query for comment, query in zip(lines[::2], lines[1::2])}


def _doc_statements() -> list[str]:
    """Every statement of every sql block of the page."""
    out = []
    for block in _doc_blocks("sql"):
        text = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
        out += [s.strip() for s in text.split(";") if s.strip()]
    return out


def _studies(engine) -> dict[tuple[str, str], list[float]]:
    """Two studies written through the driver's calls; returns (study, method) ->
    the top-1 of its done cells (NaN included)."""
    done: dict[tuple[str, str], list[float]] = {}
    grid = cell_dicts({"method": ["random_real", "rded"], "protocol.epochs": [10, 20]}, seeds=[0, 1, 2])
    ids = make_study(engine, "protocol_ablation", grid)
    for i, cell in enumerate(grid):
        cell_id, method = ids[cell["cell_key"]], cell["factors"]["method"]
        if i == 0:
            continue  # pending
        if i == 1:
            with session_scope(engine) as s:
                records.finish_attempt(s, records.start_attempt(s, cell_id), AttemptStatus.failed,
                                       error_type="RuntimeError", error_message="boom")
            continue
        top1 = math.nan if i == 2 else 0.25 + 0.5 * (method == "rded") + 0.01 * i
        finish_cell(engine, cell_id, top1, final_loss=1.0 - top1, synth_bytes=3e5)
        done.setdefault(("protocol_ablation", method), []).append(top1)
    # One method: no `method` factor, its name is in the config.
    single = [{**c, "config": {"method": {"name": "sre2l", "ipc": 10}, **c["config"]}}
              for c in cell_dicts({"protocol.labels.mode": ["hard", "soft"]}, seeds=[0, 1])]
    ids = make_study(engine, "single", single)
    for i, cell in enumerate(single):
        finish_cell(engine, ids[cell["cell_key"]], 0.125 * (i + 1))
        done.setdefault(("single", "sre2l"), []).append(0.125 * (i + 1))
    return done


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite)


def test_the_documented_queries_run_as_written(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    done = _studies(engine)
    reader = make_engine(db_url, read_only=True)  # as `query --sql` runs them
    queries = _doc_queries()
    per_method = run_sql(reader, queries["mean final top-1 per method, every study"])
    assert list(per_method.columns) == ["study", "method", "top1", "cells"]
    assert [tuple(r) for r in per_method[["study", "method", "cells"]].itertuples(index=False)] == [
        (study, method, len(tops)) for (study, method), tops in sorted(done.items())]
    assert per_method["top1"].tolist() == pytest.approx([_mean(done[k]) for k in sorted(done)], rel=1e-12)

    by_factors = run_sql(reader, queries["one study by two of its factors"])
    assert list(by_factors.columns) == ["method", "protocol.epochs", "top1", "cells"]
    assert [(m, int(e)) for m, e in zip(by_factors["method"], by_factors["protocol.epochs"])] == [
        ("random_real", 10), ("random_real", 20), ("rded", 10), ("rded", 20)]
    assert by_factors["cells"].sum() == len(done["protocol_ablation", "random_real"]) + len(
        done["protocol_ablation", "rded"])

    for sql in _doc_statements():  # the page's other SQL too (provenance, artifacts, ...)
        run_sql(reader, sql)
    reader.dispose()
    engine.dispose()


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 command is not installed")
def test_the_documented_queries_in_the_sqlite3_command(tmp_path):
    path = tmp_path / "rd3.sqlite"
    engine = make_engine(sqlite_url(path))
    upgrade(engine)
    done = _studies(engine)
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    for sql in _doc_queries().values():
        out = subprocess.run(["sqlite3", "-readonly", "-json", str(path), sql], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        cursor = reader.execute(sql)
        expected = cursor.fetchall()
        got = json.loads(out)
        assert [list(r) for r in got] == [[d[0] for d in cursor.description]] * len(expected) > []
        for row, want in zip(got, expected):
            assert list(row.values()) == [pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for v in want]
    reader.close()

    # The page's shell line, verbatim, in a folder whose results/ holds the database.
    line = next(b for b in _doc_blocks("sh") if b.startswith("sqlite3 ")).strip()
    assert _doc_queries()["mean final top-1 per method, every study"] in line
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "results").symlink_to(tmp_path)
    out = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split() for line in out.stdout.splitlines()[2:]]  # under the header and its rule
    assert [(r[0], r[1], int(r[3])) for r in rows] == [(s, m, len(t)) for (s, m), t in sorted(done.items())]
    engine.dispose()


def _columns(engine, view: str) -> dict[str, str]:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return {r[1]: r[2] for r in conn.exec_driver_sql(f'PRAGMA table_info("{view}")')}
        return dict(conn.execute(sa.text("SELECT column_name, data_type FROM information_schema.columns "
                                         "WHERE table_name = :v ORDER BY ordinal_position"), {"v": view}).all())


def test_study_view_columns_are_typed_by_the_stored_levels(db_engine):
    long = "teacher[resnet-18]." + "very_long_field." * 4 + "name"  # over 63 bytes
    cells = cell_dicts({"protocol.epochs": [10, 20], "lr": [0.1, 1], "bs": ["rded", 128], "flag": [True, False],
                        "teachers": [["a", "b"]], "mode": ["hard"], long: [3]}, seeds=[0])
    ids = make_study(db_engine, "typed", cells)
    for cell in cells:
        finish_cell(db_engine, ids[cell["cell_key"]], 0.5, time_train_s=12.5)
    cut = views._fit(long)
    assert len(cut.encode()) == 63 and cut != long
    types = _columns(db_engine, "results_typed")
    assert list(types) == ["cell_id", "cell_key", "seed", "status", "method", "protocol.epochs", "lr", "bs", "flag",
                           "teachers", "mode", cut, *views.MAIN_METRICS]
    expected = ({"seed": "INTEGER", "protocol.epochs": "BIGINT", "flag": "BOOLEAN", "mode": "TEXT",
                 "teachers": "TEXT", cut: "BIGINT", "top1": "FLOAT", "time_train_s": "FLOAT"}
                if db_engine.dialect.name == "sqlite" else
                {"seed": "integer", "protocol.epochs": "bigint", "lr": "double precision", "bs": "text",
                 "flag": "boolean", "mode": "text", "teachers": "text", cut: "bigint", "top1": "double precision",
                 "time_train_s": "double precision"})
    assert {k: types[k] for k in expected} == expected
    with db_engine.connect() as conn:
        rows = conn.execute(sa.text('SELECT * FROM results_typed ORDER BY "protocol.epochs", lr, bs, flag')).all()
    first = rows[0]._mapping
    assert len(rows) == len(cells) and first["status"] == "done" and first["method"] is None
    assert type(first["protocol.epochs"]) is int and first["protocol.epochs"] == 10
    assert {type(r.lr) for r in rows} == {float} and {r.lr for r in rows} == {0.1, 1.0}
    assert {r.bs for r in rows} == {"rded", "128"}
    assert {bool(r.flag) for r in rows} == {True, False}
    assert first["teachers"] == '["a","b"]' and first[cut] == 3
    assert first["top1"] == 0.5 and first["time_train_s"] == 12.5 and first["final_loss"] is None


def test_nan_is_null_and_every_status_is_a_row(db_engine):
    cells = cell_dicts({"x": [1, 2, 3]}, seeds=[0])
    ids = make_study(db_engine, "nan", cells)
    cell_ids = [ids[c["cell_key"]] for c in cells]
    finish_cell(db_engine, cell_ids[0], math.nan)
    finish_cell(db_engine, cell_ids[1], 0.5)
    with db_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT x, status, top1 FROM results_nan ORDER BY x")).all()
        mean = conn.execute(sa.text("SELECT AVG(top1) FROM results WHERE study = 'nan'")).scalar()
    assert [tuple(r) for r in rows] == [(1, "done", None), (2, "done", 0.5), (3, "pending", None)]
    assert mean == 0.5


def test_view_names_are_plain_distinct_and_short():
    assert views.study_view_name("protocol_ablation") == "results_protocol_ablation"
    names = ["Ablation.v2", "ablation_v2", "ablation-v2", "a" * 55, "a" * 56, "a" * 100, "b" * 100]
    made = [views.study_view_name(n) for n in names]
    assert made[1] == "results_ablation_v2" and made[3] == "results_" + "a" * 55
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"results_[a-z0-9_]+", m) and len(m) <= 63 for m in made)


def test_every_study_gets_its_view(db_engine):
    names = ["Ablation.v2", "ablation_v2", "x" * 100]
    for i, name in enumerate(names):
        ids = make_study(db_engine, name, cell_dicts({"x": list(range(i + 1))}, seeds=[0]))
        finish_cell(db_engine, next(iter(ids.values())), 0.5)
    with db_engine.connect() as conn:
        for i, name in enumerate(names):
            count = conn.execute(sa.text(f"SELECT COUNT(*) FROM {views.study_view_name(name)}")).scalar()
            assert count == i + 1, name
        studies = conn.execute(sa.text("SELECT study, COUNT(*) FROM results GROUP BY study ORDER BY study")).all()
    assert sorted(tuple(r) for r in studies) == sorted((n, i + 1) for i, n in enumerate(names))


def _schema_version(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA schema_version").scalar()


def test_a_study_view_follows_its_factors(db_engine):
    cells = cell_dicts({"x": [1, 2]}, seeds=[0])
    ids = make_study(db_engine, "grows", cells)
    finish_cell(db_engine, ids[cells[0]["cell_key"]], 0.5)
    before = _schema_version(db_engine) if db_engine.dialect.name == "sqlite" else None
    make_study(db_engine, "grows", cells)  # a plain rerun: no DDL, so readers never wait on one
    if before is not None:
        assert _schema_version(db_engine) == before
    # A column the study now names (stored cells relabelled) and a float level of x.
    relabelled = [{**c, "factors": {**c["factors"], "recipe": "rded"}} for c in cells]
    more = cell_dicts({"x": [2.5], "recipe": ["sre2l"]}, seeds=[0])
    make_study(db_engine, "grows", relabelled + more)
    types = _columns(db_engine, "results_grows")
    assert list(types)[5:7] == ["x", "recipe"]
    with db_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT x, recipe, top1 FROM results_grows ORDER BY x")).all()
    assert [tuple(r) for r in rows] == [(1.0, "rded", 0.5), (2.0, "rded", None), (2.5, "sre2l", None)]
    assert {type(r.x) for r in rows} == {float}


def _view_names(engine) -> set[str]:
    return set(sa.inspect(engine).get_view_names())


def test_downgrade_drops_the_views_and_upgrade_builds_them_from_stored_rows(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    done = _studies(engine)
    assert _view_names(engine) == {"results", "results_protocol_ablation", "results_single"}
    downgrade(engine, "0004")  # what the release before the views reads: none left
    assert _view_names(engine) == set()
    upgrade(engine)
    assert _view_names(engine) == {"results", "results_protocol_ablation", "results_single"}
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT study, method, COUNT(top1) FROM results WHERE status = 'done' "
                                    "GROUP BY study, method ORDER BY study, method")).all()
        epochs = conn.execute(sa.text('SELECT DISTINCT "protocol.epochs" FROM results_protocol_ablation')).scalars()
        assert sorted(epochs) == [10, 20]
    assert [tuple(r) for r in rows] == [(s, m, sum(not math.isnan(v) for v in t)) for (s, m), t in
                                        sorted(done.items())]
    engine.dispose()


def test_a_0002_database_gets_the_views_with_its_rows(tmp_path):
    path = tmp_path / "rd3.sqlite"
    shutil.copy(FIXTURE / "rd3_0002.sqlite", path)
    expected = json.loads((FIXTURE / "rd3_0002.expected.json").read_text())
    engine = make_engine(sqlite_url(path))
    upgrade(engine)
    study = expected["study"]
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT cell_key, seed, top1, synth_bytes, method, \"protocol.optim.lr\" "
                                    f"FROM {views.study_view_name(study)} WHERE status = 'done' ORDER BY cell_key"))
        got = [tuple(r) for r in rows]
        config = json.loads(conn.execute(sa.text("SELECT config FROM cell LIMIT 1")).scalar())
    assert [g[:5] for g in got] == [(r["cell_key"], r["seed"], r["top1"], r["synth_bytes"], config["method"]["name"])
                                    for r in sorted(expected["results"], key=lambda r: r["cell_key"])]
    assert [g[5] for g in got] == [r["protocol.optim.lr"] for r in sorted(expected["results"],
                                                                          key=lambda r: r["cell_key"])]
    engine.dispose()
