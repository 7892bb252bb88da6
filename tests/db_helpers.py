"""Small builders shared by the tests/test_db_*.py files."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Iterable

from db import records
from db.session import session_scope


def cell_dicts(factors: dict[str, list], seeds: Iterable[int] = (0, 1)) -> list[dict[str, Any]]:
    """Cells as the driver hands them to records.sync_cells: factor grid x seeds."""
    out = []
    for levels in itertools.product(*factors.values()):
        combo = dict(zip(factors, levels))
        for seed in seeds:
            config = {"factors": combo, "seed": seed}
            key = hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:32]
            out.append({"cell_key": key, "seed": seed, "factors": combo, "config": config})
    return out


def make_study(engine, name: str, cells: list[dict[str, Any]]) -> dict[str, int]:
    """The study and its cells, stored; returns cell_key -> id."""
    with session_scope(engine) as s:
        study = records.ensure_study(s, name, f"name: {name}\n", hashlib.sha256(name.encode()).hexdigest())
        return records.sync_cells(s, study, cells)


def epochs(n: int, base: float = 0.5) -> list[dict[str, float]]:
    return [{"epoch": e + 1, "loss": 2.0 / (e + 1), "lr": 0.1 * (1 - e / n), "test_top1": base + 0.01 * e,
             "time_s": 0.25} for e in range(n)]


def finish_cell(engine, cell_id: int, top1: float, n_epochs: int = 3, **extra: float) -> int:
    """One result as the driver records it: attempt, result, done. Returns the attempt id."""
    with session_scope(engine) as s:
        attempt = records.start_attempt(s, cell_id, host="h", device="cpu")
        records.record_result(s, cell_id, {"top1": top1, **extra}, epochs(n_epochs, top1), attempt_id=attempt)
        records.finish_attempt(s, attempt, records.AttemptStatus.done)
    return attempt
