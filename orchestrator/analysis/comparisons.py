"""Method comparisons within and across protocol settings, over the methods
proper, with the baselines beside them.

A *setting* is one combination of every model factor except ``method``. Within
a setting: each method's mean over seeds (Student-t interval), paired
differences between methods (seed by seed: Student t on the differences, an
exact sign-flip p beside it, multiplicity-adjusted over the whole family of
paired comparisons), ranks. Across settings: Kendall's tau-b between the
rankings, and the order flips, real only when both paired differences are
significant after correction. The spread (best minus worst method mean) per
setting with a simultaneous interval, native presets vs each shared protocol,
each method against each baseline under the same recipe, and the power the
study's seeds give.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from .design import METHOD, METRIC, Design
from .inference import (CORRECTIONS, adjust, detectable, nan_to_none, paired, seeds_needed, simultaneous_level,
                        t_interval)

NATIVE = "native"


def setting_label(levels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in levels.items()) or "all cells"


def cube(design: Design) -> tuple[list[dict[str, str]], list[str], np.ndarray]:
    """settings, methods (proper) and Y[setting, method, seed] (NaN where no result)."""
    factors = [f for f in design.factors if f != METHOD]
    records = design.frame.to_dict("records")
    observed = {tuple(str(r[f]) for f in factors) for r in records}
    settings = [dict(zip(factors, combo)) for combo in itertools.product(*(design.levels[f] for f in factors))
                if combo in observed]
    methods = design.levels.get(METHOD) or []
    y = np.full((len(settings), len(methods), len(design.seeds)), np.nan)
    g_index = {tuple(s.values()): i for i, s in enumerate(settings)}
    m_index = {m: i for i, m in enumerate(methods)}
    s_index = {s: i for i, s in enumerate(design.seeds)}
    for r in records if methods else []:  # no method column: nothing to compare between
        y[g_index[tuple(str(r[f]) for f in factors)], m_index[str(r[METHOD])], s_index[int(r["seed"])]] = r[METRIC]
    return settings, methods, y


def baseline_cube(design: Design, baseline: str, settings, methods, columns: list[str] | None = None
                  ) -> np.ndarray:
    """B[setting, method, seed]: ``baseline``'s result in the cells that share with
    each method's cell every factor in ``columns`` (default: every recorded factor
    but the method, so the same setting, IPC and recipe: its twin), averaged over
    several matches; NaN where the study has none."""
    columns = [c for c in design.columns if c != METHOD] if columns is None else columns

    def key(row) -> tuple:
        return tuple(str(row.get(c)) for c in columns), int(row["seed"])

    values: dict[tuple, list[float]] = {}
    for r in design.baselines[design.baselines[METHOD] == baseline].to_dict("records"):
        values.setdefault(key(r), []).append(r[METRIC])
    factors = [f for f in design.factors if f != METHOD]
    g_index = {tuple(s.values()): i for i, s in enumerate(settings)}
    m_index = {m: i for i, m in enumerate(methods)}
    s_index = {s: i for i, s in enumerate(design.seeds)}
    out = np.full((len(settings), len(methods), len(design.seeds)), np.nan)
    for r in design.frame.to_dict("records"):
        if key(r) in values:
            out[g_index[tuple(str(r[f]) for f in factors)], m_index[str(r[METHOD])], s_index[int(r["seed"])]] = \
                float(np.mean(values[key(r)]))
    return out


def own_baseline_means(design: Design, settings, level: float) -> dict[str, list]:
    """Each baseline's mean in each setting under its own recipe (its published
    preset in the native arm), for display beside the methods."""
    out = {}
    factors = [f for f in design.factors if f != METHOD]
    for b in design.baseline_labels:
        rows = design.baselines[design.baselines[METHOD] == b]
        if "recipe" in rows and NATIVE in set(rows.get("protocol", [])):
            own = (rows["protocol"] != NATIVE) | (rows["recipe"] == str(design.info[b].native))
            rows = rows[own]
        cells = []
        for s in settings:
            mask = np.logical_and.reduce([rows[f].astype(str) == v for f, v in s.items()]) if factors else \
                np.ones(len(rows), bool)
            values = rows[mask].groupby("seed")[METRIC].mean().to_numpy(float)
            cells.append({"mean": nan_to_none(values.mean()) if values.size else None,
                          "ci": [nan_to_none(v) for v in t_interval(values, level)], "seeds": int(values.size)})
        out[b] = cells
    return out


def compare(design: Design, level: float = 0.95, correction: str = "holm") -> dict[str, Any]:
    settings, methods, y = cube(design)
    out: dict[str, Any] = {"methods": methods, "baselines": design.baseline_labels, "settings": [], "paired": [],
                           "kendall": [], "flips": [], "spread": [], "correction": CORRECTIONS[correction],
                           "level": level}
    out["versus_baselines"] = versus_baselines(design, settings, methods, y, level, correction)
    if design.method is None:
        out["absent"] = ("fewer than two methods proper: no method comparisons (the study needs a `method` factor "
                         "with at least two methods that are not baselines)")
        return out
    labels = [setting_label(s) for s in settings]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a method absent from a setting: NaN mean
        point = np.nanmean(y, axis=-1)
    beside = own_baseline_means(design, settings, level)
    for g, (s, label) in enumerate(zip(settings, labels)):
        means = {m: nan_to_none(point[g, i]) for i, m in enumerate(methods)}
        out["settings"].append({
            "setting": label, "levels": s, "means": means,
            "ci": {m: [nan_to_none(v) for v in t_interval(y[g, i], level)] for i, m in enumerate(methods)},
            "seeds": {m: int(np.sum(~np.isnan(y[g, i]))) for i, m in enumerate(methods)},
            "ranks": ranks(means), "baselines": {b: beside[b][g] for b in beside},
        })
    rows = []
    for g, label in enumerate(labels):
        for (i, a), (j, b) in itertools.combinations(enumerate(methods), 2):
            d = y[g, i] - y[g, j]  # seed by seed: paired
            if np.all(np.isnan(d)):
                continue
            rows.append({"setting": label, "a": a, "b": b, **paired(d, level).as_dict(), "_g": g, "_ij": (i, j)})
    _decide(rows, correction, level)
    out["paired"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    significant = {(r["_g"], *r["_ij"]) for r in rows if r["significant"]}
    for g, h in itertools.combinations(range(len(settings)), 2):
        common = [i for i in range(len(methods)) if not np.isnan(point[g, i]) and not np.isnan(point[h, i])]
        flips = []
        for i, j in itertools.combinations(common, 2):
            dg, dh = point[g, i] - point[g, j], point[h, i] - point[h, j]
            if dg * dh < 0:
                flips.append({"a": methods[i], "b": methods[j], "diff_a_minus_b": [float(dg), float(dh)],
                              "significant": (g, i, j) in significant and (h, i, j) in significant})
        tau = kendalltau(point[g, common], point[h, common]).statistic if len(common) > 1 else math.nan
        out["kendall"].append({"a": labels[g], "b": labels[h], "tau": nan_to_none(tau), "methods": len(common),
                               "flips": len(flips), "significant_flips": sum(f["significant"] for f in flips)})
        out["flips"] += [{"settings": [labels[g], labels[h]], **f} for f in flips]
    out["spread"] = spreads(settings, labels, methods, y, point, level)
    out["native_vs_shared"] = native_vs_shared(settings, methods, y, point, level)
    # Completed by finish_power once the ANOVA's residual mean square is known.
    out["power"] = {"family": len(rows), "closest": closest_pair(labels, methods, point)}
    return out


def ranks(means: dict[str, float | None]) -> dict[str, float]:
    """Rank 1 = highest mean; ties share the average rank."""
    series = pd.Series(means, dtype=float).dropna()
    return series.rank(ascending=False, method="average").to_dict()


def _decide(rows: list[dict], correction: str, level: float) -> None:
    """Adjust the family's t-test p-values and the sign-flip p-values; a row is
    significant when its adjusted t p is below 1 - level."""
    alpha = 1 - level
    p_adj = adjust([r["p_t"] if r["p_t"] is not None else math.nan for r in rows], correction)
    flip_adj = adjust([r["p_sign_flip"] if r["p_sign_flip"] is not None else math.nan for r in rows], correction)
    for r, p, q in zip(rows, p_adj, flip_adj):
        r["p_adjusted"], r["p_sign_flip_adjusted"] = nan_to_none(p), nan_to_none(q)
        r["significant"] = bool(math.isfinite(p) and p < alpha)
        r["significant_sign_flip"] = bool(math.isfinite(q) and q < alpha)
        r["family"] = len(rows)


def simultaneous_pairs(y_setting: np.ndarray, level: float) -> list[tuple[float, float, float]]:
    """(mean, lo, hi) of every pairwise difference i - j (i < j) of one setting's
    methods, Bonferroni-simultaneous at ``level``."""
    pairs = list(itertools.combinations(range(y_setting.shape[0]), 2))
    each = simultaneous_level(level, len(pairs))
    out = []
    for i, j in pairs:
        r = paired(y_setting[i] - y_setting[j], each)
        out.append((r.mean, *r.ci))
    return out


def spread_interval(y_setting: np.ndarray, level: float) -> tuple[float, float]:
    """An interval for the true best-minus-worst spread max_ij (mu_i - mu_j): with
    every pairwise difference inside its simultaneous interval, the spread lies
    between the largest lower bound of |mu_i - mu_j| and the largest upper bound."""
    present = [i for i in range(y_setting.shape[0]) if np.isfinite(y_setting[i]).any()]
    if len(present) < 2:
        return (math.nan, math.nan)
    pairs = simultaneous_pairs(y_setting[present], level)
    lo = max(max(lo, -hi, 0.0) for _, lo, hi in pairs)
    hi = max(max(hi, -lo) for _, lo, hi in pairs)
    return (lo, hi)


def spreads(settings, labels, methods, y, point, level) -> list[dict]:
    rows = []
    for g, label in enumerate(labels):
        present = [i for i in range(len(methods)) if not np.isnan(point[g, i])]
        if len(present) < 2:
            continue
        best = max(present, key=lambda i: point[g, i])
        worst = min(present, key=lambda i: point[g, i])
        ci = _contain(spread_interval(y[g], level), float(point[g, best] - point[g, worst]))
        rows.append({"setting": label, "levels": settings[g], "best": methods[best], "worst": methods[worst],
                     "spread": float(point[g, best] - point[g, worst]), "ci": [nan_to_none(c) for c in ci],
                     "methods": len(present), "interval": "simultaneous over the setting's pairs (Bonferroni)"})
    return rows


def native_vs_shared(settings, methods, y, point, level) -> dict[str, Any]:
    """RD3's headline: spread under each method's native preset vs under one shared
    protocol, for each combination of the other setting factors. Each reduction's
    interval is simultaneous over the family of rows (Bonferroni), its two
    spreads' intervals at half the error rate each."""
    if not settings or "protocol" not in settings[0]:
        return {"absent": "no `protocol` factor (the native_vs_unified design): no native-vs-shared spread"}
    if not any(s["protocol"] == NATIVE for s in settings):
        return {"absent": f"the `protocol` factor has no {NATIVE!r} level"}
    pairs = []
    for g, s in enumerate(settings):
        if s["protocol"] != NATIVE:
            continue
        others = {k: v for k, v in s.items() if k != "protocol"}
        pairs += [(g, h, others, t["protocol"]) for h, t in enumerate(settings) if t["protocol"] != NATIVE and
                  {k: v for k, v in t.items() if k != "protocol"} == others]
    if not pairs:
        return {"absent": "no shared-protocol setting matches a native one"}
    each = simultaneous_level(level, 2 * len(pairs))
    rows = []
    for g, h, others, shared in pairs:
        sn = float(np.nanmax(point[g]) - np.nanmin(point[g]))
        ss = float(np.nanmax(point[h]) - np.nanmin(point[h]))
        n_ci, s_ci = spread_interval(y[g], each), spread_interval(y[h], each)
        red = _contain((n_ci[0] - s_ci[1], n_ci[1] - s_ci[0]), sn - ss)
        rows.append({"others": others, "shared": shared, "spread_native": sn, "spread_shared": ss,
                     "spread_native_ci": [nan_to_none(c) for c in _contain(n_ci, sn)],
                     "spread_shared_ci": [nan_to_none(c) for c in _contain(s_ci, ss)],
                     "reduction": sn - ss, "reduction_ci": [nan_to_none(c) for c in red],
                     "excludes_zero": bool(math.isfinite(red[0]) and (red[0] > 0 or red[1] < 0))})
    return {"rows": rows, "interval": f"simultaneous over the {len(rows)} row(s) (Bonferroni)"}


