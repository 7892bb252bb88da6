"""DD-Ranking's robustness metrics, on fractions (accuracies in [0, 1]).

- HLR(m) = Acc(full_real, hard) - Acc(m, hard)
- IOR(m, s) = Acc(m, s) - Acc(random_real, s)
- LRS(m, s) = N(w IOR(m, s) - (1 - w) HLR(m)), w = 0.5
- ARS(m) = N(g IOR(m, augment on) + (1 - g) IOR(m, augment off)), g = 0.5
- N(x) = (e^x - e^-1) / (e - e^-1), which maps [-1, 1] onto [0, 1]

What the study must contain (docs/ANALYSIS.md): a ``method`` factor; for HLR,
``full_real`` cells with ``protocol.labels.mode`` = ``hard`` under the same
protocol-factor levels as the method's hard-label cells (``method.*`` and other
factors are ignored for full_real: it trains on the whole real set); for IOR,
``random_real`` cells in the same setting (all non-method factors equal,
IPC included); for LRS, each soft-label setting's hard-label twin (the same
setting with ``protocol.labels.mode`` = ``hard``); for ARS, a factor named
``protocol.augment`` with an "off" level (a mapping with crop none, flip false,
mix none, no randaugment) and the other levels "on". Missing pieces are
reported, never guessed.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .comparisons import cube, setting_label, weighted_means
from .design import Design, interval, level_text

FULL, RANDOM = "full_real", "random_real"
LABELS, AUGMENT = "protocol.labels.mode", "protocol.augment"
W_LRS = G_ARS = 0.5


def normalise(x):
    return (np.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def is_augment_off(level: str) -> bool:
    if level.lower() in ("none", "off", "false"):
        return True
    try:
        spec = json.loads(level)
    except ValueError:
        return False
    return (isinstance(spec, dict) and spec.get("crop") == "none" and spec.get("flip") is False
            and spec.get("mix") == "none" and not spec.get("randaugment") and spec.get("shuffle_patches", 1) <= 1)


def ddranking(design: Design, counts: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    if design.method is None:
        return {"absent": "needs a `method` factor (synthetic methods plus random_real / full_real)"}
    settings, methods, y = cube(design)
    point = weighted_means(y, np.ones((1, y.shape[-1])))[0]
    boot = weighted_means(y, counts)
    both = np.concatenate([point[None], boot])  # draw 0 is the point estimate
    synthetic = [m for m in methods if m not in (FULL, RANDOM)]
    mode = _mode_of(design)
    ctx = _Context(settings, methods, both, level)
    out: dict[str, Any] = {}

    hlr: dict[tuple[str, int], np.ndarray] = {}
    if FULL not in methods:
        out["hlr"] = {"absent": f"no {FULL!r} cells (the whole real training set with hard labels)"}
    elif mode is None:
        out["hlr"] = {"absent": f"no {LABELS!r} factor: cannot tell which cells use hard labels"}
    else:
        proto = [f for f in settings[0] if f == "protocol" or f == "preset" or f.startswith("protocol.")]
        for g, s in enumerate(settings):
            if mode(s) != "hard":
                continue
            full = methods.index(FULL)
            twins = [h for h, t in enumerate(settings)
                     if all(t[f] == s[f] for f in proto) and not np.isnan(both[0, h, full])]
            # full_real ignores IPC and synthesis settings: average its matching settings.
            real = np.nanmean(both[:, twins, full], axis=-1) if twins else None
            for m in synthetic:
                if real is not None:
                    hlr[m, g] = real - both[:, g, methods.index(m)]
        out["hlr"] = ctx.rows(hlr) or {"absent": f"no setting has both {FULL!r} and a synthetic method under "
                                                 f"{LABELS}=hard"}
    ior: dict[tuple[str, int], np.ndarray] = {}
    if RANDOM not in methods:
        out["ior"] = {"absent": f"no {RANDOM!r} cells (a random real subset of the same IPC)"}
    else:
        for g in range(len(settings)):
            for m in synthetic:
                ior[m, g] = both[:, g, methods.index(m)] - both[:, g, methods.index(RANDOM)]
        out["ior"] = ctx.rows(ior) or {"absent": "no synthetic method besides the baselines"}

    lrs = {}
    for (m, g), v in ior.items():
        if mode is None or mode(settings[g]) == "hard":
            continue
        twin = ctx.find({**settings[g], LABELS: "hard"})
        if twin is not None and (m, twin) in hlr:
            lrs[m, g] = normalise(W_LRS * v - (1 - W_LRS) * hlr[m, twin])
    out["lrs"] = ctx.rows(lrs) or {"absent": "needs IOR under a soft-label setting and HLR under its hard-label "
                                             f"twin (same setting, {LABELS}=hard) for some method"}

    ars = {}
    off = [lv for lv in design.levels.get(AUGMENT, []) if is_augment_off(lv)] if AUGMENT in design.factors else []
    for (m, g), v in ior.items():
        if off and settings[g][AUGMENT] not in off:
            twin = ctx.find({**settings[g], AUGMENT: off[0]})
            if twin is not None and (m, twin) in ior:
                ars[m, g] = normalise(G_ARS * v + (1 - G_ARS) * ior[m, twin])
    out["ars"] = ctx.rows(ars) or {"absent": f"needs IOR with and without augmentation: a {AUGMENT!r} factor with "
                                             "an 'off' level ({crop: none, flip: false, mix: none}) and random_real"}
    return out


class _Context:
    def __init__(self, settings, methods, both, level):
        self.settings, self.methods, self.both, self.level = settings, methods, both, level
        self.index = {tuple(sorted(s.items())): g for g, s in enumerate(settings)}

    def find(self, setting: dict) -> int | None:
        return self.index.get(tuple(sorted(setting.items())))

    def rows(self, values: dict) -> dict | None:
        rows = [{"method": m, "setting": setting_label(self.settings[g]), "value": _num(v[0]),
                 "ci": [_num(x) for x in interval(v[1:], self.level)]}
                for (m, g), v in values.items() if np.isfinite(v[0])]
        return {"rows": rows} if rows else None


def _mode_of(design: Design):
    if LABELS in design.factors:
        return lambda s: s[LABELS]
    if LABELS in design.frame and design.frame[LABELS].nunique() == 1:
        constant = level_text(design.frame[LABELS].iloc[0])
        return lambda s: constant
    return None


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
