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


SUMMARY_COLUMNS = [
    "runs",
    "converged_%",
    "stalled_%",
    "diverged_%",
    "errors",
    "max_stable_lr",
    "lr_sensitivity",
    "best_val_loss",
    "best_lr",
    "median_tokens_per_s",
    "tokens_per_s_vs_preln",
]
CONSOLE_COLUMNS = [c for c in SUMMARY_COLUMNS if c not in ("best_lr", "tokens_per_s_vs_preln")]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): runs, verdict percentages, errors, max stable LR, LR sensitivity,
    best val loss and its LR, median tokens/s and its ratio to Pre-LN at the same depth."""
    if runs.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    finished = ok_runs(runs)
    grouped = finished.groupby(CELL)
    cells = pd.MultiIndex.from_frame(runs[CELL].drop_duplicates())
    parts = [
        grouped.size().rename("runs"),
        grouped["verdict"].apply(lambda v: 100 * (v == CONVERGED).mean()).rename("converged_%"),
        grouped["verdict"].apply(lambda v: 100 * (v == STALLED).mean()).rename("stalled_%"),
        grouped["verdict"].apply(lambda v: 100 * (v == DIVERGED).mean()).rename("diverged_%"),
        runs[runs["status"] == "error"].groupby(CELL).size().rename("errors"),
        max_stable_lr(runs),
        lr_sensitivity(runs),
        best_val(runs),
        grouped["tokens_per_s"].median().rename("median_tokens_per_s"),
        throughput_vs_preln(runs),
    ]
    table = pd.concat([part.reindex(cells) for part in parts], axis=1)
    table["errors"] = table["errors"].fillna(0).astype(int)
    table["runs"] = table["runs"].fillna(0).astype(int)
    return table.reindex(columns=SUMMARY_COLUMNS).sort_index()


def _fmt(fmt: str, missing: str = ""):
    return lambda v: missing if pd.isna(v) else format(v, fmt)


def format_summary(table: pd.DataFrame) -> str:
    """The console rendering of :func:`summarize`."""
    if table.empty:
        return "(no runs)"
    shown = table[CONSOLE_COLUMNS].copy()
    for column in ("converged_%", "stalled_%", "diverged_%"):
        shown[column] = shown[column].map(_fmt(".0f"))
    shown["max_stable_lr"] = shown["max_stable_lr"].map(_fmt("g", "none"))
    shown["lr_sensitivity"] = shown["lr_sensitivity"].map(_fmt(".3f"))
    shown["best_val_loss"] = shown["best_val_loss"].map(_fmt(".3f"))
    shown["median_tokens_per_s"] = shown["median_tokens_per_s"].map(_fmt(",.0f"))
    return shown.rename(columns={"median_tokens_per_s": "tokens/s"}).to_string()


def capped_loss(runs: pd.DataFrame) -> pd.Series:
    """Per run: min(val loss, initial loss), with diverged/missing losses counted as the initial
    loss, as in Wortsman et al. (2023)'s LR-sensitivity definition."""
    loss = runs["val_loss"].astype(float)
    initial = runs["initial_loss"].astype(float)
    return loss.where(loss.notna() & (loss < initial), initial)


def lr_sensitivity(runs: pd.DataFrame) -> pd.Series:
    """Per (variant, depth): E_η[min(ℓ(η), ℓ0) − ℓ*] over the LR grid (Wortsman et al. 2023).

    ℓ(η) is the seed-mean of the capped final validation loss at LR η, ℓ0 the loss at init and
    ℓ* the best ℓ(η) on the grid. 0 means every LR is as good as the best one.
    """
    finished = ok_runs(runs)
    per_lr = finished.assign(capped=capped_loss(finished)).groupby([*CELL, "lr"])["capped"].mean()
    best = per_lr.groupby(level=CELL).transform("min")
    return (per_lr - best).groupby(level=CELL).mean().rename("lr_sensitivity")


def best_val(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): the best seed-mean validation loss and the LR that gave it."""
    finished = ok_runs(runs)
    per_lr = finished.groupby([*CELL, "lr"])["val_loss"].mean().dropna().reset_index()
    if per_lr.empty:
        empty = pd.MultiIndex.from_tuples([], names=CELL)
        return pd.DataFrame(columns=["best_val_loss", "best_lr"], index=empty, dtype=float)
    best = per_lr.loc[per_lr.groupby(CELL)["val_loss"].idxmin()]
    return best.set_index(CELL).rename(columns={"val_loss": "best_val_loss", "lr": "best_lr"})


def throughput_vs_preln(runs: pd.DataFrame, baseline: str = "preln") -> pd.Series:
    """Per (variant, depth): median tokens/s divided by the baseline variant's at the same depth."""
    median = ok_runs(runs).groupby(CELL)["tokens_per_s"].median()
    if baseline not in median.index.get_level_values("variant"):
        return pd.Series(np.nan, index=median.index, name="tokens_per_s_vs_preln")
    reference = median.xs(baseline, level="variant")
    depths = median.index.get_level_values("depth")
    ratio = median.to_numpy() / reference.reindex(depths).to_numpy()
    return pd.Series(ratio, index=median.index, name="tokens_per_s_vs_preln")


def per_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth, LR): seeds, divergence rate, mean ± std of the final training loss
    over the seeds that did not diverge."""
    finished = ok_runs(runs)
    diverged = finished["verdict"] == DIVERGED
    grouped = finished.assign(diverged=diverged).groupby([*CELL, "lr"])
    kept = finished[~diverged].groupby([*CELL, "lr"])["final_loss"]
    table = pd.DataFrame(
        {
            "seeds": grouped.size(),
            "converged": grouped["verdict"].apply(lambda v: (v == CONVERGED).mean()),
            "divergence_rate": grouped["diverged"].mean(),
            "final_loss_mean": kept.mean(),
            "final_loss_std": kept.std(ddof=0),
        }
    )
    return table.sort_index()


DIAGNOSTICS_COLUMNS = [
    "init_grad_norm_ratio",
    "max_attn_logit",
    "loss_spikes",
    "grad_spikes",
    "diagnostics_%",
]


def diagnostics_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): median last/first-layer FFN gradient-norm ratio at init, the largest
    attention logit seen, loss and gradient spikes summed over runs, and the median share of
    wall time the diagnostics took (empty when no run recorded diagnostics)."""
    finished = ok_runs(runs)
    if "init_grad_norm_ratio" not in finished or finished["init_grad_norm_ratio"].isna().all():
        return pd.DataFrame(columns=DIAGNOSTICS_COLUMNS)
    finished = finished.dropna(subset=["init_grad_norm_ratio"])
    grouped = finished.assign(
        share=100 * finished["diagnostics_s"] / finished["wall_time_s"]
    ).groupby(CELL)
    return pd.DataFrame(
        {
            "init_grad_norm_ratio": grouped["init_grad_norm_ratio"].median(),
            "max_attn_logit": grouped["max_attn_logit"].max(),
            "loss_spikes": grouped["loss_spikes"].sum().astype(int),
            "grad_spikes": grouped["grad_spikes"].sum().astype(int),
            "diagnostics_%": grouped["share"].median(),
        }
    ).sort_index()
