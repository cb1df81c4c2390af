"""``python -m suite.reference``: the reference results shipped with the suite, made and checked.

    python -m suite.reference run [--backbones gpt2,llama] [--variants a,b] [--store S]
    python -m suite.reference ship [--store S]
    python -m suite.reference calibrate [--variants preln,postln] [--store results/calibration]

``run`` trains every built-in variant on the reference preset (``quick``: depths 6 and 24, five
LRs, two seeds) on each backbone into one store, one ordinary sweep per (variant, backbone), so
an interrupted run goes on where it stopped (resume), then ships it. ``ship`` writes that store's
collected table, cut to the reference grid, to ``reference/<name>/runs.parquet`` with
``environment.json`` (the machine, torch, suite version, the command, wall time per arm, and any
arm not yet complete). The curves are not shipped (4 kB per cell in the table, 40 kB per curve),
so the reference's verdicts are those of the default verdict rule.

``calibrate`` answers "does my machine reproduce the reference?" before a plugin author compares
their runs with it: losses depend on the CPU and its kernels, and a comparison across machines is
only as good as that agreement. It re-trains one cell of each named variant (the smallest depth,
the lowest LR at which every seed converged with no borderline verdict, seed 0: a cell far from
any boundary) into a scratch store, and calls the machine calibrated for that variant when the
verdict is the same and, for a converged run, the validation loss and the step it left the
plateau differ by at most :data:`LOSS_TOLERANCE` and :data:`ESCAPE_TOLERANCE`. Those are about
the difference two seeds of one cell already show in the reference (median 0.04 nats and 17
steps over its converged cells; 75th percentile 0.05 and 30): a machine difference below it is
lost in the seed noise every comparison already carries. A variant outside tolerance is named
with the command that re-trains it as a baseline in the user's own store. The outcome goes to
``<store>/calibration.json``, where ``python -m suite.compare --against reference`` finds it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from suite.config import CellConfig, ConfigError
from suite.launch.preflight import preflight
from suite.plan import utc_now
from suite.store import (
    CALIBRATION,
    CALIBRATION_STORE,
    ENVIRONMENT,
    RUNS,
    finished_record,
    read_environment,
    read_runs,
    reference_dir,
    resolve_store,
    write_table,
)
from suite.verdict import CONVERGED
from variants import registry

PRESET = "quick"
BACKBONES = ("gpt2",)  # what ships today; ``--backbones gpt2,llama`` runs both
DEFAULT_STORE = "results/reference"
CALIBRATED_VARIANTS = ("preln", "postln")  # the baselines almost every comparison names
LOSS_TOLERANCE = 0.05  # nats of validation loss
ESCAPE_TOLERANCE = 30  # steps to leave the unigram plateau
WALL = "reference-wall.json"  # <store>/: wall seconds per (variant, backbone) sweep run here
# Columns that only mean something beside the store's own files.
NOT_SHIPPED = ("curve_file",)


def built_ins() -> list[str]:
    return [n for n in registry.names() if registry.source(registry.get(n)) == registry.BUILT_IN]


def arm_overrides(variant: str, backbone: str, preset: str = PRESET) -> list[str]:
    return [f"+variant={variant}", f"sweep={preset}", f"model.backbone={backbone}"]


def expected_cells(variant: str, backbone: str, preset: str = PRESET) -> list[CellConfig]:
    """The cells of one arm of the reference grid, as the suite composes them today."""
    return [cell for _, cell in preflight(arm_overrides(variant, backbone, preset))]


# --- run -----------------------------------------------------------------------------------


def run(store: str, variants: list[str], backbones: list[str]) -> None:
    """One ordinary sweep per (variant, backbone), skipped cells and all, then ship."""
    wall = _read_wall(store)
    for backbone in backbones:
        for variant in variants:
            command = [sys.executable, "-m", "suite", *arm_overrides(variant, backbone),
                       f"store={store}"]  # fmt: skip
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[2:])}", flush=True)
            began = time.monotonic()
            code = subprocess.call(command)
            if code != 0:
                raise SystemExit(code)
            key = f"{variant} · {backbone}"
            wall[key] = wall.get(key, 0.0) + time.monotonic() - began
            (Path(store) / WALL).write_text(json.dumps(wall, indent=1, sort_keys=True))
    ship(store)


def _read_wall(store: str) -> dict[str, float]:
    try:
        return json.loads((Path(store) / WALL).read_text())
    except (OSError, ValueError):
        return {}


# --- ship ----------------------------------------------------------------------------------


def ship(store: str, name: str = PRESET, out: Path | None = None) -> Path:
    """The store's finished cells of the reference grid → ``reference/<name>/``."""
    runs = read_runs(store)
    ok = runs[runs["status"] == "ok"]
    shipped, missing, seconds = [], {}, {}
    for backbone in sorted(set(ok["backbone"])) or list(BACKBONES):
        for variant in built_ins():
            wanted = {cell.cell_id() for cell in expected_cells(variant, backbone, name)}
            found = ok[ok["cell_id"].isin(wanted)]
            if found.empty:
                continue
            shipped.append(found)
            key = f"{variant} · {backbone}"
            seconds[key] = round(float(found["wall_time_s"].sum()), 1)
            if len(found) < len(wanted):
                missing[key] = sorted(wanted - set(found["cell_id"]))
    if not shipped:
        raise ConfigError(f"{store} holds no finished cell of the {name} reference grid")
    table = pd.concat(shipped, ignore_index=True).drop(columns=list(NOT_SHIPPED), errors="ignore")
    table = table.sort_values(["backbone", "variant", "depth", "lr", "seed"], ignore_index=True)
    folder = out or reference_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(table, folder / RUNS)
    environment = {
        "preset": name,
        "command": "python -m suite.reference run"
        + (
            f" --backbones {','.join(sorted(set(table['backbone'])))}"
            if set(table["backbone"]) != set(BACKBONES)
            else ""
        ),  # fmt: skip
        "shipped_at": utc_now(),
        "cells": len(table),
        "arms": sorted(
            f"{v} · {b}" for v, b in set(zip(table["variant"], table["backbone"], strict=True))
        ),
        "incomplete_arms": missing,
        "backbones": sorted(set(table["backbone"])),
        "depths": sorted(int(d) for d in set(table["depth"])),
        "cell_seconds_by_arm": seconds,
        "wall_seconds_by_arm": {k: round(v, 1) for k, v in _read_wall(store).items()},
        "trained_between": [str(table["started_at"].min()), str(table["started_at"].max())],
        **{
            column: sorted(str(v) for v in set(table[column].dropna()))
            for column in (
                "device_name",
                "cpu_count",
                "threads",
                "parallel_cells",
                "torch_version",
                "python_version",
                "platform",
                "suite_version",
                "git_sha",
            )
        },  # fmt: skip
    }
    (folder / ENVIRONMENT).write_text(json.dumps(environment, indent=1, ensure_ascii=False) + "\n")
    return folder


