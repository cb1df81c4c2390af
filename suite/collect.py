"""Collect: every record in the store → one pandas DataFrame (saved as Parquet) → summary.

Runs as a Hydra callback at the end of every sweep and as a command:

    python -m suite.collect [--store results] [--sweep quick]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from suite.store import RECORD_COLUMNS, RUNS, read_records, write_table
from suite.summary import format_summary, summarize

log = logging.getLogger(__name__)

CELL_POINTER = "cell_id"  # written into each Hydra job's output folder
SKIPPED_MARKER = "skipped"  # ... beside it when the cell was already in the store


def collect(store: str | Path, write: bool = True) -> pd.DataFrame:
    """All records under ``store`` as one DataFrame; also written to ``<store>/runs.parquet``."""
    records = read_records(store)
    for record in records:
        record["config"] = json.dumps(record.get("config"), sort_keys=True)
    runs = pd.DataFrame.from_records(records)
    extra = [c for c in runs.columns if c not in RECORD_COLUMNS]
    runs = runs.reindex(columns=[*RECORD_COLUMNS, *extra])
    if not runs.empty:
        runs = runs.sort_values(["variant", "depth", "lr", "seed"], kind="stable")
        runs = runs.reset_index(drop=True)
    if write and not runs.empty:
        write_table(runs, Path(store) / RUNS)
    return runs


_UNFINISHED = (
    ("error", "errored (traceback in their record.json)"),
    ("interrupted", "interrupted (re-run the same command to finish them)"),
    ("running", "still running"),
)


def report_text(runs: pd.DataFrame) -> str:
    lines = [format_summary(summarize(runs))]
    for status, what in _UNFINISHED:
        cells = runs.loc[runs["status"] == status, "cell_id"] if not runs.empty else []
        if len(cells):
            lines.append(f"\n{len(cells)} cell(s) {what}:")
            lines.extend(f"  {cell_id}" for cell_id in cells)
    return "\n".join(lines)


def sweep_cell_ids(sweep_dir: str | Path) -> set[str]:
    """The cells of one sweep: one id per Hydra job, or one per line for a packed job."""
    pointers = Path(sweep_dir).glob(f"*/{CELL_POINTER}")
    return {cell_id for p in pointers for cell_id in p.read_text().split()}


def count_skipped(sweep_dir: str | Path) -> int:
    """Cells skipped because the store had them (a packed job's marker holds its count)."""
    markers = Path(sweep_dir).glob(f"*/{SKIPPED_MARKER}")
    return sum(int(p.read_text().strip() or 1) for p in markers)


class CollectCallback(Callback):
    """At the end of a multirun: collect the whole store, print this sweep's summary."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        store = config.store
        runs = collect(store)
        if runs.empty:
            return
        this_sweep = runs[runs["cell_id"].isin(sweep_cell_ids(config.hydra.sweep.dir))]
        skipped = count_skipped(config.hydra.sweep.dir)
        reused = f", {skipped} already in the store (resume=false re-runs them)" if skipped else ""
        print(
            f"\nSummary of this sweep ({len(this_sweep)} cells{reused}; "
            f"all runs: {Path(store) / RUNS}):"
        )
        print(report_text(this_sweep))
        if (this_sweep["status"] != "ok").any():
            raise SystemExit(1)  # the records are kept; the exit code tells scripts to look


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results", help="results store (default: results)")
    parser.add_argument("--sweep", help="only runs of this sweep preset (e.g. quick)")
    args = parser.parse_args(argv)
    runs = collect(args.store)
    if runs.empty:
        raise SystemExit(f"no records under {args.store}/cells")
    if args.sweep:
        runs = runs[runs["sweep"] == args.sweep]
    print(f"{len(runs)} runs collected into {Path(args.store) / RUNS}")
    print(report_text(runs))


if __name__ == "__main__":
    main()
