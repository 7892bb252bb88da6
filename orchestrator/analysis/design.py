"""A study's results as an analysable design: which columns are factors, which
side of the question each factor is on, which methods are baselines, which
cells are missing or failed, whether the design is balanced.

Factor groups (docs/ANALYSIS.md):
- method: the ``method`` column and ``method.<param>`` factors (what produced
  the distilled set: the synthesis method and its settings);
- protocol: the ``protocol`` column (``native`` vs a shared preset), ``preset``,
  ``recipe`` and every ``protocol.<path>`` factor (how the set was evaluated);
- budget: what changes how much a set holds: its IPC (``method.ipc``) and the
  label-storage settings (``protocol.labels.refresh_every``, ``.topk``,
  ``.precision``);
- other: any other factor (e.g. a teacher field).

Methods and baselines: the model (ANOVA, comparisons, spread, ranks) is over
the methods proper; baselines (random and herded subsets, the full real set,
anything a study marks ``baseline: true``) are kept in ``Design.baselines``
and shown beside them, each under the same recipe as what it is compared with.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from db.queries import cells_frame, results_frame, study_spec_text

from ..study.tuning import TRIAL
from .inference import t_interval

METRIC = "top1"  # final-epoch test accuracy: THE result
METHOD = "method"
GROUPS = ("method", "protocol", "budget", "other")
PROTOCOL_COLUMNS = ("protocol", "preset", "recipe")
# What a cell cost, under the names the driver records (orchestrator.execution.driver.result_metrics).
COSTS = {
    "synth_wall_s": "synthesis wall time (s)",
    "labels_storage_bytes": "stored soft labels (bytes)",
    "synth_images_bytes": "distilled images (bytes)",
    "gpu_hours": "post-evaluation GPU hours",
    "cpu_hours": "post-evaluation CPU hours",
    "time_train_s": "post-evaluation training time (s)",
}
BUDGET_FACTORS = ("method.ipc", "protocol.labels.refresh_every", "protocol.labels.topk", "protocol.labels.precision")


def factor_group(name: str) -> str:
    if name in BUDGET_FACTORS:
        return "budget"
    if name == METHOD or name.startswith("method."):
        return "method"
    if name in PROTOCOL_COLUMNS or name.startswith("protocol."):
        return "protocol"
    return "other"


def level_text(value: Any) -> str:
    """A factor level as one stable string (mappings and lists as compact JSON)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if _is_null(value) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def level_order(raw: pd.Series) -> list[str]:
    """Numeric levels in numeric order, others in the order the study expanded them."""
    values = [v for v in raw.tolist() if not _is_null(v)]
    if values and all(_is_number(v) for v in values):
        values = sorted(set(values))
    return list(dict.fromkeys(level_text(v) for v in values))


@dataclass(frozen=True)
class MethodInfo:
    name: str  # the registered method (random_real, rded, ...)
    role: str  # "method" or "baseline"
    native: str | None  # its published preset