# --- calibrate -----------------------------------------------------------------------------


def calibration_cell(reference: pd.DataFrame, variant: str, backbone: str) -> pd.Series:
    """The variant's reference cell farthest from any boundary: the smallest depth, the lowest
    LR where every seed converged with no borderline verdict, the lowest seed (with none such:
    its lowest LR, whose verdict alone is compared)."""
    rows = reference[(reference["variant"] == variant) & (reference["backbone"] == backbone)]
    if rows.empty:
        arms = sorted(set(reference["variant"]))
        raise ConfigError(
            f"--variants: the reference has no {variant} on {backbone}; it has: {', '.join(arms)}"
        )
    rows = rows[rows["depth"] == rows["depth"].min()]
    by_lr = rows.groupby("lr")
    steady = [
        lr for lr, cell in by_lr
        if (cell["verdict"] == CONVERGED).all() and not cell["borderline"].fillna(False).any()
    ]  # fmt: skip
    lr = min(steady) if steady else rows["lr"].min()
    cell = rows[rows["lr"] == lr].sort_values("seed")
    return cell.iloc[0]


def compose(row: pd.Series, store: str) -> tuple[list[str], CellConfig]:
    """The one-cell sweep that re-trains a reference row, checked to be that very cell."""
    overrides = [
        *arm_overrides(row["variant"], row["backbone"], row["sweep"]),
        f"model.depth={int(row['depth'])}",
        f"optim.lr={float(row['lr'])!r}",
        f"seed={int(row['seed'])}",
        f"store={store}",
        "hydra/launcher=basic",
    ]
    [(job, cell)] = preflight(overrides)
    if cell.cell_id() != row["cell_id"]:
        raise ConfigError(
            f"{row['cell_id']}: the suite now composes this cell as {cell.cell_id()} (its "
            "settings changed since the reference was made); regenerate the reference "
            "(python -m suite.reference run)"
        )
    return overrides, cell


def _train(overrides: list[str], cell: CellConfig) -> dict[str, Any] | None:
    log = Path(cell.store) / "logs" / f"{cell.cell_id()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        subprocess.call([sys.executable, "-m", "suite", *overrides], stdout=output,
                        stderr=subprocess.STDOUT)  # fmt: skip
    return finished_record(cell.store, cell.cell_id())


def agreement(reference: pd.Series, here: dict[str, Any] | None) -> dict[str, Any]:
    """One calibration row: the reference cell, this machine's run of it, within tolerance?"""
    row: dict[str, Any] = {
        "variant": reference["variant"],
        "cell": reference["cell_id"],
        "verdict_reference": reference["verdict"],
        "verdict_here": here["verdict"] if here else "not trained",
    }
    for metric in ("val_loss", "escape_step"):
        theirs = reference[metric]
        ours = here.get(metric) if here else None
        row[f"{metric}_reference"] = theirs
        row[f"{metric}_here"] = ours
        both = theirs is not None and ours is not None and pd.notna(theirs) and pd.notna(ours)
        row[f"{metric}_difference"] = float(ours) - float(theirs) if both else math.nan
    within = row["verdict_here"] == row["verdict_reference"]
    if within and reference["verdict"] == CONVERGED:
        within = (
            abs(row["val_loss_difference"]) <= LOSS_TOLERANCE
            and abs(row["escape_step_difference"]) <= ESCAPE_TOLERANCE
        )
    row["within_tolerance"] = bool(within)
    row["device_name"] = here.get("device_name") if here else None
    return row


