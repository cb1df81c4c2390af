"""The report's seaborn figures. Each function takes collected runs and returns a Figure.

Colours are fixed per variant (the same in every figure and every report), so a reader learns
them once.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to PNG, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from suite.analyze.summary import (  # noqa: E402
    capped_loss,
    kaplan_meier,
    lr_sensitivity,
    max_stable_lr,
    ok_runs,
    with_escape_known,
)
from suite.analyze.transfer import optimal_lrs, power_law_exponent  # noqa: E402
from suite.verdict import CONVERGED, DIVERGED, STALLED  # noqa: E402

# Built-ins first, in the order of the literature; anything else after, alphabetically.
KNOWN_ORDER = [
    "postln",
    "preln",
    "rmsnorm",
    "rezero",
    "deepnorm",
    "sandwich",
    "peri-ln",
    "respost",
    "layerscale",
    "dyt",
    "admin",
    "derf",
    "lns",
    "mixln",
    "hybridnorm",
    "hc",
    "mhc",
    "ngpt",
    "attnres",
]
_COLOURS = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)

sns.set_theme(style="whitegrid", context="notebook")


def variant_order(names) -> list[str]:
    names = set(names)
    return [n for n in KNOWN_ORDER if n in names] + sorted(names - set(KNOWN_ORDER))


def palette(names) -> dict[str, tuple]:
    """Colour per variant: fixed for known variants, stable (sorted) for the rest."""
    extras = sorted(set(names) - set(KNOWN_ORDER))
    slots = {name: i for i, name in enumerate(KNOWN_ORDER + extras)}
    return {name: _COLOURS[slots[name] % len(_COLOURS)] for name in names}


def legend_outside(ax: plt.Axes) -> None:
    """The axes' legend to its right (two columns past twelve entries): with a dozen variants or
    more, a legend inside the axes hides the lines it names."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    title = ax.get_legend().get_title().get_text() if ax.get_legend() is not None else ""
    ax.legend(
        handles,
        labels,
        title=title or None,
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        ncol=2 if len(labels) > 12 else 1,
    )


def _lr_label(lr: float) -> str:
    return f"{lr:g}"


def verdict_heatmaps(runs: pd.DataFrame) -> Figure:
    """Depth × LR per variant; colour = fraction of seeds converged; text = converged/seeds,
    one letter per failed seed (S stalled, D diverged) and one * per borderline seed."""
    finished = ok_runs(runs)
    names = variant_order(finished["variant"])
    lrs = sorted(finished["lr"].unique())
    depths = sorted(finished["depth"].unique(), reverse=True)
    columns = min(len(names), 3)
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(1.1 * len(lrs) * columns + 1.5, 0.75 * len(depths) * rows + 1.2),
        squeeze=False,
        constrained_layout=True,
    )
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        subset = finished[finished["variant"] == name]
        grouped = subset.groupby(["depth", "lr"])
        fraction = grouped["verdict"].apply(lambda v: (v == CONVERGED).mean()).unstack()
        fraction = fraction.reindex(index=depths, columns=lrs)
        text = (
            grouped[["verdict", "borderline"]]
            .apply(
                lambda cell: (
                    f"{(cell['verdict'] == CONVERGED).sum()}/{len(cell)}"
                    + "*" * int(cell["borderline"].eq(True).sum())
                    + "\n"
                    + "S" * int((cell["verdict"] == STALLED).sum())
                    + "D" * int((cell["verdict"] == DIVERGED).sum())
                )
            )
            .unstack()
            .reindex(index=depths, columns=lrs)
            .fillna("")
        )
        sns.heatmap(
            fraction,
            ax=ax,
            vmin=0,
            vmax=1,
            cmap="RdYlGn",
            annot=text,
            fmt="",
            cbar=False,
            linewidths=1,
            linecolor="white",
            annot_kws={"fontsize": 8},
        )
        ax.set_title(name, color=palette(names)[name], fontweight="bold")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("depth")
        ax.set_xticklabels([_lr_label(lr) for lr in lrs], rotation=45)
    return fig


def _panels_per_depth(finished: pd.DataFrame, height: float, xlabel: str, ylabel: str):
    """A row of panels, one per depth (shared y axis), and for each the runs at that depth:
    yields (axes, runs at its depth, [(variant, its runs, its colour), ...]). Legend on the last
    panel once the caller has drawn."""
    depths = sorted(finished["depth"].unique())
    names = variant_order(finished["variant"])
    colours = palette(names)
    fig, axes = plt.subplots(
        1,
        len(depths),
        figsize=(4.6 * len(depths), height),
        sharey=True,
        squeeze=False,
        constrained_layout=True,
    )
    axes.flat[0].set_ylabel(ylabel)
    panels = []
    for ax, depth in zip(axes.flat, depths, strict=True):
        at_depth = finished[finished["depth"] == depth]
        ax.set_title(f"depth {depth}")
        ax.set_xlabel(xlabel)
        lines = [(name, at_depth[at_depth["variant"] == name], colours[name]) for name in names]
        panels.append((ax, at_depth, [line for line in lines if not line[1].empty]))
    return fig, panels