def method_info(spec_text: str | None, labels: list[str]) -> dict[str, MethodInfo]:
    """What each method label of a study is. A study entry's ``baseline:`` decides
    the role; else the registered method's own flag (rd3core.synth: random_real,
    herding, full_real). A label the stored study does not list is taken as a
    method name."""
    from rd3core.synth import METHODS

    from ..study.spec import published_preset

    entries: dict[str, dict] = {}
    try:
        import yaml

        data = yaml.safe_load(spec_text) if spec_text else None
    except Exception:  # noqa: BLE001 - the stored text ran once; if it no longer parses, fall back on names
        data = None
    methods = data.get("methods") if isinstance(data, dict) else None
    for entry in methods if isinstance(methods, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            entries[str(entry.get("label", entry["name"]))] = entry
    out = {}
    for label in labels:
        entry = entries.get(label, {"name": label})
        flag = entry.get("baseline")
        if not isinstance(flag, bool):
            flag = entry["name"] in METHODS and METHODS.get(entry["name"]).baseline
        out[label] = MethodInfo(entry["name"], "baseline" if flag else "method",
                                published_preset(entry.get("native_preset"), label, entry["name"]))
    return out


@dataclass
class Design:
    """Done cells with a finite ``top1`` of the methods proper (``frame``), of the
    baselines (``baselines``), every stored cell (``cells``) and what is known
    about the layout. Factor columns hold level strings."""

    study: str
    frame: pd.DataFrame
    cells: pd.DataFrame
    factors: list[str]  # model factors: >= 2 levels among the analysed cells, not aliased
    levels: dict[str, list[str]]
    dropped: dict[str, str] = field(default_factory=dict)  # factor -> why it is not in the model
    seeds: list[int] = field(default_factory=list)
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)
    info: dict[str, MethodInfo] = field(default_factory=dict)  # method label -> what it is
    columns: list[str] = field(default_factory=list)  # every factor column the cells record
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)  # a tuned design's search (analysis.tuning)
    spec_text: str | None = None  # the study file as stored

    @property
    def method(self) -> str | None:
        return METHOD if METHOD in self.factors and len(self.levels[METHOD]) > 1 else None

    @property
    def baseline_labels(self) -> list[str]:
        present = set(self.baselines.get(METHOD, []))
        return [m for m, i in self.info.items() if i.role == "baseline" and m in present]

    def baseline_named(self, name: str) -> str | None:
        """The label of the first baseline that is the registered method ``name``."""
        return next((m for m in self.baseline_labels if self.info[m].name == name), None)

    def analysed(self) -> pd.DataFrame:
        """The methods' and the baselines' analysed cells together, factor levels in the
        order the study expanded them."""
        frames = [f for f in (self.frame, self.baselines) if len(f)] or [self.frame]
        both = pd.concat([f.astype({c: str for c in self.columns if c in f}) for f in frames], ignore_index=True)
        for c in self.columns:
            if c in both and c in self.cells:
                both[c] = pd.Categorical(both[c], categories=level_order(self.cells[c]), ordered=True)
        return both

    def not_analysed(self) -> pd.DataFrame:
        """Stored cells that are not in the analysis, with the reason."""
        done = set(self.frame["cell_key"]) | set(self.baselines.get("cell_key", []))
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
        table = self.combination_counts()
        counts = table["seeds"]
        missing = table.query("seeds == 0")
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
    """The study's cells and results as a Design; a tuned design's search
    trials (orchestrator.analysis.tuning reads them) are not cells of its comparisons."""
    from .tuning import trials_frame

    cells, results = without_trials(cells_frame(engine, study)), without_trials(results_frame(engine, study))
    labels = level_order(cells[METHOD]) if METHOD in cells else []
    text = study_spec_text(engine, study)
    design = make_design(study, results, cells, method_info(text, labels))
    design.trials, design.spec_text = trials_frame(engine, study), text
    return design


