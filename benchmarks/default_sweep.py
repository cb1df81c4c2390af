"""Cells per hour of the default sweep on this CPU, three ways to the same answer.

    python -m benchmarks.default_sweep [--variant preln] [--arms grid,compiled,frontier] [k=v ...]

Each arm runs as a user types it, into a fresh store, timed from launch to exit (worker start-up,
collect and summary included, as a user waits for them):

- ``grid``: ``python -m suite +variant=V`` (the quick preset: 20 cells, eager, one
  single-threaded worker per core);
- ``compiled``: the same with ``train.compile=true``, its on-disk compile cache empty (a fresh
  ``TORCHINDUCTOR_CACHE_DIR``), as a user's first compiled sweep of these shapes runs: an upper
  bound on what later sweeps pay (docs/performance.md, "Compile in a sweep");
- ``compiled-warm``: the same again after ``compiled``, its cache now filled: what a user's later
  compiled sweeps of these shapes pay (it must follow ``compiled`` in ``--arms``);
- ``frontier``: ``python -m suite.frontier +variant=V``, the bisection in log LR that finds each
  depth's max stable LR without the whole grid.

Prints one markdown table (cells trained, wall time, cells per hour, each depth's max stable LR
as the summary defines it, and whether the grid positions (depth, LR, seed) two arms both
trained got the same verdict) with the machine named. Overrides after the options go to every
arm (``sweep=tiny`` checks the script in a minute). Run it on an idle machine; it takes about 20
minutes for Pre-LN on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from suite.analyze.summary import max_stable_lr, ok_runs, with_arm_labels
from suite.store import read_runs

REPO = Path(__file__).resolve().parent.parent
ARMS = ("grid", "compiled", "compiled-warm", "frontier")
CACHE = {"compiled": ", empty compile cache", "compiled-warm": ", warm compile cache"}
DEFAULT_ARMS = ("grid", "compiled", "frontier")


def arm_command(arm: str, variant: str, overrides: list[str], store: Path) -> list[str]:
    module = "suite.frontier" if arm == "frontier" else "suite"
    compiled = ["train.compile=true"] if arm.startswith("compiled") else []
    return [sys.executable, "-m", module, f"+variant={variant}", *compiled, *overrides,
            f"store={store}"]  # fmt: skip


def run_arm(arm: str, variant: str, overrides: list[str], scratch: Path) -> tuple[dict, pd.Series]:
    """The arm's row of the table and its collected cells."""
    store = scratch / arm
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if arm.startswith("compiled"):  # compiled-warm finds what compiled left
        env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor-cache")
    command = arm_command(arm, variant, overrides, store)
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[1:])} failed:\n{result.stderr[-3000:]}")
    runs = read_runs(store)
    stable = max_stable_lr(with_arm_labels(ok_runs(runs)))
    row = {
        "arm": arm,
        "command": " ".join(["python", *command[1:-1]]),
        "cells": len(runs),
        "seconds": seconds,
        "cells_per_hour": len(runs) / seconds * 3600,
        "max_stable_lr": {int(depth): lr for (_, depth), lr in stable.items()},
        "device_name": str(runs["device_name"].iloc[0]),
    }
    # By grid position, not cell id: a compiled cell is a cell of its own (another id).
    return row, runs.set_index(["depth", "lr", "seed"])["verdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="preln")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"of {', '.join(ARMS)}")
    args, overrides = parser.parse_known_args()
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    if "compiled-warm" in arms and "compiled" not in arms[: arms.index("compiled-warm")]:
        parser.error("--arms: compiled-warm measures the cache compiled fills: list compiled first")
    scratch = Path(tempfile.mkdtemp(prefix="default_sweep_"))
    try:
        rows, verdicts = [], {}
        for arm in arms:
            row, verdicts[arm] = run_arm(arm, args.variant, overrides, scratch)
            rows.append(row)
            print(f"{arm}: {row['cells']} cells in {row['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    first = arms[0]
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("sweep=")), "quick")
    print(f"\n{args.variant}, {preset} preset; {rows[0]['device_name']}, {os.cpu_count()} cores")
    print("| arm | cells | wall | cells/hour | max stable LR by depth | same verdicts as "
          f"{first} |")  # fmt: skip
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        shared = verdicts[first].index.intersection(verdicts[row["arm"]].index)
        same = int((verdicts[first][shared] == verdicts[row["arm"]][shared]).sum())
        lrs = ", ".join(f"L{d}: {lr:g}" for d, lr in sorted(row["max_stable_lr"].items()))
        print(f"| `{row['command']}`{CACHE.get(row['arm'], '')} | {row['cells']} | "
              f"{row['seconds'] / 60:.1f} min | "
              f"{row['cells_per_hour']:.0f} | {lrs} | {same} of {len(shared)} |")  # fmt: skip


if __name__ == "__main__":
    main()
