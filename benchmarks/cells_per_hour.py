"""Cells per hour on this machine's GPUs: 1, 2 and 4 cells per GPU (``hydra/launcher=gpus``)
and packed learning rates, on the standard preset's shapes.

    python -m benchmarks.cells_per_hour [--depth 6] [--steps 300] [--lrs 8] [--per-gpu 1,2,4]

Each arm trains the same cells (Pre-LN at the standard preset's width 256, sequence 256, batch
32, bf16, at ``--depth``, ``--lrs`` learning rates of the preset's grid, ``--steps`` steps) into a
fresh store through the real CLI, timed from the command's start to its end (so worker start-up
counts, as it does for a user), and reports cells/hour and the median tokens/s of a cell. The
packed arm trains the same cells as one packed run (``train.pack_lr=true``: every learning rate
in one job, on one GPU). Prints a markdown table with the device named.
Needs at least one GPU; ``--fake-gpus 0,1`` runs the same commands on CPU (only to check the
script; the numbers are the CPU's and are labelled so).
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

REPO = Path(__file__).resolve().parent.parent
STANDARD_LRS = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"]


def run_arm(args: argparse.Namespace, extra: list[str], env: dict[str, str]) -> dict:
    store = Path(tempfile.mkdtemp(prefix="cells_per_hour_"))
    command = [
        sys.executable,
        "-m",
        "suite",
        "+variant=preln",
        "sweep=standard",
        f"model.depth={args.depth}",
        f"train.steps={args.steps}",
        f"optim.lr={','.join(STANDARD_LRS[: args.lrs])}",
        "optim.warmup_fraction=0.05",
        "seed=0",
        f"store={store}",
        *extra,
    ]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if result.returncode not in (0, 1):  # 1: some cell errored or diverged badly; still timed
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    runs = pd.read_parquet(store / "runs.parquet")
    shutil.rmtree(store, ignore_errors=True)
    return {
        "cells": len(runs),
        "seconds": seconds,
        "cells_per_hour": len(runs) / seconds * 3600,
        "median_tokens_per_s": float(runs["tokens_per_s"].median()),
        "device_name": str(runs["device_name"].iloc[0]),
        "gpus": runs["pinned_gpu"].nunique() if "pinned_gpu" in runs else 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=int, default=8, help="learning rates (of the standard 8)")
    parser.add_argument("--per-gpu", default="1,2,4", help="cells per GPU to compare")
    parser.add_argument("--fake-gpus", help="e.g. 0,1: check the script on a machine without")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.fake_gpus is not None:  # and slots of its own, apart from any real sweep's
        env["SUITE_FAKE_GPUS"] = args.fake_gpus
        env["SUITE_SLOT_DIR"] = tempfile.mkdtemp(prefix="cells_per_hour_slots_")
    rows = []
    for per_gpu in [int(k) for k in args.per_gpu.split(",")]:
        arm = run_arm(args, ["hydra/launcher=gpus", f"train.cells_per_gpu={per_gpu}"], env)
        rows.append({"arm": f"{per_gpu} cell(s) per GPU", **arm})
    packed = run_arm(args, ["hydra/launcher=basic", "train.pack_lr=true"], env)
    rows.append({"arm": f"packed ({args.lrs} LRs in one job, one GPU)", **packed})
    table = pd.DataFrame(rows)
    print(
        f"Pre-LN, depth {args.depth}, width 256, seq 256, batch 32, bf16, {args.steps} steps, "
        f"{args.lrs} LRs; device: {table['device_name'].iloc[0]}"
        + (" (FAKED GPUs: CPU numbers)" if args.fake_gpus is not None else "")
    )
    print("| arm | cells | GPUs used | seconds | cells/hour | median tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['arm']} | {row['cells']} | {row['gpus']} | {row['seconds']:.0f} | "
            f"{row['cells_per_hour']:.0f} | {row['median_tokens_per_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()
