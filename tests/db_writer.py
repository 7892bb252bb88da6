"""A driver stand-in for the reliability tests: writes results through
db.records exactly as the driver does (one transaction to start an attempt,
one per result) and prints each cell key after its result is committed.

    python tests/db_writer.py URL CELLS EPOCHS [PAUSE_S]
"""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from db import records  # noqa: E402
from db.schema import upgrade  # noqa: E402
from db.session import make_engine, session_scope  # noqa: E402
from db_helpers import cell_dicts, epochs, make_study  # noqa: E402


def main(url: str, n: int, n_epochs: int, pause: float = 0.0) -> None:
    engine = make_engine(url)
    upgrade(engine)
    cells = cell_dicts({"i": list(range(n))}, seeds=[0])
    ids = make_study(engine, "writer", cells)
    print("ready", flush=True)
    for i, cell in enumerate(cells):
        cell_id = ids[cell["cell_key"]]
        with session_scope(engine) as s:
            attempt = records.start_attempt(s, cell_id, host="writer")
        with session_scope(engine) as s:
            metrics = {"top1": 0.5 + i / (2 * n), "final_loss": 1.0 / (i + 1), **{f"m{j}": float(j) for j in range(8)}}
            records.record_result(s, cell_id, metrics, epochs(n_epochs, 0.1), attempt_id=attempt)
            records.finish_attempt(s, attempt, records.AttemptStatus.done)
            records.record_provenance(s, attempt, seed=0, env={"i": i})
        print(cell["cell_key"], flush=True)
        if pause:
            time.sleep(pause)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
