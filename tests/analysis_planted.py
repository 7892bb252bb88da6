"""Planted studies for the analysis tests: results generated from known effects
plus seed noise, written through db.records into a real SQLite file, exactly as
the driver writes them. Levels that are mappings (e.g. a whole augmentation
spec) are named in effect tables by their JSON text (``hashable``).

y(method, levels, seed) = 0.5 + sum of the planted effects + noise(seed, cell)

Effects are given as {term tuple: {level tuple: value}} and are centred, so in
a balanced design the population share of a term is the mean of its squared
effects over the design divided by (sum of those + noise variance).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from db import records
from db.models import CellStatus
from db.schema import upgrade
from db.session import make_engine, session_scope, sqlite_url


def expand(factors: dict[str, list], seeds: list[int]):
    names = list(factors)
    for levels in itertools.product(*(factors[n] for n in names)):
        for seed in seeds:
            yield dict(zip(names, levels)), seed


def hashable(level):
    return json.dumps(level, sort_keys=True) if isinstance(level, (dict, list)) else level


def cell_id(combo: dict, seed: int) -> tuple:
    """How ``drop`` and ``fail`` name a cell."""
    return tuple(sorted((k, hashable(v)) for k, v in combo.items())), seed


def planted_value(effects: dict, combo: dict) -> float:
    total = 0.5
    for term, table in effects.items():
        total += table.get(tuple(hashable(combo[f]) for f in term), 0.0)
    return total


def terms_of(factors: dict[str, list]) -> list[tuple[str, ...]]:
    """Every ANOVA term of the full factorial model, mains first."""
    names = list(factors)
    return [t for k in range(1, len(names) + 1) for t in itertools.combinations(names, k)]


def planted_variances(effects: dict, factors: dict[str, list]) -> dict[tuple, float]:
    """Mean over the design's combinations of each planted term's squared effect
    (its population variance, the effects being centred); 0 for unplanted terms."""
    combos = [c for c, _ in expand(factors, [0])]
    var = {t: 0.0 for t in terms_of(factors)}
    for t, table in effects.items():
        var[t] = float(np.mean([table.get(tuple(hashable(c[f]) for f in t), 0.0) ** 2 for c in combos]))
    return var


def true_shares(effects: dict, factors: dict[str, list], noise_sd: float) -> dict[tuple, float]:
    """Population variance fractions of each term over a balanced design (what
    omega^2 estimates)."""
    var = planted_variances(effects, factors)
    total = sum(var.values()) + noise_sd ** 2
    shares = {t: v / total for t, v in var.items()}
    shares["residual"] = noise_sd ** 2 / total
    return shares


def expected_shares(effects: dict, factors: dict[str, list], noise_sd: float, n_seeds: int) -> dict[tuple, float]:
    """What eta^2 (SS_t / SS_total) estimates in a balanced full-factorial study with
    ``n_seeds`` seeds per combination: N = combinations x seeds cells, and over the
    noise E[SS_t] = N v_t + df_t sigma^2 (every term soaks up df_t sigma^2 of
    noise), E[SS_resid] = (N - combinations) sigma^2, E[SS_total] = N sum(v) +
    (N - 1) sigma^2; the share is the ratio of these expectations (exact to
    O(1/N)). Differs from ``true_shares`` by the small-sample bias omega^2 removes."""
    var, s2 = planted_variances(effects, factors), noise_sd ** 2
    combos = int(np.prod([len(v) for v in factors.values()]))
    n = combos * n_seeds
    total = n * sum(var.values()) + (n - 1) * s2
    shares = {t: (n * v + int(np.prod([len(factors[f]) - 1 for f in t])) * s2) / total for t, v in var.items()}
    shares["residual"] = (n - combos) * s2 / total
    return shares


def centred(values: dict) -> dict:
    mean = float(np.mean(list(values.values())))
    return {k: v - mean for k, v in values.items()}


def write_study(path: Path, name: str, factors: dict[str, list], seeds: list[int], effects: dict,
                noise_sd: float, rng_seed: int = 0, drop: set | None = None, fail: set | None = None,
                metrics=None, epochs: int = 0) -> str:
    """Create (or add to) the SQLite DB at ``path``; return its URL. ``drop``: (combo
    items, seed) keys left pending (never run); ``fail``: keys recorded as failed.
    ``metrics(combo, seed) -> dict`` adds metrics (costs) to each result."""
    rng = np.random.default_rng(rng_seed)
    url = sqlite_url(path)
    engine = make_engine(url)
    upgrade(engine)
    drop, fail = drop or set(), fail or set()
    cells = []
    for combo, seed in expand(factors, seeds):
        key = hashlib.sha256(json.dumps([name, combo, seed], sort_keys=True).encode()).hexdigest()[:16]
        cells.append({"cell_key": key, "seed": seed, "factors": combo, "config": {"combo": combo, "seed": seed}})
    with session_scope(engine) as s:
        study = records.ensure_study(s, name, f"name: {name}\n# planted test study\n", "hash-" + name)
        ids = records.sync_cells(s, study, cells)
        for cell in cells:
            combo, seed = cell["factors"], cell["seed"]
            noise = rng.normal(0.0, noise_sd)  # drawn for every cell, so dropping one changes no other value
            ident = cell_id(combo, seed)
            if ident in drop:
                continue
            if ident in fail:
                records.set_status(s, ids[cell["cell_key"]], CellStatus.failed)
                continue
            top1 = planted_value(effects, combo) + noise
            extra = metrics(combo, seed) if metrics else {}
            curve = [{"epoch": e + 1, "loss": 2.0 * np.exp(-3 * (e + 1) / epochs) + 0.05, "lr": 1e-3,
                      "test_top1": top1 * (1 - np.exp(-4 * (e + 1) / epochs)) if (e + 1) % 2 == 0 or e + 1 == epochs
                      else None, "time_s": 0.1} for e in range(epochs)]
            records.record_result(s, ids[cell["cell_key"]], {"top1": top1, **extra}, curve)
    engine.dispose()
    return url
