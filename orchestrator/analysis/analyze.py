"""``analyze``: everything the analysis computes for one study, as one
JSON-serialisable dict (``--format json`` prints it as is), plus the headline
sentences computed from it."""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .attribution import attribute, public_shares
from .comparisons import compare, finish_power
from .ddranking import ddranking
from .design import GROUPS, Design, cost_means, factor_group, load_design
from .inference import CORRECTIONS
from .tuning import tuning_section, tuning_sentences

LEVEL = 0.95
CORRECTION = "holm"


def analyze(engine, study: str, level: float = LEVEL, correction: str = CORRECTION) -> dict[str, Any]:
    return analyze_design(load_design(engine, study), level, correction)


def analyze_design(design: Design, level: float = LEVEL, correction: str = CORRECTION) -> dict[str, Any]:
    """Attribution, comparisons, baselines and DD-Ranking metrics of one study."""
    result: dict[str, Any] = {"study": design.study, "metric": "top1 (final-epoch test accuracy, fraction)"}
    result["cells"] = cell_summary(design)
    result["design"] = {
        "factors": design.factors,
        "groups": {g: [f for f in design.factors if factor_group(f) == g] for g in GROUPS},
        "levels": {f: design.levels[f] for f in design.factors},
        "left_out_of_model": design.dropped,
        "seeds": design.seeds,
        "methods": [m for m, i in design.info.items() if i.role == "method"],
        "baselines": design.baseline_labels,
        **design.balance(),
    }
    result["inference"] = {"level": level, "correction": CORRECTIONS[correction], "unit": "seed",
                           "paired": "Student t on per-seed differences (df = seeds - 1); exact sign-flip p beside",
                           "effect_sizes": "partial eta^2: noncentral F (Steiger 2004); shares: the sample share's "
                                           "own distribution, nuisance by Berger-Boos"}
    if design.frame.empty:
        result["empty"] = "no finished cell with a finite top1: nothing to analyse"
        result["shares"] = {}
        result["headlines"] = [result["empty"]]
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means of empty slices are NaN by design here
        result["attribution"] = attribute(design, level)
        result["shares"] = {} if "absent" in result["attribution"] else public_shares(result["attribution"])
        result["comparisons"] = compare(design, level, correction)
        result["ddranking"] = ddranking(design, level)
        result["costs"] = cost_means(design)
    att = result["attribution"]
    ms = att["residual"]["ss"] / att["residual"]["df"] if "residual" in att and att["residual"]["df"] else None
    if "power" in result["comparisons"]:
        result["power"] = finish_power(result["comparisons"].pop("power"), ms, len(design.seeds), level)
    if len(design.trials):
        result["tuning"] = tuning_section(design.trials, result["comparisons"], design.spec_text)
    result["headlines"] = headlines(result)
    return result


def cell_summary(design: Design) -> dict[str, Any]:
    missing = design.not_analysed()
    factors = [c for c in design.cells.columns if c not in ("cell_key", "seed", "status")]
    return {
        "stored": int(len(design.cells)),
        "analysed": int(len(design.frame) + len(design.baselines)),
        "methods_proper": int(len(design.frame)),
        "baseline_cells": int(len(design.baselines)),
        "by_status": {str(k): int(v) for k, v in design.cells["status"].value_counts().items()},
        "not_analysed": [{"cell_key": r["cell_key"], "seed": int(r["seed"]), "status": r["status"],
                          "reason": r["reason"], "factors": {f: r[f] for f in factors if isinstance(r[f], str)}}
                         for r in missing.to_dict("records")],
    }


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def ci_text(ci, digits: int = 1) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]"


