"""Method comparisons within and across protocol settings.

A *setting* is one combination of every factor except ``method``. Within a
setting: each method's mean over seeds, paired differences between methods
(seeds are shared, so the difference is taken seed by seed), the ranking.
Across settings: Kendall's tau-b between the rankings of every pair of
settings, and the pairs of methods whose order flips. The spread (best minus
worst method mean) per setting, and native presets vs each shared protocol
when the study has a ``protocol`` factor with a ``native`` level.
All intervals come from the same seed bootstrap draws as the attribution.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from .design import METRIC, Design, interval

NATIVE = "native"


def setting_label(levels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in levels.items()) or "all cells"


def cube(design: Design, method: str = "method") -> tuple[list[dict[str, str]], list[str], np.ndarray]:
    """settings, methods and Y[setting, method, seed] (NaN where no result)."""
    factors = [f for f in design.factors if f != method]
    records = design.frame.to_dict("records")
    observed = {tuple(str(r[f]) for f in factors) for r in records}
    settings = [dict(zip(factors, combo)) for combo in itertools.product(*(design.levels[f] for f in factors))
                if combo in observed]
    methods = design.levels.get(method) or []
    y = np.full((len(settings), len(methods), len(design.seeds)), np.nan)
    g_index = {tuple(s.values()): i for i, s in enumerate(settings)}
    m_index = {m: i for i, m in enumerate(methods)}
    s_index = {s: i for i, s in enumerate(design.seeds)}
    for r in records:
        y[g_index[tuple(str(r[f]) for f in factors)], m_index[str(r[method])], s_index[int(r["seed"])]] = r[METRIC]
    return settings, methods, y


def weighted_means(y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means over seeds for each bootstrap draw: [draws, ...y.shape[:-1]]."""
    present = ~np.isnan(y)
    num = np.einsum("...s,bs->b...", np.where(present, y, 0.0), counts)
    den = np.einsum("...s,bs->b...", present.astype(float), counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def tau_matrix(means: np.ndarray) -> np.ndarray:
    """Kendall tau-b between the method orders of every pair of settings, over the
    methods present in both: means [..., G, M] -> [..., G, G]."""
    diff = means[..., :, None] - means[..., None, :]
    present = ~np.isnan(diff)
    sign = np.where(present, np.sign(np.where(present, diff, 0.0)), 0.0)
    mask = present.astype(float)
    num = np.einsum("...gij,...hij->...gh", sign, sign)
    den_g = np.einsum("...gij,...hij->...gh", sign ** 2, mask)
    den_h = np.swapaxes(den_g, -1, -2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((den_g > 0) & (den_h > 0), num / np.sqrt(den_g * den_h), np.nan)


def ranks(means: dict[str, float]) -> dict[str, float]:
    """Rank 1 = highest mean; ties share the average rank."""
    series = pd.Series(means).dropna()
    return series.rank(ascending=False, method="average").to_dict()


def compare(design: Design, counts: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    if design.method is None:
        return {"absent": "one method only: no method comparisons (the study needs a `method` factor "
                          "with at least two methods)"}
    settings, methods, y = cube(design)
    labels = [setting_label(s) for s in settings]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a method absent from a setting: NaN mean
        point = np.nanmean(y, axis=-1)
    boot = weighted_means(y, counts)
    out: dict[str, Any] = {"methods": methods, "settings": [], "paired": [], "kendall": [], "flips": [],
                           "spread": []}
    for g, (s, label) in enumerate(zip(settings, labels)):
        means = {m: _num(point[g, i]) for i, m in enumerate(methods)}
        out["settings"].append({
            "setting": label, "levels": s, "means": means,
            "ci": {m: _ci(boot[:, g, i], level) for i, m in enumerate(methods)},
            "seeds": {m: int(np.sum(~np.isnan(y[g, i]))) for i, m in enumerate(methods)},
            "ranks": ranks(means),
        })
    diffs = {}
    for g, label in enumerate(labels):
        for (i, a), (j, b) in itertools.combinations(enumerate(methods), 2):
            d = y[g, i] - y[g, j]  # seed by seed: paired
            if np.all(np.isnan(d)):
                continue
            diffs[g, i, j] = float(np.nanmean(d))
            ci = _ci(weighted_means(d, counts), level)
            out["paired"].append({"setting": label, "a": a, "b": b, "diff": diffs[g, i, j], "ci": ci,
                                  "seeds": int(np.sum(~np.isnan(d))),
                                  "excludes_zero": bool(ci[0] is not None and (ci[0] > 0 or ci[1] < 0))})
    significant = {(p["setting"], p["a"], p["b"]) for p in out["paired"] if p["excludes_zero"]}
    taus = tau_matrix(boot) if len(settings) > 1 else None
    for g, h in itertools.combinations(range(len(settings)), 2):
        common = [i for i in range(len(methods)) if not np.isnan(point[g, i]) and not np.isnan(point[h, i])]
        flips = []
        for i, j in itertools.combinations(common, 2):
            dg, dh = point[g, i] - point[g, j], point[h, i] - point[h, j]
            if dg * dh < 0:
                a, b = methods[i], methods[j]
                flips.append({"a": a, "b": b, "diff_a_minus_b": [float(dg), float(dh)],
                              "significant": (labels[g], a, b) in significant and (labels[h], a, b) in significant})
        tau = kendalltau(point[g, common], point[h, common]).statistic if len(common) > 1 else math.nan
        out["kendall"].append({"a": labels[g], "b": labels[h], "tau": _num(tau), "methods": len(common),
                               "ci": _ci(taus[:, g, h], level), "flips": len(flips)})
        out["flips"] += [{"settings": [labels[g], labels[h]], **f} for f in flips]
    spread_boot = np.nanmax(boot, axis=-1) - np.nanmin(boot, axis=-1) if boot.size else boot
    for g, label in enumerate(labels):
        present = [i for i in range(len(methods)) if not np.isnan(point[g, i])]
        if len(present) < 2:
            continue
        best = max(present, key=lambda i: point[g, i])
        worst = min(present, key=lambda i: point[g, i])
        out["spread"].append({"setting": label, "levels": settings[g], "best": methods[best],
                              "worst": methods[worst], "spread": float(point[g, best] - point[g, worst]),
                              "ci": _ci(spread_boot[:, g], level), "methods": len(present)})
    out["native_vs_shared"] = native_vs_shared(settings, labels, point, spread_boot, level)
    return out


def native_vs_shared(settings, labels, point, spread_boot, level) -> dict[str, Any]:
    """RD3's headline: spread under each method's native preset vs under one
    shared protocol, for each combination of the other setting factors."""
    if not settings or "protocol" not in settings[0]:
        return {"absent": "no `protocol` factor (the native_vs_unified design): no native-vs-shared spread"}
    if not any(s["protocol"] == NATIVE for s in settings):
        return {"absent": f"the `protocol` factor has no {NATIVE!r} level"}
    rows = []
    for g, s in enumerate(settings):
        if s["protocol"] != NATIVE:
            continue
        others = {k: v for k, v in s.items() if k != "protocol"}
        for h, t in enumerate(settings):
            if t["protocol"] == NATIVE or {k: v for k, v in t.items() if k != "protocol"} != others:
                continue
            sn = float(np.nanmax(point[g]) - np.nanmin(point[g]))
            ss = float(np.nanmax(point[h]) - np.nanmin(point[h]))
            rows.append({"others": others, "shared": t["protocol"], "spread_native": sn, "spread_shared": ss,
                         "spread_native_ci": _ci(spread_boot[:, g], level),
                         "spread_shared_ci": _ci(spread_boot[:, h], level),
                         "reduction": sn - ss, "reduction_ci": _ci(spread_boot[:, g] - spread_boot[:, h], level)})
    return {"rows": rows} if rows else {"absent": "no shared-protocol setting matches a native one"}


def _ci(samples: np.ndarray, level: float) -> list[float | None]:
    return [_num(v) for v in interval(samples, level)] if len(samples) else [None, None]


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
