"""A results database written by an earlier release (revision 0002, commit
d9c3c0f; tests/data/db/read_fixture.py says how it was built) is upgraded by
today's code with every row intact, reads back as that release read it, and
takes new results."""
import importlib.util
import json
import math
import shutil
import sqlite3
from pathlib import Path

from db import records
from db.models import AttemptStatus
from db.queries import attempts_frame, metrics_frame, results_frame
from db.schema import current_revision, head_revision, upgrade
from db.session import make_engine, sqlite_url

FIXTURE = Path(__file__).parent / "data" / "db"


def _reader():
    spec = importlib.util.spec_from_file_location("read_fixture", FIXTURE / "read_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(a, b) -> bool:
    """Equal, value for value, with NaN equal to NaN (floats compared exactly)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_0002_database_upgrades_intact(tmp_path):
    path = tmp_path / "rd3.sqlite"
    shutil.copy(FIXTURE / "rd3_0002.sqlite", path)
    expected = json.loads((FIXTURE / "rd3_0002.expected.json").read_text())
    engine = make_engine(sqlite_url(path))
    assert current_revision(engine) == "0002"
    upgrade(engine)
    assert current_revision(engine) == head_revision() != "0002"

    # Every stored row, value for value, in the columns that release had.
    conn = sqlite3.connect(path)
    for name, table in expected["tables"].items():
        if name == "alembic_version":
            continue
        columns = table["columns"]
        got = [list(r) for r in conn.execute(f"SELECT {', '.join(columns)} FROM {name} "
                                             f"ORDER BY {', '.join(map(str, range(1, len(columns) + 1)))}")]
        assert len(got) == len(table["rows"]) > 0, name
        assert _same(got, table["rows"]), name
    conn.close()

    # Read through today's queries exactly as that release read it.
    rows, study = _reader().rows, expected["study"]
    assert len(expected["results"]) == 2 and len(expected["attempts"]) == 6
    assert _same(rows(results_frame(engine, study)), expected["results"])
    assert _same(rows(metrics_frame(engine, study)), expected["metrics"])
    assert _same(rows(attempts_frame(engine, study, latest_only=False)), expected["attempts"])

    # The upgraded database takes new results: a failed cell's third attempt succeeds.
    failed = next(a["cell_key"] for a in expected["attempts"] if a["status"] == "failed")
    with engine.begin() as tx:
        cell_id = tx.exec_driver_sql("SELECT id FROM cell WHERE cell_key = ?", (failed,)).scalar()
        attempt = records.start_attempt(tx, cell_id)
        records.record_result(tx, cell_id, {"top1": 0.25}, [{"epoch": 1, "loss": 1.5, "train_top1": 0.5,
                                                              "temperature": 4.0}], attempt_id=attempt)
        records.finish_attempt(tx, attempt, AttemptStatus.done)
    latest = attempts_frame(engine, study).set_index("cell_key").loc[failed]
    assert (latest["number"], latest["status"]) == (3, "done")
    assert len(results_frame(engine, study)) == 3
    engine.dispose()
