"""The report's diagnostics figures (what suite/run/diagnostics.py recorded), same colours as
suite/analyze/figures.py. Each returns a Figure, or None when the runs hold nothing to draw."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from suite.analyze.figures import legend_outside, lines_per_run, palette, variant_order
from suite.analyze.summary import ok_runs

MAX_DEPTH_PANELS = 4


def _by_layer(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per (run, layer) from a per-layer list column; layer counts from 1."""
    rows = ok_runs(runs).dropna(subset=[column])
    frame = rows[["variant", "depth", "seed", column]].explode(column)
    frame = frame.assign(layer=frame.groupby(level=0).cumcount() + 1)
    return frame.astype({column: float}).reset_index(drop=True)


def init_grad_norms(runs: pd.DataFrame) -> Figure | None:
    """FFN gradient norm vs layer at init, one panel per depth (the deepest few), one line per
    variant (mean over seeds; the band spans them). Xiong et al. 2020, Fig. 3."""
    if "init_grad_norm_by_layer" not in runs:
        return None
    frame = _by_layer(runs, "init_grad_norm_by_layer")
    if frame.empty:
        return None
    # Init does not depend on the LR: one entry per (variant, depth, seed, layer).
    frame = frame.groupby(["variant", "depth", "seed", "layer"], as_index=False).first()
    depths = sorted(frame["depth"].unique())[-MAX_DEPTH_PANELS:]
    names = variant_order(frame["variant"])
    fig, axes = plt.subplots(
        1,
        len(depths),
        figsize=(3.6 * len(depths) + 1, 3.6),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for ax, depth in zip(axes.flat, depths, strict=True):
        sns.lineplot(
            frame[frame["depth"] == depth],
            x="layer",
            y="init_grad_norm_by_layer",
            hue="variant",
            hue_order=names,
            palette=palette(names),
            errorbar=("pi", 100),
            ax=ax,
            legend=ax is axes.flat[-1],
        )
        ax.set_yscale("log")
        ax.set_title(f"depth {depth}")
        ax.set_xlabel("layer (1 = next to the embedding)")
    axes.flat[0].set_ylabel("‖∇ FFN weights‖ at init")
    legend_outside(axes.flat[-1])
    return fig


def model_update(curves: pd.DataFrame, runs: pd.DataFrame, lr: float) -> Figure | None:
    """Left: the model update vs step at the chosen cell; right: the model update after the
    early steps vs depth at the same LR (median over seeds). DeepNet (Wang et al. 2022), Fig. 3."""
    if "model_update" not in curves or "early_model_update" not in runs:
        return None
    sampled = curves.dropna(subset=["model_update"])
    at_lr = ok_runs(runs)
    at_lr = at_lr[(at_lr["lr"] == lr)].dropna(subset=["early_model_update"])
    if sampled.empty or at_lr.empty:
        return None
    names = variant_order(set(sampled["variant"]) | set(at_lr["variant"]))
    colours = palette(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    lines_per_run(sampled, "model_update", left, names, marker=".")
    legend_outside(left)
    left.set_ylabel("‖F(x; θ_t) − F(x; θ_0)‖ (RMS over tokens)")
    left.set_title("model update vs step")
    median = at_lr.groupby(["variant", "depth"], as_index=False)["early_model_update"].median()
    sns.lineplot(
        median,
        x="depth",
        y="early_model_update",
        hue="variant",
        hue_order=names,
        palette=colours,
        marker="o",
        ax=right,
        legend=False,
    )
    right.set_xscale("log", base=2)
    depths = sorted(median["depth"].unique())
    right.set_xticks(depths, [str(d) for d in depths])
    right.set_ylabel("model update after diagnostics.early_steps")
    right.set_title(f"early model update vs depth, LR {lr:g}")
    return fig


def attention_logits(curves: pd.DataFrame) -> Figure | None:
    """Max attention logit (over layers) vs step at the chosen cell, log scale. Wortsman et al.
    2023 saw logits past ~1e4 before divergence."""
    if "attn_logit_max" not in curves:
        return None
    sampled = curves.dropna(subset=["attn_logit_max"])
    if sampled.empty:
        return None
    names = variant_order(sampled["variant"])
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    lines_per_run(sampled, "attn_logit_max", ax, names, marker=".")
    legend_outside(ax)
    ax.set_yscale("log")
    ax.set_ylabel("max |q·k| / √d_head over layers")
    return fig


# The per-layer series drawn as layer × step heatmaps, and how each is scaled.
HEATMAP_SERIES = {
    "grad_norm_by_layer": ("log₁₀ gradient norm", True),
    "update_ratio_by_layer": ("log₁₀ update / weight", True),
    "act_rms_by_layer": ("log₁₀ stream RMS", True),
    "saturation_by_layer": ("share past the knee", False),
}
MAX_HEATMAP_ROWS = 8


def layer_heatmaps(curves: pd.DataFrame) -> Figure | None:
    """Per variant at the chosen cell (its lowest seed), each per-layer series as a heatmap of
    block × sampled step: where in depth and when gradients vanish, updates jump, the stream
    grows or DyT/Derf saturate."""
    series = [name for name in HEATMAP_SERIES if name in curves and curves[name].notna().any()]
    if not series:
        return None
    names = variant_order(curves["variant"])[:MAX_HEATMAP_ROWS]
    fig, axes = plt.subplots(
        len(names),
        len(series),
        figsize=(3.4 * len(series) + 0.6, 2.4 * len(names) + 0.4),
        squeeze=False,
        constrained_layout=True,
    )
    for row, variant in zip(axes, names, strict=True):
        runs = curves[curves["variant"] == variant]
        run = runs[runs["seed"] == runs["seed"].min()]
        for ax, name in zip(row, series, strict=True):
            label, log_scale = HEATMAP_SERIES[name]
            sampled = run.dropna(subset=[name]) if name in run else run.iloc[0:0]
            ax.set_title(f"{variant}: {label}", fontsize=9)
            if sampled.empty:
                ax.set_axis_off()
                continue
            try:
                matrix = pd.DataFrame(
                    [list(values) for values in sampled[name]], index=sampled["step"].astype(int)
                ).T.astype(float)
            except (TypeError, ValueError):  # a damaged column (not lists of numbers)
                ax.set_axis_off()
                continue
            matrix.index = range(1, len(matrix) + 1)
            if log_scale:
                matrix = np.log10(matrix.where(matrix > 0))
            if matrix.empty or matrix.isna().all().all():
                ax.set_axis_off()
                continue
            sns.heatmap(
                matrix,
                ax=ax,
                cmap="viridis",
                cbar=True,
                xticklabels=max(1, len(matrix.columns) // 6),
            )
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
            ax.set_xlabel("step")
            ax.set_ylabel("block")
    return fig
