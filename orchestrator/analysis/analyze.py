"""``analyze``: everything the analysis computes for one study, as one
JSON-serialisable dict (``--format json`` prints it as is), plus the headline
sentences computed from it."""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .attribution import attribute, public_shares
from .comparisons import compare
from .ddranking import ddranking
from .design import GROUPS, Design, factor_group, load_design, seed_counts

DRAWS = 1000  # bootstrap draws over seeds
LEVEL = 0.95


def analyze(engine, study: str, draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    return analyze_design(load_design(engine, study), draws, seed, level)


def analyze_design(design: Design, draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """Attribution, comparisons and DD-Ranking metrics; every interval from the
    same ``draws`` resamples of the seeds, drawn from ``seed``."""
    counts = seed_counts(design.seeds, draws, np.random.default_rng(seed))
    result: dict[str, Any] = {"study": design.study, "metric": "top1 (final-epoch test accuracy, fraction)"}
    result["cells"] = cell_summary(design)
    result["design"] = {
        "factors": design.factors,
        "groups": {g: [f for f in design.factors if factor_group(f) == g] for g in GROUPS},
        "levels": {f: design.levels[f] for f in design.factors},
        "left_out_of_model": design.dropped,
        "seeds": design.seeds,
        **design.balance(),
    }
    result["bootstrap"] = {"draws": int(len(counts)), "seed": seed, "level": level,
                           "unit": "seed (all cells of a drawn seed together: pairing kept)"}
    if design.frame.empty:
        result["empty"] = "no finished cell with a finite top1: nothing to analyse"
        result["shares"] = {}
        result["headlines"] = [result["empty"]]
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means of empty slices are NaN by design here
        result["attribution"] = attribute(design, counts, level)
        result["shares"] = {} if "absent" in result["attribution"] else public_shares(result["attribution"])
        result["comparisons"] = compare(design, counts, level)
        result["ddranking"] = ddranking(design, counts, level)
    result["headlines"] = headlines(result)
    return result


def cell_summary(design: Design) -> dict[str, Any]:
    missing = design.not_analysed()
    factors = [c for c in design.cells.columns if c not in ("cell_key", "seed", "status")]
    return {
        "stored": int(len(design.cells)),
        "analysed": int(len(design.frame)),
        "by_status": {str(k): int(v) for k, v in design.cells["status"].value_counts().items()},
        "not_analysed": [{"cell_key": r["cell_key"], "seed": int(r["seed"]), "status": r["status"],
                          "reason": r["reason"], "factors": {f: r[f] for f in factors if isinstance(r[f], str)}}
                         for r in missing.to_dict("records")],
    }


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def ci_text(ci, digits: int = 1) -> str:
    if not ci or ci[0] is None:
        return ""
    return f" [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]"


def headlines(result: dict[str, Any]) -> list[str]:
    """A few sentences computed from the numbers, for the report and the terminal."""
    att = result["attribution"]
    out = [f"No variance attribution: {att['absent']}."] if "absent" in att else share_sentences(result)
    comp = result["comparisons"]
    out += spread_sentences(comp.get("native_vs_shared", {}).get("rows", []))
    taus = [k["tau"] for k in comp.get("kendall", []) if k["tau"] is not None]
    if taus:
        flips = comp["flips"]
        sig = sum(f["significant"] for f in flips)
        out.append(f"Method rankings across {len(comp['settings'])} protocol settings: Kendall tau from "
                   f"{min(taus):.2f} to {max(taus):.2f} (mean {np.mean(taus):.2f}); {len(flips)} pairwise order "
                   f"flips between settings, {sig} of them with both paired intervals excluding zero.")
    cells = result["cells"]
    if cells["not_analysed"]:
        out.append(f"{len(cells['not_analysed'])} of {cells['stored']} stored cells are not analysed "
                   f"(missing, failed or non-finite results; listed below).")
    if not result["design"]["balanced"]:
        out.append(f"The design is unbalanced ({result['design']['combinations_missing']} empty combinations, "
                   f"{result['design']['seeds_per_combination_min']}-{result['design']['seeds_per_combination_max']}"
                   f" seeds per combination): Type III sums of squares.")
    return out


def spread_sentences(rows: list[dict]) -> list[str]:
    """RD3's headline, one sentence per shared protocol (ranges when the other
    factors give several settings)."""
    out = []
    for shared in dict.fromkeys(r["shared"] for r in rows):
        mine = [r for r in rows if r["shared"] == shared]
        if len(mine) == 1:
            r = mine[0]
            where = ", ".join(f"{k}={v}" for k, v in r["others"].items())
            out.append(f"Best-to-worst method spread: {100 * r['spread_native']:.1f} points under each method's "
                       f"native preset vs {100 * r['spread_shared']:.1f} under {shared}"
                       f"{' (' + where + ')' if where else ''}; reduction {100 * r['reduction']:.1f} points"
                       f"{ci_text(r['reduction_ci'])}.")
            continue
        span = lambda key: f"{100 * min(r[key] for r in mine):.1f}-{100 * max(r[key] for r in mine):.1f}"  # noqa: E731
        out.append(f"Best-to-worst method spread over {len(mine)} settings of the other factors: "
                   f"{span('spread_native')} points under each method's native preset vs {span('spread_shared')} "
                   f"under {shared}; reduction {span('reduction')} points (per setting in the spread table).")
    return out


def share_sentences(result: dict[str, Any]) -> list[str]:
    att, shares = result["attribution"], result["shares"]
    groups = result["design"]["groups"]
    ci = att["shares_ci"]
    level = f"{100 * result['bootstrap']['level']:.0f}%"
    names = {g: ", ".join(groups[g]) or "none" for g in GROUPS}
    text = (f"Protocol factors ({names['protocol']}) explain {pct(shares['protocol'])}{ci_text(ci['protocol'])} "
            f"of the variance in final top-1, method factors ({names['method']}) "
            f"{pct(shares['method'])}{ci_text(ci['method'])}, their interaction "
            f"{pct(shares['method_x_protocol'])}{ci_text(ci['method_x_protocol'])}")
    if "other" in shares:
        text += f", other factors ({names['other']}) {pct(shares['other'])}"
    out = [text + f", and seed noise (residual) {pct(shares['residual'])}{ci_text(ci['residual'])} "
                  f"({level} seed-bootstrap intervals, {att['bootstrap_draws']} draws)."]
    if att["terms"]:
        top = max(att["terms"], key=lambda t: t["eta2"] or 0)
        out.append(f"The largest single term is {top['term']} (eta^2 {pct(top['eta2'])}{ci_text(top['eta2_ci'])}, "
                   f"partial eta^2 {pct(top['partial_eta2'])}, omega^2 {pct(top['omega2'])}).")
    return out
