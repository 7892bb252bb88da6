"""Mean and standard deviation over seeds, per factor combination and per
factor level (main effects)."""
from __future__ import annotations

import pandas as pd

METRIC = "top1"  # final-epoch test accuracy: the reported number


def factor_columns(frame: pd.DataFrame, factors: list[str]) -> list[str]:
    return [f for f in factors if f in frame.columns]


def combination_table(frame: pd.DataFrame, factors: list[str], metric: str = METRIC) -> pd.DataFrame:
    cols = factor_columns(frame, factors)
    if not cols:
        grouped = frame[metric].agg(["mean", "std", "count"]).to_frame().T
        return grouped.rename(columns={"count": "seeds"}).reset_index(drop=True)
    table = frame.groupby(cols, dropna=False)[metric].agg(["mean", "std", "count"]).reset_index()
    return table.rename(columns={"count": "seeds"})


def main_effects(frame: pd.DataFrame, factors: list[str], metric: str = METRIC) -> pd.DataFrame:
    rows = []
    for f in factor_columns(frame, factors):
        for level, group in frame.groupby(f, dropna=False, sort=True):
            rows.append({"factor": f, "level": level, "mean": group[metric].mean(), "std": group[metric].std(),
                         "cells": len(group)})
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in ("mean", "std"):
        if col in shown:
            shown[col] = shown[col].map(lambda v: "nan" if pd.isna(v) else f"{100 * v:.2f}")
    return shown.to_string(index=False)