def plateau_survival(runs: pd.DataFrame) -> Figure | None:
    """Fraction of runs still on the unigram plateau vs step, one panel per depth, one line per
    variant: a Kaplan–Meier curve, runs that never escaped censored at their budget (dotted
    line). None when no run's escape step is known."""
    finished = with_escape_known(runs)
    if finished.empty:
        return None
    fig, panels = _panels_per_depth(finished, 3.6, "step", "fraction of runs still on the plateau")
    for ax, at_depth, lines in panels:
        for name, subset, colour in lines:
            curve = kaplan_meier(subset["escape_step"], subset["steps"])
            ax.step(
                curve["step"],
                curve["on_plateau"],
                where="post",
                color=colour,
                label=f"{name} ({len(subset)} runs)",
            )
        for budget in sorted(at_depth["steps"].unique()):
            ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(-0.03, 1.03)
    legend_outside(panels[-1][0])
    return fig


def loss_vs_lr(runs: pd.DataFrame) -> Figure:
    """Final validation loss vs LR, one panel per depth, one line per variant (seed mean).
    Diverged runs are capped at the initial loss and drawn as ×; dashed = the validation
    split's unigram entropy."""
    finished = ok_runs(runs)
    finished = finished.assign(
        capped=capped_loss(finished), diverged=finished["verdict"] == DIVERGED
    )
    fig, panels = _panels_per_depth(
        finished, 3.8, "learning rate", "final val loss (nats, capped at init)"
    )
    for ax, at_depth, lines in panels:
        for name, subset, colour in lines:
            mean = subset.groupby("lr")["capped"].mean()
            ax.plot(mean.index, mean.values, marker="o", color=colour, label=name)
            diverged = subset[subset["diverged"]]
            ax.scatter(diverged["lr"], diverged["capped"], marker="x", s=70, color=colour, zorder=3)
        entropy = at_depth["val_unigram_entropy"].mean()
        if np.isfinite(entropy):  # absent from records written before the column existed
            ax.axhline(entropy, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                "unigram entropy",
                (0.02, entropy),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
                color="grey",
            )
        ax.set_xscale("log")
    legend_outside(panels[-1][0])
    return fig


def _lines_vs_depth(
    frame: pd.DataFrame, y: str, ylabel: str, log_y: bool
) -> tuple[Figure, plt.Axes]:
    """One line per variant over depth (log₂ axis, one tick per depth on the grid)."""
    names = variant_order(frame["variant"])
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    sns.lineplot(
        frame,
        x="depth",
        y=y,
        hue="variant",
        hue_order=names,
        palette=palette(names),
        marker="o",
        ax=ax,
    )
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    depths = sorted(frame["depth"].unique())
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_ylabel(ylabel)
    legend_outside(ax)
    return fig, ax


def max_stable_lr_vs_depth(runs: pd.DataFrame) -> Figure | None:
    """None when no variant has a stable LR at any depth (nothing to draw)."""
    stable = max_stable_lr(runs).reset_index()
    if stable["max_stable_lr"].isna().all():
        return None
    fig, _ = _lines_vs_depth(
        stable.dropna(), "max_stable_lr", "max stable LR (all seeds converged)", log_y=True
    )
    return fig


