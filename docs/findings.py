"""The numbers and figures of docs/findings.md, from the store the paper presets wrote to.

    python -m suite +variant=postln,preln sweep=warmup store=results/findings
    python -m suite +variant=postln,preln,deepnorm sweep=depth store=results/findings
    python -m suite +variant=preln sweep=lr store=results/findings
    python -m suite +variant=postln,preln,deepnorm,rmsnorm sweep=init store=results/findings
    python -m suite +variant=preln,rmsnorm,dyt,derf sweep=optimizer store=results/findings
    python -m suite +variant=preln,rmsnorm sweep=transfer store=results/findings
    python docs/findings.py --store results/findings --figures docs/findings

Prints one markdown table per preset and writes one PNG per preset; docs/findings.md quotes
them with the claim each tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from suite.analyze import diagnostics_figures, figures
from suite.analyze.collect import collect
from suite.analyze.summary import (
    best_val,
    capped_loss,
    lr_sensitivity,
    max_stable_lr,
    ok_runs,
    with_arm_labels,
)
from suite.analyze.transfer import optimal_lrs, transfer_exponents
from suite.store import read_curve
from suite.verdict import CONVERGED


def markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table of a frame, its index as the leading columns."""
    flat = table.reset_index()
    rows = [[str(c) for c in flat.columns]] + [[str(v) for v in row] for row in flat.to_numpy()]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(flat.columns))
    return "\n".join(lines)


def _panel_per_lr(runs: pd.DataFrame, x: str, y: str, sharey: bool) -> tuple[Figure, Any]:
    """One panel per LR of ``y`` vs ``x``, a line per variant (band: range over seeds)."""
    names = figures.variant_order(runs["variant"])
    lrs = sorted(runs["lr"].unique())
    fig, axes = plt.subplots(
        1, len(lrs), figsize=(4.4 * len(lrs), 3.6), sharey=sharey, squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    for ax, lr in zip(axes.flat, lrs, strict=True):
        sns.lineplot(
            runs[runs["lr"] == lr], x=x, y=y, hue="variant", hue_order=names,
            palette=figures.palette(names), marker="o", errorbar=("pi", 100), ax=ax,
            legend=ax is axes.flat[-1],
        )  # fmt: skip
        ax.set_title(f"LR {lr:g}")
    return fig, axes


def _converged(verdicts: pd.Series) -> str:
    return f"{(verdicts == CONVERGED).sum()}/{len(verdicts)}"


def warmup(runs: pd.DataFrame, store: Path) -> tuple[str, Figure]:
    """Converged seeds and mean val loss per (variant, LR, warmup)."""
    grouped = runs.groupby(["variant", "lr", "warmup_steps"])
    table = pd.DataFrame(
        {"converged": grouped["verdict"].agg(_converged), "val_loss": grouped["val_loss"].mean()}
    )
    shown = table.assign(
        cell=table["converged"] + " (" + table["val_loss"].map("{:.3f}".format) + ")"
    )["cell"].unstack("warmup_steps")
    shown.columns = [f"warmup {w}" for w in shown.columns]
    fig, axes = _panel_per_lr(runs, x="warmup_steps", y="val_loss", sharey=True)
    for ax in axes.flat:
        ax.axhline(runs["val_unigram_entropy"].mean(), color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("warmup steps")
    axes.flat[0].set_ylabel("final val loss (dashed: unigram entropy)")
    return markdown(shown), fig


def first_updates(runs: pd.DataFrame, store: Path, steps: tuple[int, ...]) -> pd.DataFrame:
    """The model update after the given (0-based) steps of each run, read from its curve."""
    rows = []
    for run in runs.itertuples():
        curve = read_curve(store, run.cell_id).set_index("step")["model_update"]
        rows.append(
            {f"update_after_{s + 1}": curve.get(s) for s in steps} | {"cell_id": run.cell_id}
        )
    return runs.merge(pd.DataFrame(rows), on="cell_id")


def depth(runs: pd.DataFrame, store: Path) -> tuple[str, Figure]:
    """Converged seeds and the median model update after 1 and 3 steps per (variant, depth, LR)
    (DeepNet's Fig. 3 looks at the first updates: later ones saturate at these LRs)."""
    runs = first_updates(runs, store, (0, 2))
    grouped = runs.groupby(["variant", "depth", "lr"])
    table = pd.DataFrame(
        {
            "converged": grouped["verdict"].agg(_converged),
            "val_loss": grouped["val_loss"].mean(),
            "update_after_1": grouped["update_after_1"].median(),
            "update_after_3": grouped["update_after_3"].median(),
        }
    )
    fig, axes = _panel_per_lr(runs, x="depth", y="update_after_1", sharey=False)
    depths = sorted(runs["depth"].unique())
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_ylabel("‖F(x;θ₁) − F(x;θ₀)‖ after the first step")
    return markdown(table.round(3)), fig


def lr(runs: pd.DataFrame, store: Path) -> tuple[str, Figure]:
    """Per (qk-norm, LR): converged seeds, val loss, largest attention logit; LR sensitivity."""
    labelled = runs.assign(
        variant=runs["variant"] + runs["qk_norm"].map({True: " + qk-norm", False: ""})
    )
    grouped = labelled.groupby(["variant", "lr"])
    table = pd.DataFrame(
        {
            "converged": grouped["verdict"].agg(_converged),
            "val_loss": grouped["val_loss"].mean(),
            "max_attn_logit": grouped["max_attn_logit"].max(),
        }
    )
    sensitivity = markdown(lr_sensitivity(labelled).round(3).to_frame())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    capped = labelled.assign(loss=capped_loss(labelled))
    for ax, y, label in (
        (left, "loss", "final val loss (capped at init)"),
        (right, "max_attn_logit", "max attention logit"),
    ):
        sns.lineplot(
            capped,
            x="lr",
            y=y,
            hue="variant",
            marker="o",
            errorbar=("pi", 100),
            ax=ax,
            legend=ax is right,
        )
        ax.set_xscale("log")
        ax.set_ylabel(label)
    right.set_yscale("log")
    return markdown(table.round(3)) + "\n\nLR sensitivity:\n\n" + sensitivity, fig


def init(runs: pd.DataFrame, store: Path) -> tuple[str, Figure]:
    """Median last/first-layer FFN gradient-norm ratio at init per (variant, depth)."""
    table = runs.groupby(["variant", "depth"])["init_grad_norm_ratio"].median().unstack("depth")
    return markdown(table.round(3)), diagnostics_figures.init_grad_norms(runs)


def optimizer(runs: pd.DataFrame, store: Path) -> tuple[str, Figure]:
    """Per (variant, depth, optimizer): converged seeds per LR and the best val loss; the gap of
    each norm's best val loss to RMSNorm's under the same optimizer (the paper's measure). A
    variant run at two settings of its own (variant.alpha_init) is two rows."""
    runs = runs.assign(variant=with_arm_labels(runs.drop(columns="optimizer"))["variant"])
    grouped = runs.groupby(["variant", "depth", "optimizer", "lr"])
    cells = (
        grouped["verdict"].agg(_converged)
        + " ("
        + grouped["val_loss"].mean().map("{:.3f}".format)
        + ")"
    )
    table = cells.unstack("lr")
    table.columns = [f"LR {lr:g}" for lr in table.columns]
    best = best_val(runs.assign(variant=runs["variant"] + "|" + runs["optimizer"])).reset_index()
    best[["variant", "optimizer"]] = best["variant"].str.split("|", expand=True)
    best = best.set_index(["variant", "depth", "optimizer"])
    has_reference = "rmsnorm" in best.index.get_level_values("variant")
    reference = (
        best.xs("rmsnorm", level="variant")["best_val_loss"]
        if has_reference
        else pd.Series(dtype=float)
    )
    gap = best["best_val_loss"] - reference.reindex(best.index.droplevel("variant")).to_numpy()
    gaps = pd.DataFrame(
        {"best_val_loss": best["best_val_loss"], "best_lr": best["best_lr"], "gap_to_rmsnorm": gap}
    )
    capped = runs.assign(loss=capped_loss(runs))
    depths = sorted(runs["depth"].unique())
    fig, axes = plt.subplots(
        1, len(depths), figsize=(5.2 * len(depths), 3.8), squeeze=False, constrained_layout=True
    )
    names = figures.variant_order(runs["variant"])
    for ax, depth_ in zip(axes.flat, depths, strict=True):
        sns.lineplot(
            capped[capped["depth"] == depth_], x="lr", y="loss", hue="variant", style="optimizer",
            hue_order=names, palette=figures.palette(names), marker="o", errorbar=("pi", 100),
            ax=ax, legend=ax is axes.flat[-1],
        )  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(f"depth {depth_}")
        ax.set_ylabel("final val loss (capped at init)")
    figures.legend_outside(axes.flat[-1])
    return markdown(table) + "\n\nBest LR per arm:\n\n" + markdown(gaps.round(3)), fig


def transfer(runs: pd.DataFrame, store: Path) -> tuple[str, Figure | None]:
    """Optimal (refined) and max stable LR per (arm, depth), and each arm's exponents s."""
    labelled = with_arm_labels(runs)
    optimal = optimal_lrs(labelled)
    exponents = transfer_exponents(labelled)
    text = markdown(optimal.round(5)) + "\n\nExponents:\n\n" + markdown(exponents.round(2))
    return text, figures.lr_transfer(labelled)


def steps_to_reach(store: Path, runs: pd.DataFrame, target: float, window: int = 10) -> float:
    """Median over ``runs`` of the first step whose ``window``-step mean training loss is at or
    below ``target`` (NaN for a run that never gets there): how fast an arm reaches a loss."""
    steps = []
    for run in runs.itertuples():
        try:
            loss = read_curve(store, run.cell_id)["loss"].astype(float)
        except (OSError, ValueError, KeyError):
            continue
        below = loss.rolling(window).mean() <= target
        steps.append(float(below.idxmax()) if below.any() else float("nan"))
    return float(pd.Series(steps, dtype=float).median()) if steps else float("nan")


REFERENCE_ARM = "rmsnorm · llama"  # LLaMA's own block: pre-norm RMSNorm


def claims(runs: pd.DataFrame, store: Path) -> tuple[str, Figure | None]:
    """Per arm on the llama backbone and depth: converged runs, max stable LR, best val loss
    and its gap to RMSNorm's (LLaMA's own norm) at the same depth, LR sensitivity, median escape
    step, steps to reach RMSNorm's best final training loss (at each arm's best LR; the nGPT
    claim), and the largest Amax gain of a converged run (the mHC claim)."""
    llama = with_arm_labels(runs)
    rows = []
    for (arm, depth_), group in llama.groupby(["variant", "depth"]):
        finished = ok_runs(group)
        best = best_val(group)
        rows.append(
            {
                "arm": arm,
                "depth": depth_,
                "converged": _converged(finished["verdict"]),
                "max_stable_lr": max_stable_lr(group).iloc[0],
                "best_val_loss": best["best_val_loss"].iloc[0],
                "best_lr": best["best_lr"].iloc[0],
                "lr_sensitivity": lr_sensitivity(group).iloc[0],
                "median_escape": finished["escape_step"].median(),
                "amax_gain": finished.loc[
                    finished["verdict"] == CONVERGED, "amax_gain_forward"
                ].max()
                if "amax_gain_forward" in finished
                else float("nan"),
            }
        )
    table = pd.DataFrame(rows).set_index(["arm", "depth"])
    for depth_ in table.index.get_level_values("depth").unique():
        if (REFERENCE_ARM, depth_) not in table.index:
            continue
        reference = table.loc[(REFERENCE_ARM, depth_)]
        at = table.index.get_level_values("depth") == depth_
        table.loc[at, "gap_to_rmsnorm"] = table.loc[at, "best_val_loss"] - reference.best_val_loss
        ref_runs = ok_runs(llama)
        ref_runs = ref_runs[
            (ref_runs["variant"] == REFERENCE_ARM)
            & (ref_runs["depth"] == depth_)
            & (ref_runs["lr"] == reference.best_lr)
        ]
        target = float(ref_runs["final_loss"].mean())
        for arm in table.index[at].get_level_values("arm"):
            row = table.loc[(arm, depth_)]
            chosen = ok_runs(llama)
            chosen = chosen[
                (chosen["variant"] == arm)
                & (chosen["depth"] == depth_)
                & (chosen["lr"] == row.best_lr)
            ]
            table.loc[(arm, depth_), "steps_to_rmsnorm_loss"] = steps_to_reach(
                store, chosen, target
            )
    fig = figures.loss_vs_lr(llama)
    return markdown(table.round(3)), fig


PRESETS: dict[str, Callable[[pd.DataFrame, Path], tuple[str, Figure | None]]] = {
    "warmup": warmup,
    "depth": depth,
    "lr": lr,
    "init": init,
    "optimizer": optimizer,
    "transfer": transfer,
    "claims": claims,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("results/findings"))
    parser.add_argument("--figures", type=Path, default=Path("docs/findings"))
    args = parser.parse_args()
    runs = ok_runs(collect(args.store))
    args.figures.mkdir(parents=True, exist_ok=True)
    for name, make in PRESETS.items():
        if name == "claims":  # every llama run: the claims preset shares the quick one's cells
            subset = runs[runs["backbone"] == "llama"] if "backbone" in runs else runs.iloc[:0]
        else:
            subset = runs[runs["sweep"] == name]
        if subset.empty:
            print(f"## {name}: no runs in {args.store}\n")
            continue
        text, fig = make(subset, args.store)
        if fig is None:  # e.g. one depth only: nothing to draw against depth
            print(f"## {name} ({len(subset)} runs), no figure\n\n{text}\n")
            continue
        path = args.figures / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"## {name} ({len(subset)} runs) -> {path}\n\n{text}\n")


if __name__ == "__main__":
    main()
