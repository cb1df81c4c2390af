"""The leaderboard: every arm of a store ranked per depth, with rank intervals over seeds.

    python -m suite.leaderboard [--store results] [--reference] [--markdown FILE] [--csv FILE]

Per depth, every arm (variant, backbone, recipe, ... as the summary labels it) is ranked on four
columns of the summary: max stable LR (higher is better), LR sensitivity (lower), best seed-mean
validation loss (lower) and cost, the median tokens/s (higher; it depends on the machine and on
how many cells ran beside each other, so it ranks arms measured together). An arm with no value
ranks below every arm with one; an arm with no stable LR gets no LR sensitivity (it is equally
bad at every LR, which the metric would score as insensitive). Equal values share the better
rank, shown as ``2=``. Each rank has a 95 % interval from the seed bootstrap the summary's
intervals use (seeds drawn with replacement, the same draw for every arm, so the arms stay
matched): the ranks an arm takes over the resamples, 2.5th to 97.5th percentile. With two
seeds there are only three distinct draws, so the intervals show which ranks are fragile rather
than a precise range. Rows are ordered by the stability rank, then LR sensitivity's. Arms at a
depth are only comparable when they ran the same preset: a store mixing presets gets one
leaderboard per preset.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from suite.analyze.baseline import BaselineError, with_reference
from suite.analyze.summary import (
    CELL,
    best_val,
    lr_sensitivity,
    max_stable_lr,
    ok_runs,
    seed_resamples,
    with_arm_labels,
)
from suite.store import column, read_runs

RESAMPLES = 400
# Each ranked column: how it is computed from runs (per (arm, depth)) and whether higher is better.
RANKED = {
    "max_stable_lr": (max_stable_lr, True),
    "lr_sensitivity": (lr_sensitivity, False),
    "best_val_loss": (lambda runs: best_val(runs)["best_val_loss"], False),
    "tokens_per_s": (lambda runs: ok_runs(runs).groupby(CELL)["tokens_per_s"].median(), True),
}
RANK_OF = {
    "max_stable_lr": "stability",
    "lr_sensitivity": "sensitivity",
    "best_val_loss": "loss",
    "tokens_per_s": "cost",
}


def _values(runs: pd.DataFrame) -> pd.DataFrame:
    values = pd.concat({name: compute(runs) for name, (compute, _) in RANKED.items()}, axis=1)
    # An arm that trains at no LR is equally bad at all of them: near-zero sensitivity, unranked.
    values.loc[values["max_stable_lr"].isna(), "lr_sensitivity"] = np.nan
    return values


def _ranks(values: pd.DataFrame, index: pd.MultiIndex) -> pd.DataFrame:
    """Per depth, each column's rank (1 = best; ties share the better rank; missing last)."""
    values = values.reindex(index)
    ranks = {}
    for name, (_, higher) in RANKED.items():
        column = values[name].astype(float)
        ranks[name] = column.groupby(level="depth").rank(
            method="min", ascending=not higher, na_option="bottom"
        )
    return pd.DataFrame(ranks)


