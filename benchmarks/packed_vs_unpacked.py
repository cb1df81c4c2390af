"""Packed LR sweeps (``train.pack_lr=true``) against the default sweep, in cells per hour.

    python -m benchmarks.packed_vs_unpacked                  # the quick preset, Pre-LN
    python -m benchmarks.packed_vs_unpacked --cells-only     # only the one-process comparison
    python -m benchmarks.packed_vs_unpacked +variant=postln train.steps=100

Two measurements, on an idle machine:

1. One process, one thread (what each worker of the default CPU sweep runs): the K learning
   rates of one cell of the sweep trained as one packed run (suite.run.packed) against the same K
   cells trained one after another, alternating rounds, diagnostics off in both. This is the
   packing itself, without the launcher.
2. The whole sweep as a user runs it, ``python -m suite <overrides>`` with and without
   ``train.pack_lr=true``, each into a fresh store, timed from launch to exit: cells per hour and
   whether every cell got the same verdict.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from suite.config import CellConfig
from suite.launch.preflight import sweep_cells
from suite.run.packed import train_packed
from suite.run.runner import build_model, corpus_for
from suite.run.train import train


def one_process(cells: list[CellConfig], rounds: int) -> dict[str, float]:
    """Median seconds to train ``cells`` packed and one after another, in alternating rounds."""
    cells = [replace(c, diagnostics=replace(c.diagnostics, enabled=False)) for c in cells]
    torch.set_num_threads(cells[0].train.threads or torch.get_num_threads())
    corpus = corpus_for(cells[0].data)
    device = torch.device("cpu")

    def fresh_model():
        torch.manual_seed(cells[0].seed)
        return build_model(cells[0], corpus.vocab_size)

    def packed() -> None:
        train_packed(fresh_model(), corpus, cells, device, lambda member, outcome: None)

    def one_by_one() -> None:
        for cell in cells:
            train(fresh_model(), corpus, cell, device)

    torch.set_flush_denormal(True)  # as every cell of a sweep runs (suite.run.runner)
    seconds: dict[str, list[float]] = {"packed": [], "one by one": []}
    for _ in range(rounds):
        for name, run in (("packed", packed), ("one by one", one_by_one)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    torch.set_flush_denormal(False)
    return {name: statistics.median(values) for name, values in seconds.items()}


def whole_sweep(overrides: list[str], store: Path) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "suite", *overrides, f"store={store}"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"sweep failed:\n{result.stderr[-3000:]}")
    return seconds, pd.read_parquet(store / "runs.parquet").set_index("cell_id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells-only", action="store_true", help="skip the whole-sweep timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="sweep overrides (default +variant=preln)")
    args = parser.parse_args()
    overrides = args.overrides or ["+variant=preln"]
    cells = [cell for _, cell in sweep_cells(overrides)]
    deepest = max(cell.model.depth for cell in cells)
    lrs = list(dict.fromkeys(cell.optim.lr for cell in cells))
    pack = [
        c
        for c in cells
        if c.model.depth == deepest and c.seed == cells[0].seed and c.variant == cells[0].variant
    ]
    print(
        f"one process, {pack[0].train.threads or torch.get_num_threads()} thread(s): "
        f"{pack[0].variant} depth {deepest}, width {pack[0].model.width}, "
        f"{len(pack)} learning rates {', '.join(f'{lr:g}' for lr in lrs)}, "
        f"{pack[0].train.steps} steps"
    )
    seconds = one_process(pack, args.rounds)
    per_hour = {name: 3600 * len(pack) / s for name, s in seconds.items()}
    print(
        f"  packed {seconds['packed']:.1f} s ({per_hour['packed']:.0f} cells/h), one by one "
        f"{seconds['one by one']:.1f} s ({per_hour['one by one']:.0f} cells/h): "
        f"packing speed-up {seconds['one by one'] / seconds['packed']:.2f}×"
    )
    if args.cells_only:
        return
    with tempfile.TemporaryDirectory() as folder:
        unpacked_s, unpacked = whole_sweep(overrides, Path(folder) / "unpacked")
        packed_s, packed = whole_sweep([*overrides, "train.pack_lr=true"], Path(folder) / "packed")
    same = (packed["verdict"] == unpacked.loc[packed.index, "verdict"]).sum()
    print(
        f"whole sweep, {len(unpacked)} cells: default {unpacked_s:.0f} s "
        f"({3600 * len(unpacked) / unpacked_s:.0f} cells/h), packed {packed_s:.0f} s "
        f"({3600 * len(packed) / packed_s:.0f} cells/h): speed-up {unpacked_s / packed_s:.2f}×; "
        f"same verdict in {same}/{len(unpacked)} cells"
    )


if __name__ == "__main__":
    main()