def versus_baselines(design: Design, settings, methods, y, level, correction) -> dict[str, Any]:
    """Each method proper against each baseline under the same recipe (the twin
    cells of native_vs_unified; the same setting otherwise): paired over seeds,
    one correction family per baseline."""
    out: dict[str, Any] = {}
    for b in design.baseline_labels:
        twin = baseline_cube(design, b, settings, methods)
        rows = []
        for g, s in enumerate(settings):
            for i, m in enumerate(methods):
                d = y[g, i] - twin[g, i]
                if np.all(np.isnan(d)):
                    continue
                rows.append({"setting": setting_label(s), "method": m, "baseline": b,
                             "method_mean": nan_to_none(np.nanmean(y[g, i][~np.isnan(d)])),
                             "baseline_mean": nan_to_none(np.nanmean(twin[g, i][~np.isnan(d)])),
                             **paired(d, level).as_dict()})
        _decide(rows, correction, level)
        out[b] = {"rows": rows} if rows else {"absent": f"no {b!r} cell under the same recipe as any method"}
    return out


def closest_pair(labels, methods, point) -> dict[str, Any] | None:
    """The two methods proper whose means are closest in some setting."""
    best = None
    for g, label in enumerate(labels):
        for i, j in itertools.combinations(range(len(methods)), 2):
            d = point[g, i] - point[g, j]
            if np.isfinite(d) and (best is None or abs(d) < abs(best["diff"])):
                best = {"setting": label, "a": methods[i], "b": methods[j], "diff": float(d)}
    return best


def finish_power(section: dict[str, Any], ms_resid: float | None, n_seeds: int, level: float) -> dict[str, Any]:
    """Fill in the power section once the ANOVA's residual mean square is known."""
    alpha = 1 - level
    if ms_resid is None or not math.isfinite(ms_resid) or n_seeds < 2:
        return {**section, "absent": "needs the fitted seed noise and at least two seeds"}
    sd_diff = math.sqrt(2 * ms_resid)  # two cells' independent noise
    family = max(section.get("family", 1), 1)
    out = {**section, "seeds": n_seeds, "alpha": alpha, "power": 0.8, "noise_sd": math.sqrt(ms_resid),
           "sd_paired_diff": sd_diff, "detectable": detectable(sd_diff, n_seeds, alpha),
           "detectable_family": detectable(sd_diff, n_seeds, alpha / family)}
    closest = section.get("closest")
    if closest:
        out["closest"] = {**closest, "seeds_needed": seeds_needed(closest["diff"], sd_diff, alpha)}
    return out


def _contain(ci: tuple[float, float], estimate: float) -> tuple[float, float]:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ci
    return (min(lo, estimate), max(hi, estimate))
