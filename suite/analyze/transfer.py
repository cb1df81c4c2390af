"""Does the learning rate transfer across depth? The test depth-μP and CompleteP are judged by.

Yang et al. (2023, "Tensor Programs VI", arXiv 2310.02244) and Dey et al. (2025, "Don't be lazy:
CompleteP enables compute-efficient deep transformers", arXiv 2505.01618, Fig. 1) draw the loss
against the learning rate at several depths: under a parametrization that transfers, the optimum
stays put as depth grows. Here that is one number per arm (variant × optimizer ×
parametrization, as suite/analyze/summary.py labels them): the exponent s of a power-law fit

    LR*(N) ∝ N^s      least squares of log LR* on log N over the depths swept

for the optimal LR and for the max stable LR (the largest LR where every seed converged). s near
0: the LR transfers; s = −½ or −1: it must shrink as 1/√N or 1/N.

The optimal LR at one depth is the minimum of the seed-mean validation loss over the LR grid
(a diverged run counts as its initial loss, as in the LR sensitivity), refined between grid
points: a parabola in log LR through the best point and its two neighbours, its vertex kept
within them. At an edge of the grid the grid point is taken and flagged, since the true
optimum may lie beyond it. A depth where no LR got below its initial loss has no optimum and is
left out of the fit.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from suite.analyze.summary import CELL, capped_loss, max_stable_lr, ok_runs


def refined_optimum(losses: pd.Series, initial_loss: float = math.inf) -> tuple[float, bool]:
    """(optimal LR, at the grid's edge) from one depth's seed-mean losses indexed by LR; NaN
    when no LR has a loss below ``initial_loss`` (nothing trained: there is no optimum)."""
    losses = losses.dropna().sort_index()
    if losses.empty or not (losses < initial_loss).any():
        return math.nan, False
    best = int(np.argmin(losses.to_numpy()))
    if best in (0, len(losses) - 1):
        return float(losses.index[best]), True
    x = np.log10(losses.index[best - 1 : best + 2].to_numpy(dtype=float))
    y = losses.iloc[best - 1 : best + 2].to_numpy(dtype=float)
    curvature, slope, _ = np.polyfit(x, y, 2)
    vertex = -slope / (2 * curvature) if curvature > 0 else x[1]
    return float(10 ** np.clip(vertex, x[0], x[2])), False


def optimal_lrs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth): ``optimal_lr`` (refined), ``at_grid_edge``, ``max_stable_lr``."""
    finished = ok_runs(runs)
    per_lr = finished.assign(loss=capped_loss(finished)).groupby([*CELL, "lr"])["loss"].mean()
    initial = finished.groupby(CELL)["initial_loss"].min()
    rows = {
        cell: refined_optimum(losses.droplevel(CELL), initial.get(cell, math.inf))
        for cell, losses in per_lr.groupby(level=CELL)
    }
    index = pd.MultiIndex.from_tuples(list(rows), names=CELL)
    table = pd.DataFrame(list(rows.values()), index=index, columns=["optimal_lr", "at_grid_edge"])
    return table.join(max_stable_lr(finished))


def power_law_exponent(depths: pd.Series, lrs: pd.Series) -> float:
    """s of LR ∝ N^s, least squares in log–log; NaN with fewer than two depths."""
    known = pd.DataFrame({"depth": depths, "lr": lrs}).dropna()
    if known["depth"].nunique() < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(known["depth"].astype(float)), np.log(known["lr"]), 1)
    return float(slope)


def transfer_exponents(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant (arm): the depths swept and the exponents s of the optimal and of the max
    stable LR against depth."""
    optimal = optimal_lrs(runs).reset_index()
    rows = {}
    for name, arm in optimal.groupby("variant"):
        rows[name] = {
            "depths": ", ".join(str(int(d)) for d in sorted(arm["depth"])),
            "optimal_lr_exponent": power_law_exponent(arm["depth"], arm["optimal_lr"]),
            "max_stable_lr_exponent": power_law_exponent(arm["depth"], arm["max_stable_lr"]),
            "optimum_at_grid_edge": int(arm["at_grid_edge"].sum()),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("variant")
