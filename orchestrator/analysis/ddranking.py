"""DD-Ranking's robustness metrics (arXiv 2505.13300), on fractions (accuracies in
[0, 1]), each per seed on paired cells and then averaged:

- HLR(m) = Acc(full_real, hard) - Acc(m, hard)
- IOR(m, s) = Acc(m, s) - Acc(random_real, s), the random subset evaluated with
  the method's own recipe s (the twin cells of native_vs_unified)
- LRS(m, s) = N(w IOR(m, s) - (1 - w) HLR(m)), w = 0.5
- ARS(m) = N(g IOR(m, augment on) + (1 - g) IOR(m, augment off)), g = 0.5
- N(x) = (e^x - e^-1) / (e - e^-1), which maps [-1, 1] onto [0, 1]

Intervals: Student t over the per-seed values (df = n - 1); N is increasing, so
LRS and ARS take N of their argument's interval. What the study must contain:
docs/ANALYSIS.md. Missing pieces are reported, never guessed.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .comparisons import baseline_cube, cube, setting_label
from .design import Design, factor_group
from .inference import nan_to_none, paired

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


def ddranking(design: Design, level: float = 0.95) -> dict[str, Any]:
    settings, methods, y = cube(design)
    if not methods:
        return {"absent": "no method proper (every method is a baseline)"}
    full, rnd = design.baseline_named(FULL), design.baseline_named(RANDOM)
    mode = _mode_of(design, settings)
    rows = _Rows(settings, level)
    out: dict[str, Any] = {}

    hlr: dict[tuple[int, int], np.ndarray] = {}
    if full is None:
        out["hlr"] = {"absent": f"no {FULL!r} cells (the whole real training set with hard labels)"}
    elif mode is None:
        out["hlr"] = {"absent": f"no {LABELS!r} setting recorded: cannot tell which cells use hard labels"}
    else:
        # The whole real set under the method's protocol: IPC and synthesis settings do not apply to it.
        real = baseline_cube(design, full, settings, methods,
                             [c for c in design.columns if factor_group(c) == "protocol"])
        for g in range(len(settings)):
            if mode(g) == "hard":
                for i in range(len(methods)):
                    if not np.all(np.isnan(real[g, i] - y[g, i])):
                        hlr[g, i] = real[g, i] - y[g, i]
        out["hlr"] = rows.linear(hlr, methods) or {
            "absent": f"no {FULL!r} cell under the same protocol as a method's {LABELS}=hard cells"}
    ior: dict[tuple[int, int], np.ndarray] = {}
    if rnd is None:
        out["ior"] = {"absent": f"no {RANDOM!r} cells (a random real subset of the same IPC)"}
    else:
        twin = baseline_cube(design, rnd, settings, methods)
        for g in range(len(settings)):
            for i in range(len(methods)):
                if not np.all(np.isnan(y[g, i] - twin[g, i])):
                    ior[g, i] = y[g, i] - twin[g, i]
        out["ior"] = rows.linear(ior, methods) or {"absent": f"no {RANDOM!r} cell under the same recipe as a method"}

    index = {tuple(sorted(s.items())): g for g, s in enumerate(settings)}
    lrs = {}
    for (g, i), v in ior.items():
        if mode is None or mode(g) == "hard":
            continue
        h = index.get(tuple(sorted({**settings[g], LABELS: "hard"}.items())))
        if h is not None and (h, i) in hlr:
            lrs[g, i] = W_LRS * v - (1 - W_LRS) * hlr[h, i]
    out["lrs"] = rows.normalised(lrs, methods) or {
        "absent": f"needs IOR under a soft-label setting and HLR under its hard-label twin (same setting, "
                  f"{LABELS}=hard) for some method"}

    ars = {}
    off = [lv for lv in design.levels.get(AUGMENT, []) if is_augment_off(lv)] if AUGMENT in design.factors else []
    for (g, i), v in ior.items():
        if off and settings[g][AUGMENT] not in off:
            h = index.get(tuple(sorted({**settings[g], AUGMENT: off[0]}.items())))
            if h is not None and (h, i) in ior:
                ars[g, i] = G_ARS * v + (1 - G_ARS) * ior[h, i]
    out["ars"] = rows.normalised(ars, methods) or {
        "absent": f"needs IOR with and without augmentation: a {AUGMENT!r} factor with an 'off' level "
                  "({crop: none, flip: false, mix: none}) and random_real"}
    return out


class _Rows:
    def __init__(self, settings, level):
        self.settings, self.level = settings, level

    def linear(self, values: dict, methods) -> dict | None:
        rows = [{"method": methods[i], "setting": setting_label(self.settings[g]), "value": r.mean,
                 "ci": [nan_to_none(c) for c in r.ci], "seeds": r.n, "p_t": nan_to_none(r.p_t),
                 "p_sign_flip": nan_to_none(r.p_flip)}
                for (g, i), v in values.items() for r in [paired(v, self.level)] if math.isfinite(r.mean)]
        return {"rows": rows} if rows else None

    def normalised(self, values: dict, methods) -> dict | None:
        rows = []
        for (g, i), v in values.items():
            r = paired(v, self.level)
            if math.isfinite(r.mean):
                rows.append({"method": methods[i], "setting": setting_label(self.settings[g]),
                             "value": float(normalise(r.mean)), "seeds": r.n,
                             "ci": [nan_to_none(float(normalise(c))) if math.isfinite(c) else None for c in r.ci]})
        return {"rows": rows} if rows else None


def _mode_of(design: Design, settings):
    """Label mode of a setting: from the factor, or the one mode every cell shares."""
    if LABELS in design.factors:
        return lambda g: settings[g][LABELS]
    if LABELS in design.frame and design.frame[LABELS].nunique() == 1:
        constant = str(design.frame[LABELS].iloc[0])
        return lambda g: constant
    return None
