"""Summaries of collected runs (definitions in DESIGN.md's Metrics section).

All functions take the DataFrame that :func:`suite.collect.collect` returns and are pure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from suite.verdict import CONVERGED, DIVERGED, STALLED

CELL = ["variant", "depth"]


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that finished (any verdict); errored cells are reported separately."""
    return runs[runs["status"] == "ok"]


def max_stable_lr(runs: pd.DataFrame) -> pd.Series:
    """Per (variant, depth): the largest LR at which every seed converged (NaN if none did)."""
    finished = ok_runs(runs)
    stable = (
        finished.assign(stable=finished["verdict"] == CONVERGED)
        .groupby([*CELL, "lr"])["stable"]
        .all()
        .reset_index()
    )
    stable["stable_lr"] = stable["lr"].where(stable["stable"])
    return stable.groupby(CELL)["stable_lr"].max().rename("max_stable_lr")


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): runs, verdict percentages, errors, max stable LR, best val loss,
    median tokens/s."""
    if runs.empty:
        return pd.DataFrame()
    finished = ok_runs(runs)
    grouped = finished.groupby(CELL)
    table = pd.DataFrame(
        {
            "runs": grouped.size(),
            "converged_%": grouped["verdict"].apply(lambda v: 100 * (v == CONVERGED).mean()),
            "stalled_%": grouped["verdict"].apply(lambda v: 100 * (v == STALLED).mean()),
            "diverged_%": grouped["verdict"].apply(lambda v: 100 * (v == DIVERGED).mean()),
            "best_val_loss": grouped["val_loss"].min(),
            "median_tokens_per_s": grouped["tokens_per_s"].median(),
        }
    )
    table = table.join(max_stable_lr(runs), how="left")
    errors = runs[runs["status"] != "ok"].groupby(CELL).size().rename("errors")
    table = table.join(errors, how="outer")
    table["errors"] = table["errors"].fillna(0).astype(int)
    table["runs"] = table["runs"].fillna(0).astype(int)
    columns = [
        "runs",
        "converged_%",
        "stalled_%",
        "diverged_%",
        "errors",
        "max_stable_lr",
        "best_val_loss",
        "median_tokens_per_s",
    ]
    return table[columns].sort_index()


def format_summary(table: pd.DataFrame) -> str:
    """The console rendering of :func:`summarize`."""
    if table.empty:
        return "(no runs)"
    shown = table.copy()
    for column in ("converged_%", "stalled_%", "diverged_%"):
        shown[column] = shown[column].map(lambda v: "" if np.isnan(v) else f"{v:.0f}")
    shown["max_stable_lr"] = shown["max_stable_lr"].map(
        lambda v: "none" if np.isnan(v) else f"{v:g}"
    )
    shown["best_val_loss"] = shown["best_val_loss"].map(lambda v: "" if np.isnan(v) else f"{v:.3f}")
    shown["median_tokens_per_s"] = shown["median_tokens_per_s"].map(
        lambda v: "" if np.isnan(v) else f"{v:,.0f}"
    )
    return shown.rename(columns={"median_tokens_per_s": "tokens/s"}).to_string()
