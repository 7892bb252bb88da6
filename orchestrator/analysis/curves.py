"""More plots: the rank bump chart across protocol settings, learning curves from
the per-epoch metrics, and accuracy against cost."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from .design import COSTS, METHOD, Design, grouped_means
from .plots import ACC_LABEL, errbar, plt, save, short

# Cost metrics, in the order plotted, with axis labels (whichever the study has).
ZERO_NOTES = {"labels_storage_bytes": "0 for every cell: no soft labels stored (hard or on-the-fly labels)",
              "gpu_hours": "0 for every cell: post-evaluated on CPUs"}
MAX_LINES = 12
MAX_MARKERS = 8


def setting_tick(levels: dict[str, str]) -> str:
    return "\n".join(short(v, 16) for v in levels.values()) or "all"


def bump_chart(result: dict, out: Path) -> list[Path]:
    """Each method's rank (1 = best mean) in every setting; crossing lines are
    ranking flips."""
    comp = result.get("comparisons", {})
    settings = comp.get("settings", [])
    if len(settings) < 2 or len(comp.get("methods", [])) < 2:
        return []
    methods = comp["methods"]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.25 * len(settings) + 3.0), 0.45 * len(methods) + 2.6))
    colours = plt.get_cmap("tab10")
    xs = np.arange(len(settings))
    for i, m in enumerate(methods):
        ranks = np.array([s["ranks"].get(m, np.nan) for s in settings], dtype=float)
        ax.plot(xs, ranks, "-o", color=colours(i % 10), lw=2.2, ms=7, label=short(m, 28))
        last = np.flatnonzero(~np.isnan(ranks))
        if len(last):
            ax.annotate(short(m, 20), (xs[last[-1]], ranks[last[-1]]), xytext=(8, 0), textcoords="offset points",
                        va="center", color=colours(i % 10), fontsize=9)
    ax.set_ylim(len(methods) + 0.5, 0.5)
    ax.set_yticks(range(1, len(methods) + 1))
    ax.set_ylabel("rank by mean final top-1 (1 = best)")
    ax.set_xticks(xs, [setting_tick(s["levels"]) for s in settings], fontsize=8)
    ax.set_xlim(-0.3, len(settings) - 0.7 + 0.9)
    ax.set_xlabel(" / ".join(settings[0]["levels"]) or "setting")
    ax.grid(axis="y", alpha=0.3)
    taus = [k["tau"] for k in comp.get("kendall", []) if k["tau"] is not None]
    subtitle = f"Kendall tau between settings: {min(taus):.2f} to {max(taus):.2f}" if taus else ""
    ax.set_title(f"{result['study']}: method ranking per protocol setting\n{subtitle}")
    fig.tight_layout()
    return save(fig, out, "rank_bump")


def learning_curves(design: Design, epochs: pd.DataFrame, out: Path) -> list[Path]:
    """Mean over seeds per factor combination: training loss every epoch and test
    top-1 at the evaluated epochs (eval.interval); more than MAX_LINES
    combinations are averaged per level of the first factor."""
    if epochs is None or epochs.empty or design.frame.empty:
        return []
    by = design.factors
    cells = design.frame[["cell_key", *by]].copy()
    data = epochs.merge(cells, on="cell_key")
    for c in ("loss", "test_top1"):
        data[c] = pd.to_numeric(data[c], errors="coerce")
    if by and data.groupby(by, observed=True).ngroups > MAX_LINES:
        by = [design.method or by[0]]
    keys = data.groupby(by, observed=True) if by else [((), data)]
    curves = []
    for key, group in keys:
        key = key if isinstance(key, tuple) else (key,)
        mean = group.groupby("epoch")[["loss", "test_top1"]].mean()
        label = ", ".join(short(str(k), 14) for k in key) or "all cells"
        curves.append((label, mean))
    has_acc = any(m["test_top1"].notna().sum() > 1 for _, m in curves)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 6.5, 4.2), squeeze=False)
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (label, mean) in enumerate(curves):
        axes[0][0].plot(mean.index, mean["loss"], color=colours(i % 20), lw=1.4, label=label)
        if has_acc:
            acc = mean["test_top1"].dropna()
            axes[0][1].plot(acc.index, 100 * acc, "-o", ms=3, color=colours(i % 20), lw=1.4, label=label)
    axes[0][0].set_yscale("log")
    axes[0][0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[0][0].yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    axes[0][0].yaxis.set_minor_formatter(NullFormatter())
    axes[0][0].set_ylabel("training loss (mean over seeds, log)")
    axes[0][0].set_title("training loss")
    if has_acc:
        axes[0][1].set_ylabel("test top-1 (%), mean over seeds")
        axes[0][1].set_title("test accuracy at evaluated epochs")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title=" / ".join(by) or None, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    note = "" if has_acc else " (test accuracy only at the final epoch: set protocol.eval.interval for curves)"
    fig.suptitle(f"{design.study}: learning curves{note}")
    fig.tight_layout()
    return save(fig, out, "learning_curves")


def cost_plot(design: Design, out: Path, level: float = 0.95) -> list[Path]:
    """Mean final top-1 per factor combination (baselines beside the methods)
    against each recorded cost."""
    if design.frame.empty:
        return []
    frame = design.analysed()
    for c in COSTS:
        if c in frame:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    costs = [c for c in COSTS if c in frame and frame[c].notna().any()]
    if not costs:
        return []
    colour_by = METHOD if METHOD in frame else (design.factors[0] if design.factors else None)
    marker_by = [f for f in design.factors if f != colour_by]
    by = [colour_by, *marker_by] if colour_by else []
    if marker_by and frame.groupby(marker_by, observed=True).ngroups > MAX_MARKERS:
        by, marker_by = [colour_by], []  # too many settings to tell apart: average over them
    stats = grouped_means(frame, by, level)
    cost_means = frame.groupby(by, observed=True)[costs].mean() if by else frame[costs].mean().to_frame().T
    colours, markers = plt.get_cmap("tab10"), "osD^v<>pPX*h"
    colour_levels = list(dict.fromkeys([*design.levels.get(colour_by, []), *design.baseline_labels])) \
        if colour_by == METHOD else design.levels.get(colour_by, [None]) if colour_by else [None]
    marker_keys = list(dict.fromkeys(tuple(str(k[by.index(f)]) for f in marker_by) for k in stats))
    cols = min(len(costs), 2)
    rows = -(-len(costs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols + 2.6, 3.9 * rows + 0.5), squeeze=False, sharey=True)
    for ax, cost in zip(axes.flat, costs):
        scale, unit = _unit(cost, cost_means[cost].to_numpy(float))
        for key, st in stats.items():
            row = cost_means.loc[key if len(key) != 1 else key[0]]
            x = float(row[cost] if isinstance(row, pd.Series) else row) / scale
            ci = colour_levels.index(key[by.index(colour_by)]) if colour_by else 0
            mk = marker_keys.index(tuple(str(key[by.index(f)]) for f in marker_by))
            errbar(ax, [x], [st], color=colours(ci % 10), marker=markers[mk % len(markers)], ms=7, lw=0, elinewidth=1)
        values = cost_means[cost].to_numpy(float)
        if np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 30:
            ax.set_xscale("log")
        if np.nanmax(np.abs(values)) == 0:  # recorded, and nothing spent: say so rather than drop the axis
            ax.text(0.5, 0.04, ZERO_NOTES.get(cost, "0 for every cell"), transform=ax.transAxes, ha="center",
                    fontsize=8, color="dimgray")
        ax.set_xlabel(COSTS[cost].replace("(s)", f"({unit})").replace("(bytes)", f"({unit})"))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(costs):]:
        ax.set_visible(False)
    for row_axes in axes:
        row_axes[0].set_ylabel(ACC_LABEL)
    colour_handles = [plt.Line2D([], [], color=colours(i % 10), marker="o", lw=0, label=short(lv, 26))
                      for i, lv in enumerate(colour_levels) if lv is not None]
    marker_handles = [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], lw=0,
                                 label=short(", ".join(k), 30)) for i, k in enumerate(marker_keys) if k]
    if colour_handles:
        fig.legend(handles=colour_handles, title=f"colour: {colour_by}", loc="lower left",
                   bbox_to_anchor=(1.0, 0.5), frameon=False)
    if marker_handles:
        fig.legend(handles=marker_handles, title="marker: " + " / ".join(marker_by), loc="upper left",
                   bbox_to_anchor=(1.0, 0.48), frameon=False)
    per = "factor combination" if len(by) > 1 or not marker_by else f"{colour_by}, over all other factors"
    fig.suptitle(f"{design.study}: accuracy against cost (mean per {per}; "
                 f"{100 * level:.0f}% t interval over seeds)")
    fig.tight_layout()
    return save(fig, out, "accuracy_vs_cost")


def _unit(cost: str, values: np.ndarray) -> tuple[float, str]:
    """A readable unit for a cost axis: bytes as kB/MB/GB, seconds as min/h."""
    top = np.nanmax(values) if np.isfinite(values).any() else 0.0
    if cost.endswith("_bytes"):
        for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if top >= scale:
                return scale, unit
        return 1.0, "bytes"
    if cost.endswith("_s"):
        return (3600.0, "h") if top >= 3 * 3600 else (60.0, "min") if top >= 600 else (1.0, "s")
    return 1.0, ""


def tuning_plot(result: dict, out: Path) -> list[Path]:
    """A tuned design's searches: each method's best held-out accuracy (of the
    trials that trained every epoch) against the epochs its search had spent,
    trial by trial; the same budget for every method ends each line."""
    searches = result.get("tuning", {}).get("searches", {})
    if not searches:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.get_cmap("tab10")
    for i, (m, s) in enumerate(searches.items()):
        curve = [(x, y) for x, y in s["best_against_epochs"] if y is not None]
        if not curve:
            continue
        xs, ys = zip(*curve)
        ax.step(xs, [100 * y for y in ys], where="post", color=colours(i % 10), lw=2, label=short(m, 28))
        ax.plot(xs[-1], 100 * ys[-1], "o", color=colours(i % 10))
    ax.set_xlabel("epochs trained by the search so far (pruned trials count what they trained)")
    ax.set_ylabel("best held-out top-1 (%) of full trials")
    trials = {s["trials"] for s in searches.values()}
    ax.set_title(f"{result['study']}: accuracy against tuning budget\n"
                 f"{'/'.join(map(str, sorted(trials)))} trials per method; selected on held-out data only")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out, "tuning_budget")


def plot_all(design: Design, result: dict, epochs: pd.DataFrame | None, out: Path, level: float = 0.95
             ) -> list[Path]:
    from .plots import interaction_plot, main_effects_plot, shares_plot

    paths = main_effects_plot(design, out, level)
    paths += interaction_plot(design, out, level)
    paths += shares_plot(result, out)
    paths += bump_chart(result, out)
    paths += learning_curves(design, epochs, out)
    paths += cost_plot(design, out, level)
    paths += tuning_plot(result, out)
    return paths