def calibrate(
    reference_store: str, variants: list[str], backbone: str, store: str, workers: int
) -> pd.DataFrame:
    reference = read_runs(reference_store)
    cells = [calibration_cell(reference, variant, backbone) for variant in variants]
    jobs = [compose(row, store) for row in cells]  # every cell checked before any trains
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(pool.map(lambda job: _train(*job), jobs))
    table = pd.DataFrame(
        [agreement(row, record) for row, record in zip(cells, records, strict=True)]
    )
    outcome = {
        "reference": str(resolve_store(reference_store)),
        "reference_device_name": read_environment(reference_store).get("device_name"),
        "device_name": sorted(set(table["device_name"].dropna())),
        "torch_version": _torch_version(),
        "machine": platform.machine(),
        "checked_at": utc_now(),
        "tolerance": {"val_loss": LOSS_TOLERANCE, "escape_step": ESCAPE_TOLERANCE},
        "passed": bool(table["within_tolerance"].all()),
        "failed_variants": sorted(table.loc[~table["within_tolerance"], "variant"]),
        "cells": json.loads(table.to_json(orient="records")),
    }
    Path(store).mkdir(parents=True, exist_ok=True)
    (Path(store) / CALIBRATION).write_text(json.dumps(outcome, indent=1, ensure_ascii=False) + "\n")
    return table


def _torch_version() -> str:
    import torch

    return torch.__version__


# --- the command ---------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m suite.reference",
        description="Make (run, ship) and check (calibrate) the shipped reference results.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train the reference grid, then ship it")
    run_parser.add_argument("--store", default=DEFAULT_STORE)
    run_parser.add_argument("--variants", type=_names, help="default: every built-in")
    run_parser.add_argument("--backbones", type=_names, default=list(BACKBONES))
    ship_parser = commands.add_parser(
        "ship", help="write the store's reference cells to reference/"
    )
    ship_parser.add_argument("--store", default=DEFAULT_STORE)
    ship_parser.add_argument("--out", type=Path, help="default: reference/quick")
    calibrate_parser = commands.add_parser(
        "calibrate", help="re-train a few reference cells here; within tolerance?"
    )
    calibrate_parser.add_argument(
        "--variants", type=_names, default=list(CALIBRATED_VARIANTS),
        help="the baselines you will compare against (default: preln,postln)",
    )  # fmt: skip
    calibrate_parser.add_argument("--backbone", default=BACKBONES[0])
    calibrate_parser.add_argument(
        "--reference", default="reference", help="default: the shipped one"
    )
    calibrate_parser.add_argument("--store", default=CALIBRATION_STORE)
    calibrate_parser.add_argument(
        "--workers", type=int, default=max(1, min(2, os.cpu_count() or 1))
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            unknown = sorted(set(args.variants or []) - set(built_ins()))
            if unknown:
                raise ConfigError(f"--variants: not built-ins: {', '.join(unknown)}; the "
                                  f"built-ins are {', '.join(built_ins())}")  # fmt: skip
            run(args.store, args.variants or built_ins(), args.backbones)
        elif args.command == "ship":
            folder = ship(args.store, out=args.out)
            print(f"-> {folder / RUNS}, {folder / ENVIRONMENT}")
        else:
            _calibrate_command(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"reference: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _calibrate_command(args: argparse.Namespace) -> None:
    table = calibrate(args.reference, args.variants, args.backbone, args.store, args.workers)
    shown = table[["variant", "cell", "verdict_reference", "verdict_here",
                   "val_loss_reference", "val_loss_here", "escape_step_reference",
                   "escape_step_here", "within_tolerance"]]  # fmt: skip
    print(f"Calibration against {resolve_store(args.reference)} (tolerance: same verdict; "
          f"converged runs within {LOSS_TOLERANCE} nats of validation loss and "
          f"{ESCAPE_TOLERANCE} steps of escape):")  # fmt: skip
    print(shown.to_string(index=False))
    print(f"-> {Path(args.store) / CALIBRATION}")
    failed = sorted(table.loc[~table["within_tolerance"], "variant"])
    if failed:
        print(
            f"\nthis machine does not reproduce the reference for {', '.join(failed)}: re-run "
            f"{'that baseline' if len(failed) == 1 else 'those baselines'} in your own store "
            f"and compare there:\n  python -m suite +variant={','.join(failed)} "
            f"model.backbone={args.backbone} store=<your store>",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print("this machine reproduces the reference for these baselines: compare against it with "
          "python -m suite.compare <yours> <baseline> --against reference")  # fmt: skip
