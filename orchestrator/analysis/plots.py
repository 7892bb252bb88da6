"""Ablation plots (matplotlib, PNG and PDF)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .summary import METRIC, factor_columns  # noqa: E402


def main_effects_plot(frame: pd.DataFrame, factors: list[str], out: Path, title: str,
                      metric: str = METRIC) -> list[Path]:
    """One panel per factor: mean accuracy per level with +-1 std over cells."""
    cols = factor_columns(frame, factors)
    if not cols or frame.empty:
        return []
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols) + 0.6, 3.6), squeeze=False, sharey=True)
    for ax, f in zip(axes[0], cols):
        stats = frame.groupby(f, sort=True)[metric].agg(["mean", "std", "count"])
        labels = [str(v) for v in stats.index]
        ax.errorbar(range(len(labels)), 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), fmt="o-",
                    capsize=4, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=20 if max(map(len, labels)) > 8 else 0)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(f)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("final top-1 accuracy (%)\nmean ± std over cells")
    fig.suptitle(title)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "main_effects.png", out / "main_effects.pdf"]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths
