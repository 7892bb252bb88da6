"""Ablation plots (matplotlib, Agg; each written as PNG and PDF): main effects
and interactions with Student-t intervals over seeds, variance-share bars with
intervals for the population shares. The rank bump chart, learning curves and
accuracy-vs-cost plots are in curves.py."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .design import Design, grouped_means  # noqa: E402

GROUP_COLOURS = {"method": "tab:blue", "protocol": "tab:orange", "budget": "tab:green",
                 "method_x_protocol": "tab:purple", "budget_x": "tab:cyan", "other": "tab:olive",
                 "residual": "tab:gray"}
GROUP_LABELS = {"method": "method", "protocol": "protocol", "budget": "budget (IPC, labels)",
                "method_x_protocol": "method × protocol", "budget_x": "budget × method/protocol",
                "other": "other factors", "residual": "residual"}
ACC_LABEL = "final top-1 accuracy (%)"

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "figure.dpi": 100, "savefig.bbox": "tight"})


def save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def short(text: str, width: int = 24) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def set_level_ticks(ax, labels: list[str]) -> None:
    shown = [short(v, 18) for v in labels]
    rotate = len(labels) > 4 or max(map(len, shown), default=0) > 9
    ax.set_xticks(range(len(labels)), shown, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.5, len(labels) - 0.5)


def errbar(ax, xs, stats, **kwargs):
    means = np.array([s[0] for s in stats]) * 100
    lo = np.array([s[1] for s in stats]) * 100
    hi = np.array([s[2] for s in stats]) * 100
    yerr = np.vstack([np.nan_to_num(means - lo), np.nan_to_num(hi - means)])
    kwargs.setdefault("marker", "o")
    return ax.errorbar(xs, means, yerr=yerr, capsize=4, **kwargs)


def main_effects_plot(design: Design, out: Path, level: float = 0.95) -> list[Path]:
    """One panel per factor: mean final top-1 per level (over every analysed cell
    at that level) with its t interval over seeds."""
    factors = design.factors
    if not factors or design.frame.empty:
        return []
    cols = min(len(factors), 4)
    rows = -(-len(factors) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, 3.3 * rows + 0.6), squeeze=False, sharey=True)
    for ax, f in zip(axes.flat, factors):
        stats = grouped_means(design.frame, [f], level)
        labels = [lv for lv in design.levels[f] if (lv,) in stats]
        errbar(ax, range(len(labels)), [stats[(lv,)] for lv in labels], color="tab:blue", lw=1.5)
        set_level_ticks(ax, labels)
        ax.set_xlabel(f)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(factors):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ACC_LABEL)
    fig.suptitle(f"{design.study}: main effects on final top-1 (methods proper)\n(mean over cells, "
                 f"{100 * level:.0f}% t interval over seeds)")
    fig.tight_layout()
    return save(fig, out, "main_effects")


def interaction_plot(design: Design, out: Path, level: float = 0.95) -> list[Path]:
    """Method x factor: one line per method over the levels of each other factor.
    Without a method factor: the first factor's lines over each other factor."""
    factors = design.factors
    if len(factors) < 2:
        return []
    lines = design.method or factors[0]
    others = [f for f in factors if f != lines]
    cols = min(len(others), 3)
    rows = -(-len(others) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols + 1.8, 3.4 * rows + 0.7), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    handles = []
    for ax, f in zip(axes.flat, others):
        stats = grouped_means(design.frame, [lines, f], level)
        xlabels = design.levels[f]
        for i, m in enumerate(design.levels[lines]):
            present = [(x, stats[(m, lv)]) for x, lv in enumerate(xlabels) if (m, lv) in stats]
            if not present:
                continue
            offset = (i - (len(design.levels[lines]) - 1) / 2) * 0.06  # keep overlapping error bars apart
            h = errbar(ax, [x + offset for x, _ in present], [s for _, s in present], color=colours(i % 10),
                       lw=1.5, label=short(m, 30))
            if ax is axes.flat[0]:
                handles.append(h)
        set_level_ticks(ax, xlabels)
        ax.set_xlabel(f)
        ax.set_title(f"{lines} × {f}")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(others):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ACC_LABEL)
    fig.legend(handles=handles, title=lines, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"{design.study}: interactions (non-parallel lines = interaction; "
                 f"{100 * level:.0f}% t intervals over seeds)")
    fig.tight_layout()
    return save(fig, out, "interactions")


def shares_plot(result: dict, out: Path) -> list[Path]:
    """Left: the grouped shares of variance; right: eta^2 per ANOVA term; both
    with intervals for the population shares."""
    att = result.get("attribution")
    if not att or "absent" in att:
        return []
    shares, ci = result["shares"], att["shares_ci"]
    terms = sorted(att["terms"], key=lambda t: -(t["eta2"] or 0))[:14]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, max(3.2, 0.42 * max(len(terms) + 1, len(shares)) + 1.4)),
                                      gridspec_kw={"width_ratios": [1, 1.5]})
    keys = list(shares)
    empty = set(att.get("empty_groups", []))
    _hbars(left, [att["residual_name"] if k == "residual" else GROUP_LABELS[k] for k in keys],
           [shares[k] for k in keys], [ci[k] for k in keys], [GROUP_COLOURS[k] for k in keys],
           ["no factor" if k in empty else None for k in keys])
    left.set_title("share of variance by group")
    names = [t["term"] for t in terms] + [f"residual: {att['residual_name']}"]
    values = [t["eta2"] for t in terms] + [att["residual"]["share"]]
    cis = [t["eta2_ci"] for t in terms] + [att["residual"]["share_ci"]]
    colours = [GROUP_COLOURS[t["group"]] for t in terms] + [GROUP_COLOURS["residual"]]
    _hbars(right, [term_label(n) for n in names], values, cis, colours)
    right.set_title("η² per ANOVA term" + (f" (largest {len(terms)})" if len(att["terms"]) > len(terms) else ""))
    level = f"{100 * result['inference']['level']:.0f}%"
    kind = "II" if att["anova_type"] == 2 else "III"
    fig.suptitle(f"{result['study']}: where the accuracy differences come from\n(Type {kind} ANOVA on final top-1; "
                 f"bars = share of total sum of squares, whiskers = {level} interval for the population share)")
    fig.tight_layout()
    return save(fig, out, "variance_shares")


def term_label(term: str, width: int = 46) -> str:
    """'a x protocol.b' as 'a × protocol.b'; long ones drop the 'protocol.' prefixes."""
    text = term.replace(" x ", " × ")
    if len(text) > width:
        text = " × ".join(f.removeprefix("protocol.") for f in term.split(" x "))
    return short(text, width)


def _hbars(ax, labels, values, cis, colours, texts=None) -> None:
    ys = np.arange(len(labels))[::-1]
    vals = np.array([v or 0.0 for v in values]) * 100
    lo = np.array([c[0] if c and c[0] is not None else v for c, v in zip(cis, values)], dtype=float) * 100
    hi = np.array([c[1] if c and c[1] is not None else v for c, v in zip(cis, values)], dtype=float) * 100
    ax.barh(ys, vals, height=0.65, color=colours, alpha=0.85)
    ax.errorbar(vals, ys, xerr=np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)]),
                fmt="none", ecolor="black", capsize=3, lw=1)
    for y, v, h, text in zip(ys, vals, hi, texts or [None] * len(vals)):
        ax.text(min(max(v, h if np.isfinite(h) else v), 100) + 1.5, y, text or f"{v:.1f}%", va="center", fontsize=8)
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, 105)
    ax.set_xlabel("% of total sum of squares")
    ax.grid(axis="x", alpha=0.3)
