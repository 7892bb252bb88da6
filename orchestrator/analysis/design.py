"""A study's results as an analysable design: which columns are factors, which
side of the question each factor is on (method, protocol, other), which cells
are missing or failed, whether the design is balanced; and the seed bootstrap
that every interval in the analysis shares.

Factor groups (docs/ANALYSIS.md):
- method: the ``method`` column and ``method.<param>`` factors (what produced
  the distilled set: the synthesis method, its IPC, its settings);
- protocol: the ``protocol`` column (``native`` vs a shared preset), ``preset``
  and every ``protocol.<path>`` factor (how the distilled set was evaluated);
- other: any other factor (e.g. a teacher field).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from db.queries import cells_frame, results_frame

METRIC = "top1"  # final-epoch test accuracy: THE result
METHOD = "method"
GROUPS = ("method", "protocol", "other")


def factor_group(name: str) -> str:
    if name == METHOD or name.startswith("method."):
        return "method"
    if name in ("protocol", "preset") or name.startswith("protocol."):
        return "protocol"
    return "other"


def level_text(value: Any) -> str:
    """A factor level as one stable string (mappings and lists as compact JSON)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def level_order(raw: pd.Series) -> list[str]:
    """Numeric levels in numeric order, others in the order the study expanded them."""
    values = [v for v in raw.tolist() if not _is_null(v)]
    if values and all(_is_number(v) for v in values):
        values = sorted(set(values))
    return list(dict.fromkeys(level_text(v) for v in values))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class Design:
    """Done cells with a finite ``top1`` (``frame``), every stored cell (``cells``)
    and what is known about the layout. Factor columns hold level strings."""

    study: str
    frame: pd.DataFrame
    cells: pd.DataFrame
    factors: list[str]  # model factors: >= 2 levels among the analysed cells, not aliased
    levels: dict[str, list[str]]
    dropped: dict[str, str] = field(default_factory=dict)  # factor -> why it is not in the model
    seeds: list[int] = field(default_factory=list)

    @property
    def method(self) -> str | None:
        return METHOD if METHOD in self.factors and len(self.levels[METHOD]) > 1 else None

    def not_analysed(self) -> pd.DataFrame:
        """Stored cells that are not in the analysis, with the reason."""
        done = set(self.frame["cell_key"])
        rows = self.cells[~self.cells["cell_key"].isin(done)].copy()
        rows["reason"] = rows["status"].map(lambda s: "done but top1 is not finite" if s == "done" else
                                            f"status {s}")
        return rows

    def combination_counts(self) -> pd.DataFrame:
        """Seeds per combination of the model factors, over the full crossing of
        their levels (0 where a combination has no analysed cell)."""
        if not self.factors:
            return pd.DataFrame({"seeds": [len(self.frame)]})
        observed = self.frame[self.factors].astype(str).value_counts().to_dict()
        rows = [{**dict(zip(self.factors, combo)), "seeds": int(observed.get(combo, 0))}
                for combo in itertools.product(*(self.levels[f] for f in self.factors))]
        return pd.DataFrame(rows)

    def balance(self) -> dict[str, Any]:
        counts = self.combination_counts()["seeds"]
        missing = self.combination_counts().query("seeds == 0")
        return {
            "balanced": bool(len(counts) and counts.min() == counts.max() and counts.min() > 0),
            "combinations": int(len(counts)),
            "combinations_missing": int((counts == 0).sum()),
            "seeds_per_combination_min": int(counts.min()) if len(counts) else 0,
            "seeds_per_combination_max": int(counts.max()) if len(counts) else 0,
            "missing": missing.drop(columns="seeds").to_dict("records"),
        }


class AnalysisError(ValueError):
    """The study cannot be analysed (unknown name, no finished cells)."""


def load_design(engine, study: str) -> Design:
    return make_design(study, results_frame(engine, study), cells_frame(engine, study))


def make_design(study: str, results: pd.DataFrame, cells: pd.DataFrame) -> Design:
    """Build a Design from ``results_frame`` and ``cells_frame`` style tables."""
    names = [c for c in cells.columns if c not in ("cell_key", "seed", "status", "cell_id")]
    cells = cells.copy()
    if results.empty or METRIC not in results:
        frame = pd.DataFrame(columns=["cell_key", "seed", METRIC, *names])
    else:
        frame = results[np.isfinite(pd.to_numeric(results[METRIC], errors="coerce"))].copy()
    # Level order from every stored cell (the order the study expanded them), not
    # from the results, which come sorted by cell hash.
    levels = {}
    for f in names:
        present = set(frame[f].map(level_text)) if f in frame else set()
        levels[f] = [lv for lv in level_order(cells[f]) if lv in present]
    for f in names:
        for table in (frame, cells):
            if f in table:
                table[f] = table[f].map(level_text)
        if f in frame:
            frame[f] = pd.Categorical(frame[f], categories=levels[f], ordered=True)
    frame[METRIC] = frame[METRIC].astype(float)
    factors, dropped = _model_factors(frame, names, levels)
    seeds = sorted(int(s) for s in frame["seed"].unique()) if len(frame) else []
    frame["seed"] = frame["seed"].astype(int) if len(frame) else frame["seed"]
    return Design(study, frame.reset_index(drop=True), cells, factors, levels, dropped, seeds)


def _model_factors(frame: pd.DataFrame, names: list[str], levels: dict[str, list[str]]):
    dropped: dict[str, str] = {}
    factors = [f for f in names if f in frame]
    for f in list(factors):
        if len(levels[f]) < 2:
            factors.remove(f)
            dropped[f] = f"one level only ({levels[f][0] if levels[f] else 'no cells'})"
    # A factor fixed by the others (e.g. `preset` under native-vs-unified is set by
    # method x protocol) adds no information and would make the model singular.
    # Check the least central factors first so that method and protocol stay.
    for f in sorted(factors, key=lambda n: (n in (METHOD, "protocol"), -factors.index(n))):
        rest = [g for g in factors if g != f]
        if rest and frame.groupby(rest, observed=True)[f].nunique().max() <= 1:
            factors.remove(f)
            dropped[f] = "determined by " + " x ".join(rest)
    return factors, dropped


def seed_counts(seeds: list[int], draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` bootstrap resamples of the seeds, as counts: row b says how many
    times each seed was drawn. Every cell of a seed moves together, so paired
    comparisons stay paired."""
    n = len(seeds)
    if draws <= 0 or n == 0:
        return np.zeros((0, n))
    picks = rng.integers(0, n, size=(draws, n))
    return np.stack([np.bincount(p, minlength=n) for p in picks]).astype(float)


def row_weights(design: Design, counts: np.ndarray) -> np.ndarray:
    """Per-row weights (draws x rows) from seed counts."""
    index = {s: i for i, s in enumerate(design.seeds)}
    cols = design.frame["seed"].map(index).to_numpy()
    return counts[:, cols]


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval, ignoring draws where the statistic is undefined."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return (float(lo), float(hi))
