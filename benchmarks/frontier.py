"""The frontier search against the full grid: the same max stable LR, with how many cells?

    python -m benchmarks.frontier --store results            # a store holding full grids

For every arm (variant, backbone, recipe, ... as the summary labels it) and depth whose full LR ×
seed grid is in the store, it replays ``python -m suite.frontier``'s bisection
(suite/launch/frontier.py) on the stored verdicts, one cell at a time as the search asks for
them, and prints beside each other the grid's max stable LR (the summary's definition: the
largest LR at which every seed converged), the search's, and the cells each needed. Nothing is
trained: the search's order of cells is deterministic given the verdicts, so the replay's cell
count is the one a frontier run would train (without the later seeds it may start beside a probe
when workers are idle). Verdicts are the collected table's (``<store>/runs.parquet``).
"""

from __future__ import annotations

import argparse

import pandas as pd

from suite.analyze.summary import CELL, max_stable_lr, ok_runs, with_arm_labels
from suite.launch.frontier import Bracket, search
from suite.store import read_runs


def replay(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, depth) with a full grid: the grid's and the search's answers."""
    runs = with_arm_labels(ok_runs(runs))
    grid_answer = max_stable_lr(runs)
    rows = []
    # One grid per arm, depth, preset and budget: grids of other shapes never merge.
    for (variant, depth, _, _), group in runs.groupby([*CELL, "sweep", "steps"]):
        lrs, seeds = sorted(group["lr"].unique()), sorted(group["seed"].unique())
        verdicts = {(row.lr, row.seed): row.verdict for row in group.itertuples()}
        if len(verdicts) != len(lrs) * len(seeds):
            continue  # not a full grid: nothing to compare against
        bracket = Bracket(f"{variant} L{depth}", [float(lr) for lr in lrs], [int(s) for s in seeds])
        search([bracket], lambda b, index, seed, v=verdicts, lrs=lrs: v[lrs[index], seed])
        found = bracket.result()
        grid_lr = grid_answer.get((variant, depth))
        rows.append(
            {
                "arm": variant,
                "depth": depth,
                "grid_max_stable_lr": None if pd.isna(grid_lr) else float(grid_lr),
                "frontier_max_stable_lr": found["max_stable_lr"],
                "frontier_first_failing_lr": found["first_failing_lr"],
                "grid_steps_apart": _steps_apart(lrs, grid_lr, found["max_stable_lr"]),
                "grid_cells": found["grid_cells"],
                "frontier_cells": found["cells"],
            }
        )
    return pd.DataFrame(rows)


def _steps_apart(lrs: list[float], grid_lr: float | None, found: float | None) -> int:
    """How many grid LRs apart the two answers are (None, no stable LR, counts as below all)."""

    def position(lr: float | None) -> int:
        return -1 if lr is None or pd.isna(lr) else lrs.index(lr)

    return abs(position(grid_lr) - position(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--store", default="results", help="a store, or `reference`: the shipped one"
    )
    args = parser.parse_args()
    table = replay(read_runs(args.store))
    if table.empty:
        raise SystemExit(f"{args.store}: no arm with a full LR × seed grid")
    same = int((table["grid_steps_apart"] == 0).sum())
    cells, grid = int(table["frontier_cells"].sum()), int(table["grid_cells"].sum())
    print(table.to_string(index=False))
    print(
        f"\nsame max stable LR as the grid: {same} of {len(table)} brackets; "
        f"cells: {cells} of {grid} ({cells / grid:.0%})"
    )


if __name__ == "__main__":
    main()
