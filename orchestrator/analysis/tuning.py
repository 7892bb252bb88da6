"""A tuned design read back: each method's search (budget spent, pruned and
failed trials, the recipe chosen on held-out data, best accuracy against budget)
and the question it answers: does the method ranking under the shared protocol
survive when every method gets the same tuning effort?

Native, unified and tuned are levels of the ``protocol`` column, so their means,
intervals, paired differences and ranking flips are the comparisons' own
(orchestrator.analysis.comparisons, issue 9's inference); this module picks out
the unified-vs-tuned part and adds the search's own record.
"""
from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from db.queries import cells_frame, results_frame

from ..study.design import NATIVE
from rd3core.config import ConfigError, build

from ..study.tuning import METRIC, TRIAL, TUNED, Budget, choose

TRIAL_METRICS = (METRIC, "trial_epochs", "trial_rung", "pruned", "cpu_hours", "gpu_hours", "trial_wall_s")


def trials_frame(engine, study: str) -> pd.DataFrame:
    """One row per stored trial of the study's search, whatever its status:
    cell_key, method, trial (index), status, the searched values (a column per
    path) and the trial metrics (NaN where it has none: running or failed)."""
    cells = cells_frame(engine, study)
    if "protocol" not in cells or not (cells["protocol"] == TRIAL).any():
        return pd.DataFrame()
    cells = cells[cells["protocol"] == TRIAL]
    results = results_frame(engine, study)
    keep = ["cell_key", *[m for m in TRIAL_METRICS if m in results]]
    frame = cells.merge(results[keep], on="cell_key", how="left") if len(results) else cells
    frame = frame.dropna(axis=1, how="all")
    frame[TRIAL] = frame[TRIAL].astype(int)
    for c in searched_columns(frame):  # ints stored as ints, floated by the other cells' missing values
        frame[c] = frame[c].map(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
    return frame.sort_values(["method", TRIAL], kind="stable").reset_index(drop=True)


def searched_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("protocol.")]


def _records(rows: pd.DataFrame) -> list[dict]:
    out = []
    for r in rows.to_dict("records"):
        out.append({"index": int(r[TRIAL]), "status": r["status"],
                    **{m: float(r[m]) for m in TRIAL_METRICS if m in r and pd.notna(r[m])}})
    return out


def search_summary(trials: pd.DataFrame, budget: Budget | None = None) -> dict[str, dict[str, Any]]:
    """Per method: trials stored, done, pruned (and at which epochs), failed,
    running, epochs and CPU/GPU-hours spent, the chosen trial and the best
    held-out accuracy against the epochs spent so far (in trial order)."""
    budget = budget or Budget()
    out: dict[str, dict[str, Any]] = {}
    paths = searched_columns(trials)
    for method, rows in trials.groupby("method", sort=False):
        records = _records(rows)
        done = [t for t in records if t["status"] == "done"]
        pruned = [t for t in done if t.get("pruned") == 1]
        chosen = choose(records)
        curve, spent, best = [], 0.0, math.nan
        for t in done:
            spent += t.get("trial_epochs", 0.0)
            if t.get("pruned") == 0 and math.isfinite(t.get(METRIC, math.nan)):
                best = t[METRIC] if math.isnan(best) else max(best, t[METRIC])
            curve.append([spent, None if math.isnan(best) else best])
        values = {int(r[TRIAL]): {p: plain(r[p]) for p in paths if pd.notna(r[p])} for r in rows.to_dict("records")}
        out[str(method)] = {
            "trials": len(records), "budget": budget.progress(records), "budget_spent": budget.exhausted(records),
            "done": len(done), "pruned": len(pruned),
            "pruned_at": {str(int(e)): sum(t.get("trial_epochs") == e for t in pruned)
                          for e in sorted({t.get("trial_epochs", 0) for t in pruned})},
            "failed": sum(t["status"] == "failed" for t in records),
            "running": sum(t["status"] == "running" for t in records),
            "epochs": spent, "cpu_hours": sum(t.get("cpu_hours", 0.0) for t in done),
            "gpu_hours": sum(t.get("gpu_hours", 0.0) for t in done),
            "chosen": None if chosen is None else {"trial": chosen["index"], METRIC: chosen[METRIC],
                                                   "values": values[chosen["index"]]},
            "best_against_epochs": curve,
        }
    return out


def plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers, pandas columns) as Python numbers: they are hashed, stored and printed."""
    return value.item() if hasattr(value, "item") else value


def search_budget(spec_text: str | None) -> Budget:
    """The budget per method, as the stored study text says."""
    return _design(spec_text)[0]


def tuning_section(trials: pd.DataFrame, comparisons: dict[str, Any], spec_text: str | None) -> dict[str, Any]:
    """The tuned design's part of the analysis (``analyze``'s ``tuning`` key)."""
    budget, written = _design(spec_text)
    searches = search_summary(trials, budget)
    spent = {m: s["budget_spent"] for m, s in searches.items()}
    out: dict[str, Any] = {"budget": {"kind": budget.kind, "amount": budget.amount, "per_method": budget.describe(),
                                      **written},
                           "searches": searches, "equal_budget": bool(spent) and all(spent.values())}
    settings = {s["levels"].get("protocol"): s for s in comparisons.get("settings", []) if "protocol" in s["levels"]}
    shared = [p for p in settings if p not in (NATIVE, TUNED)]
    arms = [a for a in (NATIVE, *shared, TUNED) if a in settings]
    out["arms"] = arms
    out["methods"] = {m: {a: {"mean": settings[a]["means"].get(m), "ci": settings[a]["ci"].get(m),
                              "seeds": settings[a]["seeds"].get(m), "rank": settings[a]["ranks"].get(m)}
                          for a in arms} for m in comparisons.get("methods", [])}
    for b in comparisons.get("baselines", []):  # beside the methods, outside their ranks
        out["methods"][b] = {a: {**settings[a]["baselines"][b], "rank": None} for a in arms
                             if b in settings[a].get("baselines", {})}
    if shared and TUNED in settings:
        a, b = settings[shared[0]]["setting"], settings[TUNED]["setting"]
        kendall = next((k for k in comparisons.get("kendall", []) if {k["a"], k["b"]} == {a, b}), None)
        flips = [f for f in comparisons.get("flips", []) if set(f["settings"]) == {a, b}]
        out["ranking"] = {"shared": shared[0], "tau": kendall["tau"] if kendall else None,
                          "flips": flips, "real_flips": sum(f["significant"] for f in flips),
                          "survives": not flips,
                          "order": {arm: sorted(settings[arm]["means"], key=lambda m: settings[arm]["ranks"][m])
                                    for arm in (shared[0], TUNED)}}
    return out


def _design(spec_text: str | None) -> tuple[Budget, dict[str, Any]]:
    """The design's budget, and its search, scheduler and space as written, from the stored study text."""
    import yaml

    try:
        design = (yaml.safe_load(spec_text or "") or {}).get("design") or {}
    except (yaml.YAMLError, AttributeError):
        design = {}
    design = design if isinstance(design, dict) else {}
    try:
        budget = build(Budget, design.get("budget") or {})
    except ConfigError:
        budget = Budget()
    return budget, {k: design.get(k) or {} for k in ("search", "scheduler", "space")}


def tuning_sentences(section: dict[str, Any], pct, ci_text) -> list[str]:
    """Headline sentences: budgets, and whether the ranking survives equal tuning."""
    out = []
    searches = section["searches"]
    if searches:
        spent = "; ".join(f"{m}: {s['trials']} trials, {s['pruned']} pruned, {s['failed']} failed, "
                          f"{s['epochs']:.0f} epochs" for m, s in searches.items())
        equal = "equal" if section["equal_budget"] else "NOT equal (a search did not spend its budget)"
        out.append(f"Tuning budgets are {equal} ({section['budget']['per_method']}, search "
                   f"{json.dumps(section['budget']['search'])}): {spent}.")
    ranking = section.get("ranking")
    if ranking:
        order = ranking["order"]
        text = (f"Under {ranking['shared']} the ranking is {' > '.join(order[ranking['shared']])}; tuned at equal "
                f"budget it is {' > '.join(order[TUNED])}")
        tau = ranking["tau"]
        if ranking["survives"]:
            out.append(f"{text}: the ranking survives equal tuning (Kendall tau {tau:.2f}).")
        else:
            pairs = ", ".join(f"{f['a']}/{f['b']}" + (" (real)" if f["significant"] else "") for f in ranking["flips"])
            out.append(f"{text}: the ranking changes under equal tuning ({len(ranking['flips'])} pair(s) swap: "
                       f"{pairs}; {ranking['real_flips']} real, i.e. both paired differences significant; "
                       f"Kendall tau {tau:.2f}).")
    for m, arms in section["methods"].items():
        parts = [f"{a} {pct(v['mean'])}{ci_text(v['ci'])}" for a, v in arms.items()]
        out.append(f"{m}: " + ", ".join(parts) + ".")
    return out


def tuning_table(section: dict[str, Any], pct, with_ci) -> tuple[str, pd.DataFrame] | None:
    if not section.get("searches"):
        return None
    rows = []
    for m, s in section["searches"].items():
        arms = section["methods"].get(m, {})
        chosen = s["chosen"]
        rows.append({"method": m, **{a: with_ci(v["mean"], v["ci"], 1) for a, v in arms.items()},
                     "role": "baseline" if arms and all(v["rank"] is None for v in arms.values()) else "method",
                     "chosen recipe": "none" if chosen is None else
                     values_text(chosen["values"]),
                     f"chosen {METRIC}": "-" if chosen is None else pct(chosen[METRIC], 1),
                     "trials": s["trials"], "pruned": s["pruned"], "failed": s["failed"],
                     "epochs spent": f"{s['epochs']:.0f}", "CPU-hours": f"{s['cpu_hours']:.3g}"})
    return ("Fair tuning: each method native, under the shared protocol, and tuned at equal budget (test top-1, "
            "mean and interval over seeds), with its search", pd.DataFrame(rows))


def values_text(values: dict[str, Any]) -> str:
    """Searched values for a line of text: ``optim.lr=0.00367, batch_size=50``."""
    return ", ".join(f"{p.removeprefix('protocol.')}={f'{v:.3g}' if isinstance(v, float) else v}"
                     for p, v in values.items())
