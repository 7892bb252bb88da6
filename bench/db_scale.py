"""Results database at scale: 100,000 cells with results and 10 epochs each.

Writes go through the driver's own calls (db.records on one held connection,
one transaction to start each attempt and one per result, as
orchestrator.execution.recorder does), then
results_frame loads the whole study; then the same results again through the
bulk-import path (records.import_results, 1,000 results per transaction). SQLite always; PostgreSQL too when
--postgres URL or RD3_TEST_POSTGRES_URL names one (a database is created and
dropped). Targets: >= 1,000 results/s on SQLite, results_frame < 2 s.

    python bench/db_scale.py            # 100,000 cells
    python bench/db_scale.py --quick    # 2,000 cells, for the test suite

The last line is one JSON object with the SQLite figures: {"inserts_per_s":
(driver path), "results_frame_s": ..., "cells": ..., "batch_inserts_per_s": ...}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import records  # noqa: E402
from db.models import AttemptStatus  # noqa: E402
from db.queries import results_frame  # noqa: E402
from db.schema import upgrade  # noqa: E402
from db.session import make_engine, session_scope, sqlite_url  # noqa: E402

ENV = {"host": "bench", "pid": 1, "python": "3.11.7", "torch": "2.14.1", "threads": 1, "torchvision": "0.29.1",
       "timm": "1.0.31", "ray": "2.60.0", "rd3bench": "0.1.0"}
PROVENANCE = {"git_commit": "0" * 40, "git_dirty": False, "python": "3.11.7", "torch": "2.14.1", "env": ENV,
              "dataset_fingerprint": "f" * 16}
BATCH = 1000


def study_cells(n: int) -> list[dict]:
    """n cells of a 4-factor grid (str, int, float, bool levels) x seeds."""
    methods, epochs, lrs, flags = ["sre2l", "rded", "cda", "edc", "random_real"], [50, 100, 300, 1000], \
        [0.001, 0.01, 0.1], [True, False]
    cells = []
    for i in range(n):
        factors = {"method": methods[i % 5], "protocol.epochs": epochs[(i // 5) % 4],
                   "protocol.optim.lr": lrs[(i // 20) % 3], "protocol.ema": flags[(i // 60) % 2]}
        seed = i // 120
        cells.append({"cell_key": uuid.UUID(int=i + 1).hex, "seed": seed, "factors": factors,
                      "config": {"factors": factors, "seed": seed, "dataset": {"name": "cifar10"}}})
    return cells


def result(i: int) -> tuple[dict, list[dict]]:
    """A result shaped like the driver's: 12 metrics and 10 epochs."""
    top1 = 0.3 + (i % 1000) / 2000
    metrics = {"top1": top1, "top1_best_on_test": top1 + 0.01, "top1_heldout_selected": top1 - 0.002,
               "heldout_selected_epoch": 9.0, "final_loss": 0.5, "time_setup_s": 0.1, "time_train_s": 12.5,
               "time_eval_s": 1.5, "time_images_per_s": 2500.0, "time_peak_memory_bytes": 1.2e9,
               "synth_wall_s": 3.0, "synth_images_bytes": 614400.0}
    history = [{"epoch": e + 1, "loss": 2.0 / (e + 1), "lr": 0.1 * (1 - e / 10), "time_s": 1.25,
                "test_top1": top1 - 0.01 * (9 - e)} for e in range(10)]
    return metrics, history


def run(url: str, n: int, label: str) -> dict:
    engine = make_engine(url)
    upgrade(engine)
    cells = study_cells(n)
    t0 = time.perf_counter()
    with session_scope(engine) as s:
        study = records.ensure_study(s, "scale", "name: scale\n", "0" * 64)
        ids = records.sync_cells(s, study, cells)
    sync_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with engine.connect() as conn:  # the driver's one connection (orchestrator.execution.recorder)
        for i, cell in enumerate(cells):
            cell_id = ids[cell["cell_key"]]
            with conn.begin():  # the driver, when it hands the job over
                attempt = records.start_attempt(conn, cell_id)
            metrics, history = result(i)
            with conn.begin():  # the driver, when the result arrives: one transaction
                records.record_result(conn, cell_id, metrics, history, attempt_id=attempt)
                records.finish_attempt(conn, attempt, AttemptStatus.done, host="bench", device="cpu",
                                       started_at=datetime.now(timezone.utc))
                records.record_provenance(conn, attempt, seed=cell["seed"], **PROVENANCE)
    insert_s = time.perf_counter() - t0
    frame_s = []
    for _ in range(2):  # the first read also warms the OS cache
        t0 = time.perf_counter()
        frame = results_frame(engine, "scale")
        frame_s.append(time.perf_counter() - t0)
    assert len(frame) == n and frame["protocol.epochs"].dtype == "int64" and frame["protocol.ema"].dtype == bool
    batch_s = bulk_import(engine, n)
    engine.dispose()
    figures = {"inserts_per_s": round(n / insert_s, 1), "results_frame_s": round(min(frame_s), 3),
               "results_frame_first_s": round(frame_s[0], 3), "batch_inserts_per_s": round(n / batch_s, 1),
               "sync_cells_s": round(sync_s, 2), "cells": n}
    print(f"{label}: {n} cells synced in {sync_s:.2f}s; driver path (a transaction per result): {n} results in "
          f"{insert_s:.1f}s = {n / insert_s:.0f} results/s; bulk import (records.import_results, "
          f"{BATCH} per transaction): {n / batch_s:.0f} results/s; results_frame {min(frame_s):.3f}s "
          f"({frame.shape[0]} rows x {frame.shape[1]} columns)", flush=True)
    return figures


def bulk_import(engine, n: int) -> float:
    """The same results into a second study through records.import_results."""
    cells = [{**c, "cell_key": "i" + c["cell_key"][1:]} for c in study_cells(n)]
    with session_scope(engine) as s:
        ids = records.sync_cells(s, records.ensure_study(s, "scale_import", "name: scale_import\n", "1" * 64), cells)
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, n)):
            metrics, history = result(i)
            batch.append({"cell_id": ids[cells[i]["cell_key"]], "metrics": metrics, "epochs": history,
                          "host": "bench", "device": "cpu", "provenance": {**PROVENANCE, "seed": cells[i]["seed"]}})
        with engine.begin() as s:
            records.import_results(s, batch)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="2,000 cells (smoke test)")
    parser.add_argument("--postgres", default=os.environ.get("RD3_TEST_POSTGRES_URL"),
                        help="admin URL of a PostgreSQL server (default: RD3_TEST_POSTGRES_URL; none: SQLite only)")
    args = parser.parse_args()
    n = 2_000 if args.quick else args.cells
    with tempfile.TemporaryDirectory(prefix="rd3-dbscale-") as tmp:
        sqlite = run(sqlite_url(Path(tmp) / "scale.sqlite"), n, "sqlite")
    if args.postgres:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        admin_url = make_url(args.postgres)
        admin_url = admin_url.set(drivername="postgresql+psycopg") if admin_url.drivername == "postgresql" \
            else admin_url
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        name = f"rd3_scale_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            pg = run(admin_url.set(database=name).render_as_string(hide_password=False), n, "postgresql")
            print("postgresql: " + json.dumps(pg))
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(json.dumps({"inserts_per_s": sqlite["inserts_per_s"], "results_frame_s": sqlite["results_frame_s"],
                      "cells": sqlite["cells"], "batch_inserts_per_s": sqlite["batch_inserts_per_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
