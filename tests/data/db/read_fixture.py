"""What a release reads from tests/data/db/rd3_0002.sqlite, as JSON on stdout.

The fixture is a real results database written by the code at revision 0002
(commit d9c3c0f): `fixture_0002.yaml` run with that code's driver, then again
with `--retry-failed`: 2 cells done, 2 that diverge to NaN, with two failed
attempts each. Rebuilt, from this checkout, with

    git worktree add /tmp/rd3-0002 d9c3c0f
    (cd /tmp/rd3-0002 && python -m orchestrator run $OLDPWD/tests/data/db/fixture_0002.yaml \
        --out /tmp/fx --executor local)    # and the same with --retry-failed
    cp /tmp/fx/rd3.sqlite tests/data/db/rd3_0002.sqlite
    (cd /tmp/rd3-0002 && PYTHONPATH=. python $OLDPWD/tests/data/db/read_fixture.py \
        $OLDPWD/tests/data/db/rd3_0002.sqlite) > tests/data/db/rd3_0002.expected.json

tests/test_db_upgrade_fixture.py upgrades a copy with today's code and compares.
"""
import json
import sqlite3
import sys

import pandas as pd

from db.queries import attempts_frame, metrics_frame, results_frame
from db.session import make_engine, sqlite_url


def rows(frame: pd.DataFrame) -> list[dict]:
    out = []
    for record in frame.to_dict(orient="records"):
        clean = {}
        for key, value in record.items():
            if hasattr(value, "isoformat"):
                value = value.isoformat()
            elif hasattr(value, "item"):
                value = value.item()
            clean[key] = None if value is pd.NA or value is pd.NaT else value
        out.append(clean)
    return out


def main(path: str) -> None:
    engine = make_engine(sqlite_url(path))
    conn = sqlite3.connect(path)
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    tables = {}
    for name in names:
        width = len(conn.execute(f"PRAGMA table_info({name})").fetchall())
        cursor = conn.execute(f"SELECT * FROM {name} ORDER BY {', '.join(map(str, range(1, width + 1)))}")
        tables[name] = {"columns": [d[0] for d in cursor.description], "rows": [list(r) for r in cursor]}
    study = conn.execute("SELECT name FROM study").fetchone()[0]
    print(json.dumps({"study": study, "tables": tables, "results": rows(results_frame(engine, study)),
                      "metrics": rows(metrics_frame(engine, study)),
                      "attempts": rows(attempts_frame(engine, study, latest_only=False))}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
