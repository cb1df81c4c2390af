"""The default CPU sweep against the naive way to run the same cells, on the same machine.

    python -m benchmarks.sweep_vs_naive                     # the quick preset, Pre-LN
    python -m benchmarks.sweep_vs_naive +variant=postln train.steps=100

Sweep: ``python -m suite <overrides>`` as a user types it (one single-threaded worker process per
core through the joblib launcher, longest cells first, diverged cells stopping at once), timed
from launch to exit. Naive: the same cells, one after another in one process with torch's
default threading, as a hand-written loop would run them. Both write to fresh stores under a
temporary folder; the script prints both wall times, the speed-up and whether every cell got the
same verdict. Run it on an idle machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from suite.launch.preflight import sweep_cells
from suite.run.runner import run_cell
from suite.store import finished_record, write_cell


def naive_loop(overrides: list[str], store: Path) -> float:
    """Seconds to run every cell of the sweep in this process, default threads, in order."""
    cells = [cell for _, cell in sweep_cells(overrides)]
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    for cell in cells:
        cell.train.threads = 0  # torch's default; not part of the cell's identity (hash)
        torch.set_num_threads(default_threads)
        cell.store = str(store)
        record, curve = run_cell(cell)
        write_cell(store, record, curve)
    return time.perf_counter() - start


def sweep(overrides: list[str], store: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "suite", *overrides, f"store={store}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    overrides = sys.argv[1:] or ["+variant=preln"]
    with tempfile.TemporaryDirectory() as tmp:
        sweep_store, naive_store = Path(tmp, "sweep"), Path(tmp, "naive")
        sweep_s = sweep(overrides, sweep_store)
        naive_s = naive_loop(overrides, naive_store)
        cells = [cell.cell_id() for _, cell in sweep_cells(overrides)]
        verdicts = [
            (finished_record(sweep_store, c) or {}).get("verdict")
            == (finished_record(naive_store, c) or {}).get("verdict")
            for c in cells
        ]
    print(f"overrides: {' '.join(overrides)}; {len(cells)} cells, {os.cpu_count()} cores")
    print(
        f"default sweep: {sweep_s:.1f} s; naive loop: {naive_s:.1f} s; "
        f"speed-up {naive_s / sweep_s:.2f}×; same verdict in {sum(verdicts)}/{len(cells)} cells"
    )


if __name__ == "__main__":
    main()