def points(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def headlines(result: dict[str, Any]) -> list[str]:
    """A few sentences computed from the numbers, for the report and the terminal."""
    att = result["attribution"]
    out = [f"No variance attribution: {att['absent']}."] if "absent" in att else share_sentences(result)
    comp = result["comparisons"]
    out += spread_sentences(comp.get("native_vs_shared", {}).get("rows", []), result["inference"]["level"])
    out += baseline_sentences(comp.get("versus_baselines", {}), result["inference"])
    taus = [k["tau"] for k in comp.get("kendall", []) if k["tau"] is not None]
    if taus:
        flips = comp["flips"]
        sig = sum(f["significant"] for f in flips)
        out.append(f"Method rankings across {len(comp['settings'])} settings: Kendall tau from {min(taus):.2f} to "
                   f"{max(taus):.2f} (mean {np.mean(taus):.2f}); {len(flips)} pairwise order flips between settings, "
                   f"{sig} of them real (both paired differences significant after {comp['correction']} over the "
                   f"{len(comp['paired'])} paired comparisons).")
    if "tuning" in result:
        out += tuning_sentences(result["tuning"], pct, ci_text)
    if "power" in result:
        out += power_sentences(result["power"])
    out += seed_sentences(result)
    cells = result["cells"]
    if cells["not_analysed"]:
        out.append(f"{len(cells['not_analysed'])} of {cells['stored']} stored cells are not analysed "
                   f"(missing, failed or non-finite results; listed below).")
    if not result["design"]["balanced"]:
        out.append(f"The design is unbalanced ({result['design']['combinations_missing']} empty combinations, "
                   f"{result['design']['seeds_per_combination_min']}-{result['design']['seeds_per_combination_max']}"
                   f" seeds per combination): Type III sums of squares.")
    return out


def spread_sentences(rows: list[dict], level: float) -> list[str]:
    """RD3's headline, one sentence per shared protocol (ranges when the other
    factors give several settings)."""
    out = []
    for shared in dict.fromkeys(r["shared"] for r in rows):
        mine = [r for r in rows if r["shared"] == shared]
        real = sum(r["excludes_zero"] for r in mine)
        tail = (f"{100 * level:.0f}% intervals simultaneous over {len(rows)} comparison(s)")
        if len(mine) == 1:
            r = mine[0]
            where = ", ".join(f"{k}={v}" for k, v in r["others"].items())
            out.append(f"Best-to-worst spread of the methods: {points(r['spread_native'])} points"
                       f"{ci_text(r['spread_native_ci'])} under each method's native preset vs "
                       f"{points(r['spread_shared'])}{ci_text(r['spread_shared_ci'])} under {shared}"
                       f"{' (' + where + ')' if where else ''}; reduction {points(r['reduction'])} points"
                       f"{ci_text(r['reduction_ci'])} ({tail}; "
                       f"{'excludes' if r['excludes_zero'] else 'includes'} 0).")
            continue
        span = lambda key: f"{points(min(r[key] for r in mine))} to {points(max(r[key] for r in mine))}"  # noqa: E731
        out.append(f"Best-to-worst spread of the methods over {len(mine)} settings of the other factors: "
                   f"{span('spread_native')} points under each method's native preset vs {span('spread_shared')} "
                   f"under {shared}; reduction {span('reduction')} points, {real} of {len(mine)} reductions with an "
                   f"interval excluding 0 ({tail}; per setting in the table).")
    return out


def baseline_sentences(versus: dict[str, Any], inference: dict) -> list[str]:
    out = []
    for b, section in versus.items():
        rows = section.get("rows", [])
        if not rows:
            continue
        above = sum(r["significant"] and r["diff"] > 0 for r in rows)
        below = sum(r["significant"] and r["diff"] < 0 for r in rows)
        diffs = [r["diff"] for r in rows if r["diff"] is not None]
        out.append(f"Against {b} under the same recipe ({len(rows)} method-setting comparisons, {inference['correction']}"
                   f"): {above} significantly above it, {below} significantly below it, {len(rows) - above - below} "
                   f"not told apart; differences from {points(min(diffs))} to {points(max(diffs))} points.")
    return out


def power_sentences(power: dict[str, Any]) -> list[str]:
    if "absent" in power:
        return []
    out = [f"Power: with {power['seeds']} seeds and the fitted seed noise (sd {points(power['noise_sd'], 2)} points "
           f"per cell), a paired difference must be at least {points(power['detectable'])} points to be detected "
           f"with 80% power at {100 * power['alpha']:.0f}% ({points(power['detectable_family'])} after correcting "
           f"over the {power['family']} paired comparisons, Bonferroni's worst case)."]
    c = power.get("closest")
    if c:
        need = c.get("seeds_needed")
        tell = (f"about {need} seeds would tell them apart with 80% power" if need else
                "no practical number of seeds would tell them apart (more than 10,000)")
        out.append(f"The closest pair, {c['a']} vs {c['b']} ({c['setting']}), differs by {points(c['diff'], 2)} "
                   f"points: {tell}.")
    return out


def seed_sentences(result: dict[str, Any]) -> list[str]:
    """Say in words what the seeds cannot support."""
    n = len(result["design"]["seeds"])
    alpha = 1 - result["inference"]["level"]
    if n < 2:
        return [f"Only {n} seed: no interval and no test is possible; every difference shown is a single run."]
    floor = 2 / 2 ** n
    if floor >= alpha:
        return [f"With {n} seeds, significance rests on the t test's assumption of normally distributed seed noise: "
                f"an exact sign-flip test, which assumes only symmetric noise, cannot go below p = {floor:.3g}, so "
                f"without that assumption no difference is significant at {100 * alpha:.0f}%."]
    return []


def share_sentences(result: dict[str, Any]) -> list[str]:
    att, shares = result["attribution"], result["shares"]
    groups = result["design"]["groups"]
    ci = att["shares_ci"]
    names = {g: ", ".join(groups[g]) or "none" for g in GROUPS}
    level = f"{100 * result['inference']['level']:.0f}%"
    budget = (f"budget factors ({names['budget']}) {pct(shares['budget'])}{ci_text(ci['budget'])}"
              if groups["budget"] else "budget factors (IPC, label storage) none vary")
    text = (f"Of the variance in final top-1: protocol factors ({names['protocol']}) "
            f"{pct(shares['protocol'])}{ci_text(ci['protocol'])}, method factors ({names['method']}) "
            f"{pct(shares['method'])}{ci_text(ci['method'])}, their interaction "
            f"{pct(shares['method_x_protocol'])}{ci_text(ci['method_x_protocol'])}, {budget}")
    if groups["budget"]:
        text += f", budget interactions {pct(shares['budget_x'])}{ci_text(ci['budget_x'])}"
    if "other" in shares:
        text += f", other factors ({names['other']}) {pct(shares['other'])}{ci_text(ci['other'])}"
    out = [text + f", and {att['residual_name']} {pct(shares['residual'])}{ci_text(ci['residual'])} "
                  f"({level} intervals for the population shares)."]
    if att["terms"]:
        top = max(att["terms"], key=lambda t: t["eta2"] or 0)
        out.append(f"The largest single term is {top['term']} (eta^2 {pct(top['eta2'])}{ci_text(top['eta2_ci'])}, "
                   f"partial eta^2 {pct(top['partial_eta2'])}{ci_text(top['partial_eta2_ci'])}, omega^2 "
                   f"{pct(top['omega2'])}).")
    return out