def without_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without search trials and the columns only they have (the
    trial's index and searched values)."""
    if "protocol" not in frame or not (frame["protocol"] == TRIAL).any():
        return frame
    rest = frame[frame["protocol"] != TRIAL]
    return rest.drop(columns=[c for c in rest.columns if rest[c].isna().all() and frame.loc[
        frame["protocol"] == TRIAL, c].notna().any()]).reset_index(drop=True)


def make_design(study: str, results: pd.DataFrame, cells: pd.DataFrame, info: dict[str, MethodInfo] | None = None
                ) -> Design:
    """Build a Design from ``results_frame`` and ``cells_frame`` style tables;
    ``info`` (label -> MethodInfo) defaults to taking each label as a method name."""
    names = [c for c in cells.columns if c not in ("cell_key", "seed", "status", "cell_id")]
    cells = cells.copy()
    if results.empty or METRIC not in results:
        frame = pd.DataFrame(columns=["cell_key", "seed", METRIC, *names])
    else:
        frame = results[np.isfinite(pd.to_numeric(results[METRIC], errors="coerce"))].copy()
    for f in names:
        for table in (frame, cells):
            if f in table:
                table[f] = table[f].map(level_text)
    labels = level_order(cells[METHOD]) if METHOD in cells else []
    info = {**method_info(None, labels), **(info or {})}
    proper = [m for m in labels if info[m].role == "method"]
    if METHOD in frame and proper:  # a study of baselines only studies them as its methods
        subject = frame[METHOD].isin(proper)
        frame, baselines = frame[subject].copy(), frame[~subject].copy()
    else:
        info = {m: MethodInfo(i.name, "method", i.native) for m, i in info.items()}
        baselines = frame.iloc[:0].copy()
    # Level order from every stored cell (the order the study expanded them), not
    # from the results, which come sorted by cell hash.
    levels = {}
    for f in names:
        present = set(frame[f]) if f in frame else set()
        levels[f] = [lv for lv in level_order(cells[f]) if lv in present]
        if f in frame:
            frame[f] = pd.Categorical(frame[f], categories=levels[f], ordered=True)
    for table in (frame, baselines):
        table[METRIC] = table[METRIC].astype(float)
        if len(table):
            table["seed"] = table["seed"].astype(int)
    factors, dropped = _model_factors(frame, names, levels)
    seeds = sorted(int(s) for s in pd.concat([frame["seed"], baselines["seed"]]).unique()) if len(frame) else []
    return Design(study, frame.reset_index(drop=True), cells, factors, levels, dropped, seeds,
                  baselines.reset_index(drop=True), {m: info[m] for m in labels}, names)


def _model_factors(frame: pd.DataFrame, names: list[str], levels: dict[str, list[str]]):
    dropped: dict[str, str] = {}
    factors = [f for f in names if f in frame]
    for f in list(factors):
        if len(levels[f]) < 2:
            factors.remove(f)
            dropped[f] = f"one level only ({levels[f][0] if levels[f] else 'no cells'})"
    # A factor fixed by the others (e.g. `recipe` under native-vs-unified is set by
    # method x protocol) adds no information and would make the model singular.
    # Check the least central factors first so that method and protocol stay.
    for f in sorted(factors, key=lambda n: (n in (METHOD, "protocol"), -factors.index(n))):
        rest = [g for g in factors if g != f]
        if rest and frame.groupby(rest, observed=True)[f].nunique().max() <= 1:
            factors.remove(f)
            dropped[f] = "determined by " + " x ".join(rest)
    return factors, dropped


def seed_means(frame: pd.DataFrame, by: list[str]) -> dict[tuple, np.ndarray]:
    """Per group of ``by``: the mean top-1 of each seed's cells in the group. Seeds are
    the independent replicates (cells of one seed share its draws), so intervals
    of a group mean are taken over these per-seed means."""
    out = {}
    if frame.empty:
        return out
    grouped = frame.groupby([*by, "seed"], observed=True)[METRIC].mean() if by else \
        frame.groupby("seed")[METRIC].mean()
    if not by:
        return {(): grouped.to_numpy(float)}
    for key, values in grouped.groupby(level=list(range(len(by))), observed=True):
        key = key if isinstance(key, tuple) else (key,)
        out[tuple(str(k) for k in key)] = values.to_numpy(float)
    return out


def grouped_means(frame: pd.DataFrame, by: list[str], level: float = 0.95
                  ) -> dict[tuple, tuple[float, float, float, int]]:
    """Mean top-1 per combination of ``by`` (the mean of its per-seed means, so each
    seed weighs the same) with the Student-t interval over those per-seed means:
    {key: (mean, lo, hi, cells)}."""
    sizes = frame.groupby(by, observed=True).size() if by else None
    out = {}
    for key, values in seed_means(frame, by).items():
        lo, hi = t_interval(values, level)
        cells = len(frame) if sizes is None else int(sizes[key if len(key) > 1 else key[0]])
        out[key] = (float(values.mean()), lo, hi, cells)
    return out


def cost_means(design: Design) -> list[dict[str, Any]]:
    """Mean of each recorded cost per method (baselines included), over its cells."""
    frame = design.analysed()
    names = [c for c in COSTS if c in frame and pd.to_numeric(frame[c], errors="coerce").notna().any()]
    if not names or METHOD not in frame:
        return []
    means = frame.groupby(METHOD, observed=True)[names].agg(lambda v: pd.to_numeric(v, errors="coerce").mean())
    return [{"method": str(m), "role": design.info[str(m)].role if str(m) in design.info else "method",
             **{c: float(row[c]) if pd.notna(row[c]) else None for c in names}} for m, row in means.iterrows()]