def one_machine_cost(finished: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs with tokens/s kept only where measured on the CPU (or GPU) most of them were
    measured on, and a note naming the arms left out: tokens/s of two machines rank the
    machines, not the arms (the shipped reference holds arms trained on more than one)."""
    measured = finished[finished["tokens_per_s"].notna()]
    devices = column(measured, "device_name").dropna().astype(str)
    if devices.nunique() < 2:
        return finished, ""
    main = devices.value_counts().index[0]
    elsewhere = column(finished, "device_name").astype(str) != main
    arms = sorted(set(finished.loc[elsewhere & finished["tokens_per_s"].notna(), "variant"]))
    note = (f"tokens/s of {', '.join(arms)} left out of the cost rank: measured on another "
            f"machine than the rest ({main})")  # fmt: skip
    return finished.assign(tokens_per_s=finished["tokens_per_s"].where(~elsewhere)), note


def leaderboard(runs: pd.DataFrame, resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per (depth, arm): each ranked value, its rank, its 95 % rank interval, and
    whether it ties another arm (``*_tied``); ``attrs["notes"]`` says what was left out."""
    finished, note = one_machine_cost(ok_runs(with_arm_labels(runs)))
    if finished.empty:
        return pd.DataFrame()
    index = pd.MultiIndex.from_frame(finished[CELL].drop_duplicates()).sort_values()
    values = _values(finished).reindex(index)
    ranks = _ranks(values, index)
    resampled = seed_resamples(finished, lambda r: _ranks(_values(r), index), resamples, seed)
    stacked = np.stack([ranked.to_numpy() for ranked in resampled])  # resample × row × column
    table = values.copy()
    for position, name in enumerate(RANKED):
        rank = RANK_OF[name]
        table[f"{rank}_rank"] = ranks[name].astype(int)
        table[f"{rank}_tied"] = (
            ranks[name]
            .groupby(level="depth")
            .transform(lambda column: column.duplicated(keep=False))
        )
        samples = stacked[:, :, position]
        table[f"{rank}_lo"] = np.quantile(samples, 0.025, axis=0, method="inverted_cdf").astype(int)
        table[f"{rank}_hi"] = np.quantile(samples, 0.975, axis=0, method="higher").astype(int)
    table = table.reset_index().rename(columns={"variant": "arm"})
    table = table.sort_values(["depth", "stability_rank", "sensitivity_rank", "arm"]).reset_index(
        drop=True
    )
    table.attrs["notes"] = [note] if note else []
    return table


def _rank_text(row: pd.Series, rank: str) -> str:
    shown = f"{row[f'{rank}_rank']}{'=' if row[f'{rank}_tied'] else ''}"
    lo, hi = row[f"{rank}_lo"], row[f"{rank}_hi"]
    return shown if lo == hi == row[f"{rank}_rank"] else f"{shown} ({lo}–{hi})"


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as people read it: values formatted, each rank with its interval."""

    def value(x: float, fmt: str) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    shown = pd.DataFrame(
        {
            "depth": table["depth"],
            "arm": table["arm"],
            "max stable LR": [value(x, "g") for x in table["max_stable_lr"]],
            "stability rank": [_rank_text(row, "stability") for _, row in table.iterrows()],
            "LR sensitivity": [value(x, ".3f") for x in table["lr_sensitivity"]],
            "sensitivity rank": [_rank_text(row, "sensitivity") for _, row in table.iterrows()],
            "best val loss": [value(x, ".3f") for x in table["best_val_loss"]],
            "loss rank": [_rank_text(row, "loss") for _, row in table.iterrows()],
            "tokens/s": [value(x, ",.0f") for x in table["tokens_per_s"]],
            # Unmeasured here (a reference arm from another machine) is unknown, not slowest.
            "cost rank": [
                "–" if pd.isna(row["tokens_per_s"]) else _rank_text(row, "cost")
                for _, row in table.iterrows()
            ],
        }
    )
    return shown


def markdown(frame: pd.DataFrame) -> str:
    header = [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def leaderboards(runs: pd.DataFrame) -> list[pd.DataFrame]:
    """One leaderboard per sweep preset of the runs (arms of different presets never ranked
    together), each with a ``sweep`` column."""
    presets = sorted(set(runs["sweep"].dropna())) if "sweep" in runs else []
    tables = []
    for preset in presets or [None]:
        table = leaderboard(runs if preset is None else runs[runs["sweep"] == preset])
        if not table.empty:
            tables.append(table.assign(sweep=preset or "all runs"))
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m suite.leaderboard", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--store", default="results", help="results store (default: results)")
    parser.add_argument("--sweep", help="only runs of this sweep preset (e.g. quick)")
    parser.add_argument(
        "--backbone", help="only arms of this backbone (gpt2, llama); default: all, ranked together"
    )
    parser.add_argument(
        "--reference",
        nargs="?",
        const="reference",
        metavar="STORE",
        help="rank the shipped reference's arms the store lacks beside its own",
    )
    parser.add_argument("--markdown", help="also write the tables as Markdown to this file")
    parser.add_argument("--csv", help="also write the tables, every column, as CSV to this file")
    args = parser.parse_args(argv)
    try:

        def selected(runs: pd.DataFrame) -> pd.DataFrame:
            runs = runs[runs["sweep"] == args.sweep] if args.sweep else runs
            if args.backbone:  # a store from before backbones trained gpt2's
                runs = runs[column(runs, "backbone", "gpt2") == args.backbone]
            return runs

        runs = selected(read_runs(args.store))
        if args.reference:
            runs, note = with_reference(runs, args.reference, selected)
            print(f"baseline arms: {note}")
    except (FileNotFoundError, BaselineError) as error:
        print(f"leaderboard: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    tables = leaderboards(runs)
    if not tables:
        print(f"leaderboard: no finished runs in {args.store}", file=sys.stderr)
        raise SystemExit(2)
    for table in tables:
        preset = table["sweep"].iloc[0]
        print(f"\nLeaderboard ({preset}; ranks per depth, 95% rank intervals over seeds):")
        print(display(table).to_string(index=False))
        for note in table.attrs.get("notes", []):
            print(f"note: {note}")
    if args.csv:
        pd.concat(tables, ignore_index=True).to_csv(args.csv, index=False)
        print(f"-> {args.csv}")
    if args.markdown:
        text = "".join(
            f"## {t['sweep'].iloc[0]}\n\n" + markdown(display(t)) + "\n"
            + "".join(f"{note}\n\n" for note in t.attrs.get("notes", []))
            for t in tables
        )  # fmt: skip
        Path(args.markdown).write_text(text)
        print(f"-> {args.markdown}")