def lr_transfer(runs: pd.DataFrame) -> Figure | None:
    """Optimal and max stable LR vs depth per variant (arm), each with its power-law fit
    (dashed) and exponent s in the legend (suite/analyze/transfer.py); None below two depths."""
    table = optimal_lrs(runs).reset_index()
    if table.groupby("variant")["depth"].nunique().max() < 2:
        return None
    names = variant_order(table["variant"])
    colours = palette(names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, column, title in (
        (axes[0], "optimal_lr", "optimal LR (loss minimum, refined between grid points)"),
        (axes[1], "max_stable_lr", "max stable LR (all seeds converged)"),
    ):
        for name in names:
            arm = table[table["variant"] == name].sort_values("depth").dropna(subset=[column])
            if arm.empty:
                continue
            exponent = power_law_exponent(arm["depth"], arm[column])
            label = name if np.isnan(exponent) else f"{name} (s = {exponent:+.2f})"
            ax.plot(arm["depth"], arm[column], "o-", color=colours[name], label=label)
            if not np.isnan(exponent):
                depths = arm["depth"].astype(float).to_numpy()
                fit = np.exp(np.polyval(np.polyfit(np.log(depths), np.log(arm[column]), 1),
                                        np.log(depths)))  # fmt: skip
                ax.plot(depths, fit, "--", color=colours[name], alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        values = table[column].dropna()
        if len(values) and values.max() / values.min() < 2:
            # A flat line (every depth at one grid LR): without room the log axis zooms into
            # float noise of the fit.
            ax.set_ylim(values.min() / 3, values.max() * 3)
        depths = sorted(table["depth"].unique())
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth N")
        ax.set_title(title, fontsize=10)
        legend_outside(ax)
    return fig


def throughput_vs_depth(runs: pd.DataFrame, benchmarks: pd.DataFrame | None = None) -> Figure:
    """Median tokens/s per (variant, depth) from the sweep; benchmark medians as dashed lines."""
    median = ok_runs(runs).groupby(["variant", "depth"])["tokens_per_s"].median().reset_index()
    fig, ax = _lines_vs_depth(median, "tokens_per_s", "tokens / s (median)", log_y=True)
    if benchmarks is not None and not benchmarks.empty:
        colours = palette(set(median["variant"]) | set(benchmarks["variant"]))
        for name, subset in benchmarks.groupby("variant"):
            subset = subset.sort_values("depth")
            ax.plot(
                subset["depth"],
                subset["tokens_per_s"],
                linestyle="--",
                marker="s",
                color=colours[name],
                alpha=0.7,
                label=f"{name} (benchmark)",
            )
        legend_outside(ax)
    return fig


def lr_sensitivity_vs_depth(runs: pd.DataFrame) -> Figure:
    sensitivity = lr_sensitivity(runs).reset_index()
    fig, _ = _lines_vs_depth(
        sensitivity, "lr_sensitivity", "LR sensitivity (nats; lower is better)", log_y=False
    )
    return fig


def hardest_cell(runs: pd.DataFrame) -> tuple[int, float] | None:
    """The (depth, LR) where the variants disagree most: the most distinct majority verdicts,
    ties broken by more failures, then greater depth, then greater LR."""
    finished = ok_runs(runs)
    if finished.empty:
        return None
    majority = finished.groupby(["depth", "lr", "variant"])["verdict"].agg(
        lambda v: v.value_counts().index[0]
    )
    scores = majority.groupby(level=["depth", "lr"]).agg(
        lambda v: (v.nunique(), (v != CONVERGED).sum())
    )
    ranked = sorted(scores.items(), key=lambda item: (*item[1], *item[0]), reverse=True)
    return ranked[0][0]


def lines_per_run(
    curves: pd.DataFrame, y: str, ax: plt.Axes, names: list[str], **style: object
) -> None:
    """``y`` vs step, one thin line per run (column ``run``), coloured by variant."""
    sns.lineplot(
        curves,
        x="step",
        y=y,
        hue="variant",
        hue_order=names,
        palette=palette(names),
        units="run",
        estimator=None,
        linewidth=1,
        ax=ax,
        **style,
    )


def training_curves(
    curves: pd.DataFrame, depth: int, lr: float, entropy: float, initial_loss: float
) -> Figure:
    """Loss vs step of every variant (one line per run) at one (depth, LR); the y axis stops
    just above the initial loss, so a divergence shows as a line leaving the top."""
    names = variant_order(curves["variant"])
    # Per-batch losses are noisy at this batch size; a 10-step rolling mean shows the trend.
    curves = curves.sort_values(["variant", "run", "step"])
    curves = curves.assign(
        loss=curves.groupby("run")["loss"].transform(lambda v: v.rolling(10, min_periods=1).mean())
    )
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    lines_per_run(curves, "loss", ax, names, alpha=0.8)
    legend_outside(ax)
    ax.axhline(entropy, color="grey", linestyle="--", linewidth=1)
    finite = curves["loss"][np.isfinite(curves["loss"])]
    if not finite.empty:
        ax.set_ylim(max(0.0, finite.min() - 0.2), initial_loss + 0.5)
    ax.set_title(f"training loss at depth {depth}, LR {lr:g}")
    ax.set_ylabel("training loss (nats, 10-step mean)")
    return fig


def rank_intervals(tables: list[pd.DataFrame]) -> Figure | None:
    """The leaderboard's ranks with their 95 % intervals over seeds: one panel per preset and
    depth, one row per arm (best stability first), one marker per ranked column."""
    panels = [(t["sweep"].iloc[0], depth, at) for t in tables for depth, at in t.groupby("depth")]
    if not panels:
        return None
    ranks = {"stability": "o", "sensitivity": "s", "loss": "D", "cost": "^"}
    heights = [0.9 + 0.32 * len(at) for _, _, at in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    colours = sns.color_palette("colorblind", len(ranks))
    for ax, (preset, depth, at) in zip(axes[:, 0], panels, strict=True):
        rows = np.arange(len(at))
        for offset, (rank, marker), colour in zip(
            np.linspace(-0.24, 0.24, len(ranks)), ranks.items(), colours, strict=True
        ):
            ax.errorbar(
                at[f"{rank}_rank"],
                rows + offset,
                xerr=[at[f"{rank}_rank"] - at[f"{rank}_lo"], at[f"{rank}_hi"] - at[f"{rank}_rank"]],
                fmt=marker,
                color=colour,
                markersize=5,
                capsize=2,
                label=rank,
            )
        ax.set_yticks(rows, at["arm"])
        ax.invert_yaxis()
        ax.set_xlim(0.5, len(at) + 0.5)
        ax.set_xticks(range(1, len(at) + 1))
        ax.set_title(f"{preset}, depth {depth}", fontsize=10)
    axes[-1, 0].set_xlabel("rank (1 = best), 95% interval over seed resamples")
    legend_outside(axes[0, 0])
    fig.tight_layout()
    return fig
