"""``python -m suite.reference``: the reference results shipped with the suite, made and checked.

    python -m suite.reference run [--backbones gpt2,llama] [--recipes controlled,authors]
                                  [--variants a,b] [--store S] [--replace]
    python -m suite.reference ship [--store S] [--replace]
    python -m suite.reference calibrate [--variants preln,postln] [--store results/calibration]

``run`` trains every built-in variant on the reference preset (``quick``: depths 6 and 24, five
LRs, two seeds) on each backbone into one store, one ordinary sweep per (variant, backbone), so
an interrupted run goes on where it stopped (resume), then ships it; ``--recipes
controlled,authors`` adds the authors' arm of each variant whose recipe changes its training
(DyT, Derf, Admin: the others' authors cells are their controlled ones). ``ship`` writes that
store's collected table, cut to the reference grid, to ``reference/<name>/runs.parquet`` with
``environment.json`` (the machine, torch, suite version, the command, wall time per arm, and any
arm not yet complete, left out: part of a grid would rank as a whole one). An arm the store
does not hold whole keeps what the reference shipped for it before (``kept_arms``), so a store
that trains a few arms extends the reference (``--replace`` ships the store alone). The curves
are not shipped (about 1 kB per cell in the table, 40 kB per curve), so the reference's
verdicts are those of the default verdict rule (``ship`` refuses a table judged with other
knobs).

``calibrate`` answers "does my machine reproduce the reference?" before a plugin author compares
their runs with it: losses depend on the CPU and its kernels, and a comparison across machines
is only as good as that agreement. It re-trains one cell of each named variant afresh (never
read back from an earlier run: the smallest depth, the lowest LR at which every seed converged
with no borderline verdict, seed 0; the cell of that arm most seeds agree on) into a scratch
store, and calls the machine calibrated for that variant when the verdict is the same and, for a
converged run, the validation loss and the step it left the plateau differ by at most
:data:`LOSS_TOLERANCE` and :data:`ESCAPE_TOLERANCE`, or by the difference between that cell's
own seeds in the reference where that is larger. The constants are about the difference two
seeds of one cell show in the reference (median 0.04 nats and 17 steps over its converged cells;
75th percentile 0.05 and 30): a machine difference below the seed noise is lost in the noise
every comparison already carries. A variant outside tolerance is named with the command that
retrains it as a baseline in the user's own store. The outcome is merged into
``<store>/calibration.json`` (one entry per variant and backbone, with the machine, torch and
the reference's ship time), where ``python -m suite.compare --against reference`` finds it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from suite.config import CellConfig, ConfigError, VerdictConfig
from suite.launch.cli import stop_in_turn
from suite.launch.preflight import preflight
from suite.plan import utc_now
from suite.run.data import load_corpus
from suite.store import (
    CALIBRATION,
    CALIBRATION_STORE,
    ENVIRONMENT,
    RUNS,
    arm_key,
    arm_shipped_at,
    calibrated_arm,
    checks_the_shipped_runs,
    column,
    finished_record,
    read_calibration,
    read_environment,
    read_json,
    read_runs,
    reference_dir,
    resolve_store,
    write_json,
    write_table,
)
from suite.verdict import CONVERGED, rule_description
from variants import registry

PRESET = "quick"
BACKBONES = ("gpt2",)  # what ships today; ``--backbones gpt2,llama`` runs both
CONTROLLED, RECIPES = "controlled", ("controlled", "authors")
DEFAULT_STORE = "results/reference"
CALIBRATED_VARIANTS = ("preln", "postln")  # the baselines almost every comparison names
LOSS_TOLERANCE = 0.05  # nats of validation loss
ESCAPE_TOLERANCE = 30  # steps to leave the unigram plateau
REPLACE_HELP = "ship the store alone (default: keep the arms shipped before that it lacks)"
WALL = "reference-wall.json"  # <store>/: wall seconds per (variant, backbone) sweep run here
# Columns that only mean something beside the store's own files.
NOT_SHIPPED = ("curve_file",)


def built_ins() -> list[str]:
    return [n for n in registry.names() if registry.source(registry.get(n)) == registry.BUILT_IN]


def arm_overrides(
    variant: str, backbone: str, preset: str = PRESET, recipe: str = CONTROLLED
) -> list[str]:
    overrides = [f"+variant={variant}", f"sweep={preset}", f"model.backbone={backbone}"]
    return overrides + ([f"recipe={recipe}"] if recipe != CONTROLLED else [])


def has_arm(variant: str, recipe: str) -> bool:
    """Whether the variant has cells of its own under this recipe: a recipe that changes
    nothing trains the controlled cells (the same ids), which are never shipped twice."""
    return recipe == CONTROLLED or registry.get(variant)().authors_recipe().changes_training


def expected_cells(
    variant: str,
    backbone: str,
    preset: str = PRESET,
    store: str = DEFAULT_STORE,
    recipe: str = CONTROLLED,
) -> list[CellConfig]:
    """The cells of one arm of the reference grid, as the suite composes them today."""
    overrides = [*arm_overrides(variant, backbone, preset, recipe), f"store={store}"]
    return [cell for _, cell in preflight(overrides)]


# --- run -----------------------------------------------------------------------------------


def run(
    store: str,
    variants: list[str],
    backbones: list[str],
    preset: str = PRESET,
    out: Path | None = None,
    recipes: tuple[str, ...] | list[str] = (CONTROLLED,),
    keep_shipped: bool = True,
) -> Path:
    """One ordinary sweep per (variant, backbone, recipe) into the store (cells it holds are
    read, not trained again; an arm whose every cell is there is not swept at all), the wall
    time of each added to ``<store>/reference-wall.json`` (also of a sweep that failed or was
    interrupted: resumed, it adds only the rest), then ship (keeping the arms shipped before
    that the store lacks, unless ``keep_shipped`` is False). A recipe that changes nothing for
    a variant is its controlled arm: skipped."""
    held = False  # an arm whose cells the store holds, possibly since its last collect
    sweeps = _Sweeps()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, sweeps.stop) if on_main_thread else None
    arms = [(v, b, r) for r in recipes for b in backbones for v in variants if has_arm(v, r)]
    try:
        for variant, backbone, recipe in arms:
            if sweeps.stopping:
                raise SystemExit(128 + signal.SIGTERM)
            cells = expected_cells(variant, backbone, preset, store, recipe)
            if all(finished_record(store, cell.cell_id()) for cell in cells):
                held = True
                continue
            overrides = arm_overrides(variant, backbone, preset, recipe)
            command = [sys.executable, "-m", "suite", *overrides, f"store={store}"]
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[2:])}", flush=True)
            began = time.monotonic()
            try:
                code = sweeps.run(command)
            finally:
                _add_wall_time(store, arm_key(variant, backbone, recipe), began)
            if code != 0:
                raise SystemExit(code if code > 0 else 128 - code)  # killed by -code
            held = False  # the sweep collected the whole store
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if held:
        code = subprocess.call([sys.executable, "-m", "suite.collect", "--store", store],
                               stdout=subprocess.DEVNULL)  # fmt: skip
        if code != 0:
            raise SystemExit(code)  # collect said why; a stale table would ship short arms
    return ship(store, preset, out, keep_shipped)


class _Sweeps:
    """The reference run's arm sweeps, one at a time. A SIGTERM to the run (``kill PID``, a
    scheduler's stop) is passed on to the sweep running, which stops as on Ctrl-C (its finished
    cells kept), and no further arm starts; the run still logs the arm's wall time. Python's
    default would end the run at once, with no ``finally``, and leave the sweep unwatched."""

    def __init__(self) -> None:
        self.current: subprocess.Popen | None = None
        self.stopping = False

    def stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.current is not None:
            self.current.send_signal(signum)

    def run(self, command: list[str]) -> int:
        """The sweep's exit code; 128 + SIGTERM for one a SIGTERM kept from starting or that
        finished as the SIGTERM came: the run must not go on to the next arm."""
        if self.stopping:
            return 128 + signal.SIGTERM
        self.current = subprocess.Popen(command)
        try:
            if self.stopping:  # arrived while the sweep started
                self.current.send_signal(signal.SIGTERM)
            code = self.current.wait()
        except KeyboardInterrupt:
            # A terminal's Ctrl-C reached the sweep too: let it stop on its own (a second SIGINT
            # could interrupt its clean-up); one sent to this process alone is passed on.
            steps = ((None, 5.0), (signal.SIGINT, 30.0), (signal.SIGKILL, 5.0))
            stop_in_turn([self.current], steps)
            raise
        finally:
            self.current = None
        return 128 + signal.SIGTERM if self.stopping and code == 0 else code


def _add_wall_time(store: str, key: str, began: float) -> None:
    # Read afresh under a lock: another run on the same store may add its own arms meanwhile.
    Path(store).mkdir(parents=True, exist_ok=True)
    with open(Path(store) / f"{WALL}.lock", "w") as lock:
        with contextlib.suppress(OSError):  # a filesystem without locks: log unlocked, as before
            fcntl.flock(lock, fcntl.LOCK_EX)
        wall = read_json(Path(store) / WALL)
        wall[key] = round(wall.get(key, 0.0) + time.monotonic() - began, 1)
        write_json(Path(store) / WALL, dict(sorted(wall.items())))


# --- ship ----------------------------------------------------------------------------------


def ship(
    store: str, name: str = PRESET, out: Path | None = None, keep_shipped: bool = True
) -> Path:
    """The store's finished cells of the reference grid → ``reference/<name>/``: only cells the
    suite composes today for a built-in on that preset (a cell of an older config has another
    id), judged by the default verdict rule, of arms whose whole grid finished; the others are
    listed (``incomplete_arms``, ``absent_arms``).

    With ``keep_shipped`` (the default) an arm the store does not hold whole keeps the cells the
    folder already ships for it, where they are still today's whole grid judged by today's rule
    (``kept_arms`` in environment.json says when and from which store each was shipped): a store
    that trains a few arms (a new built-in, the rest of a backbone) extends the reference instead
    of replacing it, and a lost store costs nothing already shipped. ``keep_shipped=False`` ships
    the store alone."""
    folder = out or reference_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    # Two ships into one folder at once would each keep what was there and the later would
    # drop the earlier's arms: one at a time.
    with open(folder / ".ship.lock", "w") as lock:
        with contextlib.suppress(OSError):  # a filesystem without locks: unlocked, as before
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _ship(store, name, folder, keep_shipped)


def _ship(store: str, name: str, folder: Path, keep_shipped: bool) -> Path:
    runs = read_runs(store)
    earlier, earlier_environment = _shipped(folder) if keep_shipped else (None, {})
    # By id, not by the preset label: a cell another preset trained first (sweep=claims shares
    # the quick grid's depth-6 llama cells) is the same cell, and a quick sweep resumes it.
    ok = runs[runs["status"] == "ok"].drop_duplicates("cell_id", keep="last")
    earlier = ok.iloc[:0] if earlier is None else earlier
    shipped, missing, absent, kept, seconds, walls = [], {}, [], {}, {}, {}
    now, dated = utc_now(), {}
    store_walls = read_json(Path(store) / WALL)
    labelled = set(ok.loc[ok["sweep"] == name, "backbone"].dropna().astype(str))
    backbones = set(ok["backbone"].dropna().astype(str)) | set(earlier["backbone"].astype(str))
    for backbone in sorted(backbones) or list(BACKBONES):
        arms = _arms_on(ok, earlier, backbone, name, store)
        # A backbone only another preset ran is this grid's only where it holds a grid cell.
        if backbone not in labelled and not any(len(f) or len(e) for _, f, e, _ in arms):
            continue
        for key, found, shipped_before, wanted in arms:
            if wanted is None:
                absent.append(key)
                continue
            if len(found) == len(wanted):
                shipped.append(_under_preset(found, name))
                # Re-shipping the same runs is no new measurement: a calibration of them holds.
                unchanged = _same_runs(found, shipped_before)
                dated[key] = (unchanged and arm_shipped_at(earlier_environment, key)) or now
                seconds[key] = round(float(found["wall_time_s"].sum()), 1)
                if key in store_walls:
                    walls[key] = store_walls[key]
                continue
            before, why_not = _keepable(shipped_before, wanted)
            partial = f"{len(found)} of {len(wanted)} cells finished"
            if before is not None:
                shipped.append(before)
                kept[key] = _provenance(key, earlier_environment)
                dated[key] = arm_shipped_at(earlier_environment, key) or now
                if not found.empty:  # the store's newer cells of it wait for the rest
                    kept[key]["store_holds"] = partial
                seconds[key] = round(float(before["wall_time_s"].sum()), 1)
                wall = earlier_environment.get("wall_seconds_by_arm", {}).get(key)
                if wall is not None:
                    walls[key] = wall
            elif found.empty and shipped_before.empty:
                absent.append(key)
            else:  # a part of a grid would rank as a whole one
                missing[key] = "; ".join(
                    ([partial] if not found.empty else []) + ([why_not] if why_not else [])
                ) + "; not shipped"  # fmt: skip
    if len(shipped) == len(kept):
        raise ConfigError(f"{store} holds no finished cell of the {name} reference grid")
    table = pd.concat(shipped, ignore_index=True).drop(columns=list(NOT_SHIPPED), errors="ignore")
    other_rules = sorted(set(table["verdict_rule"].dropna()) - _default_rules())
    if other_rules:  # kept cells are of the default rule: these are the store's
        raise ConfigError(
            f"{store} was collected with other verdict knobs ({other_rules[0]}); the reference is "
            f"judged by the default rule: python -m suite.collect --store {store}, then ship"
        )
    table = table.sort_values(["backbone", "variant", "depth", "lr", "seed"], ignore_index=True)
    backbones = sorted(set(table["backbone"]))
    environment = {
        "preset": name,
        "regenerate": "python -m suite.reference run"
        + (f" --backbones {','.join(backbones)}" if backbones != list(BACKBONES) else "")
        + (" --recipes controlled,authors" if any(" · authors" in key for key in seconds) else ""),
        "shipped_from": f"python -m suite.reference ship --store {store}",
        "shipped_at": now,
        "cells": len(table),
        "arms": sorted(
            arm_key(v, b, r)
            for v, b, r in set(
                zip(
                    table["variant"],
                    table["backbone"],
                    column(table, "recipe", CONTROLLED),
                    strict=True,
                )
            )
        ),  # fmt: skip
        "arm_shipped_at": dict(sorted(dated.items())),
        "kept_arms": dict(sorted(kept.items())),
        "incomplete_arms": missing,
        "absent_arms": absent,
        "backbones": backbones,
        "depths": sorted(int(d) for d in set(table["depth"])),
        "cell_seconds_by_arm": seconds,
        "wall_seconds_by_arm": dict(sorted(walls.items())),
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
                "verdict_rule",
                "corpus",
                "corpus_sha256",
            )
        },  # fmt: skip
    }
    write_table(table, folder / RUNS)
    write_json(folder / ENVIRONMENT, environment)
    return folder


def _default_rules() -> set[str]:
    return {rule_description(VerdictConfig()), "as recorded in training"}


def _shipped(folder: Path) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """What the folder ships now (its table and environment); None where it ships nothing. A
    damaged one is refused rather than shipped over: ``--replace`` ships the store alone."""
    if not (folder / RUNS).exists():
        return None, {}
    replace = "ship --replace ships the store alone"
    try:
        table = pd.read_parquet(folder / RUNS)
    except Exception as error:  # pyarrow's errors have no common base short of Exception
        raise ConfigError(f"{folder / RUNS} cannot be read ({error}); {replace}") from None
    lacking = sorted({"backbone", "variant", "cell_id", "verdict_rule"} - set(table.columns))
    environment = read_json(folder / ENVIRONMENT)
    if lacking or (len(table) and "shipped_at" not in environment):
        what = f"lacks the columns {', '.join(lacking)}" if lacking else (
            f"has no readable {ENVIRONMENT} beside it")  # fmt: skip
        raise ConfigError(f"{folder / RUNS} {what}: its arms cannot be kept; {replace}")
    table = table.assign(recipe=column(table, "recipe", CONTROLLED))
    return table.drop_duplicates("cell_id", keep="last"), environment


def _keepable(shipped_before: pd.DataFrame, wanted: set[str]) -> tuple[pd.DataFrame | None, str]:
    """An arm's earlier shipped rows if they are today's whole grid judged by today's rule, or
    None and why not ("" when nothing was shipped)."""
    if shipped_before.empty:
        return None, ""
    before = shipped_before[shipped_before["cell_id"].isin(wanted)]
    if len(before) < len(wanted):
        return None, "shipped before, not as today's whole grid"
    rules = sorted(set(before["verdict_rule"].dropna().astype(str)) - _default_rules())
    if rules:
        return None, f"shipped before judged by another verdict rule ({rules[0]})"
    return before, ""


def _same_runs(found: pd.DataFrame, shipped_before: pd.DataFrame) -> bool:
    """Whether the store's cells of an arm are the very runs shipped before, judged as before
    (same cells, start times, and whatever calibrate reads of them), not a retrain or a
    re-collect under another rule."""
    both = set(found.columns) & set(shipped_before.columns)
    compared = ("cell_id", "started_at", "verdict", "val_loss", "escape_step", "borderline",
                "verdict_rule")  # fmt: skip
    identity = [c for c in compared if c in both]
    if shipped_before.empty or identity[:2] != ["cell_id", "started_at"]:
        return False

    def runs(table: pd.DataFrame) -> set[tuple[str, ...]]:
        return set(table[identity].astype(str).itertuples(index=False, name=None))

    before = shipped_before[shipped_before["cell_id"].isin(set(found["cell_id"]))]
    return len(before) == len(found) and runs(before) == runs(found)


def _provenance(key: str, earlier_environment: dict[str, Any]) -> dict[str, Any]:
    """Where a kept arm was shipped from: the earlier ship's store, or, for an arm that ship
    itself kept, where it came from then."""
    carried = earlier_environment.get("kept_arms", {})
    if isinstance(carried, dict) and isinstance(carried.get(key), dict):
        return {k: v for k, v in carried[key].items() if k in ("shipped_at", "shipped_from")}
    # An arm that ship re-shipped unchanged keeps the date its runs were first shipped.
    return {
        "shipped_at": arm_shipped_at(earlier_environment, key),
        "shipped_from": earlier_environment.get("shipped_from"),
    }


def _arms_on(
    ok: pd.DataFrame, earlier: pd.DataFrame, backbone: str, name: str, store: str
) -> list[tuple[str, pd.DataFrame, pd.DataFrame, set[str] | None]]:
    """Each arm on the backbone: its key, its finished grid cells found by id in the store, its
    rows shipped before, and the ids of the grid's cells (None for an arm neither holds)."""
    arms = []
    for recipe in RECIPES:
        for variant in (v for v in built_ins() if has_arm(v, recipe)):
            key = arm_key(variant, backbone, recipe)
            rows = [
                table[(table["backbone"] == backbone) & (table["variant"] == variant)
                      & (column(table, "recipe", CONTROLLED) == recipe)]
                for table in (ok, earlier)
            ]  # fmt: skip
            if all(part.empty for part in rows):
                arms.append((key, ok.iloc[:0], earlier.iloc[:0], None))
                continue
            cells = expected_cells(variant, backbone, name, store, recipe)
            wanted = {cell.cell_id() for cell in cells}
            arms.append((key, ok[ok["cell_id"].isin(wanted)], rows[1], wanted))
    return arms


def _under_preset(found: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows labelled with the preset they ship under, in their sweep column and their stored
    config (JSON), whichever preset trained them first."""
    found = found.assign(sweep=name)
    if "config" in found:
        found["config"] = found["config"].map(
            lambda text: json.dumps({**json.loads(text), "sweep": name}, sort_keys=True)
            if isinstance(text, str) else text
        )  # fmt: skip
    return found


# --- calibrate -----------------------------------------------------------------------------


def calibration_cell(
    reference: pd.DataFrame, variant: str, backbone: str, recipe: str = CONTROLLED
) -> pd.Series:
    """The arm's reference cell most of its seeds agree on: the smallest depth, the lowest
    LR where every seed converged with no borderline verdict, the lowest seed; with no such LR,
    its lowest LR (whose verdict is then the main thing compared). It carries the spread of that
    cell's seeds (``val_loss_spread``, ``escape_step_spread``), which widens the tolerance."""
    arm = reference[
        (reference["backbone"] == backbone) & (column(reference, "recipe", CONTROLLED) == recipe)
    ]
    rows = arm[arm["variant"] == variant]
    if rows.empty:
        arms = sorted(set(arm["variant"])) or ["nothing"]
        where = backbone + ("" if recipe == CONTROLLED else f" with recipe {recipe}")
        raise ConfigError(
            f"--variants: the reference has no {variant} on {where}; on {where} it has: "
            f"{', '.join(arms)}"
        )
    rows = rows[rows["depth"] == rows["depth"].min()]
    steady = [
        lr for lr, cell in rows.groupby("lr")
        if (cell["verdict"] == CONVERGED).all() and not cell["borderline"].fillna(False).any()
    ]  # fmt: skip
    lr = min(steady) if steady else rows["lr"].min()
    seeds = rows[rows["lr"] == lr].sort_values("seed")
    cell = seeds.iloc[0].copy()
    for metric in ("val_loss", "escape_step"):
        values = pd.to_numeric(seeds[metric], errors="coerce").dropna()
        cell[f"{metric}_spread"] = float(values.max() - values.min()) if len(values) > 1 else 0.0
    return cell


def compose(row: pd.Series, store: str) -> tuple[list[str], CellConfig]:
    """The one-cell sweep that re-trains a reference row afresh (``resume=false``: a run of an
    earlier calibration is trained again, not read back), checked to be that very cell."""
    overrides = [
        *arm_overrides(row["variant"], row["backbone"], row["sweep"], calibrated_arm(row)[2]),
        f"model.depth={int(row['depth'])}",
        f"optim.lr={float(row['lr'])!r}",
        f"seed={int(row['seed'])}",
        f"store={store}",
        "resume=false",
        "hydra/launcher=basic",
    ]
    [(_, cell)] = preflight(overrides)
    corpus = load_corpus(cell.data).sha256
    if corpus != row["corpus_sha256"]:
        raise ConfigError(
            f"the reference trained on other text: its corpus ({row['corpus']}, sha256 "
            f"{row['corpus_sha256'][:12]}…) is not the one this suite trains on ({corpus[:12]}…), "
            "so no loss here can be compared with it: train the baselines in your own store "
            f"(python -m suite +variant={row['variant']})"
        )
    if cell.cell_id() != row["cell_id"]:
        raise ConfigError(
            f"{row['cell_id']}: the suite now composes this cell as {cell.cell_id()} (its "
            "settings changed since the reference was made); regenerate the reference "
            "(python -m suite.reference run)"
        )
    return overrides, cell


def _train(overrides: list[str], cell: CellConfig) -> dict[str, Any] | None:
    """The cell's record if this call trained it; None if it did not (its log says why)."""
    log = _log(cell)
    log.parent.mkdir(parents=True, exist_ok=True)
    before = finished_record(cell.store, cell.cell_id())
    with open(log, "ab") as output:
        subprocess.call([sys.executable, "-m", "suite", *overrides], stdout=output,
                        stderr=subprocess.STDOUT)  # fmt: skip
    record = finished_record(cell.store, cell.cell_id())
    # Every finished run writes its curve under a new name: the same name is the old run.
    if record is None or (before and before.get("curve_file") == record.get("curve_file")):
        return None
    return record


def _log(cell: CellConfig) -> Path:
    return Path(cell.store) / "logs" / f"{cell.cell_id()}.log"


def _difference(theirs: object, ours: object) -> float:
    """ours − theirs; 0 when neither has a value (a run that never left the plateau on either
    machine agrees), NaN when only one has."""
    theirs_missing = theirs is None or pd.isna(theirs)
    ours_missing = ours is None or pd.isna(ours)
    if theirs_missing and ours_missing:
        return 0.0
    if theirs_missing or ours_missing:
        return math.nan
    return float(ours) - float(theirs)


def agreement(reference: pd.Series, here: dict[str, Any] | None) -> dict[str, Any]:
    """One calibration row: the reference cell, this machine's fresh run of it, and whether they
    agree within tolerance (a NaN difference, one side without a value, does not)."""
    row: dict[str, Any] = {
        "variant": reference["variant"],
        "backbone": reference.get("backbone"),
        "recipe": calibrated_arm(reference)[2],
        "cell": reference["cell_id"],
        "verdict_reference": reference["verdict"],
        "verdict_here": here["verdict"] if here else "not trained",
    }
    tolerance = {
        "val_loss": max(LOSS_TOLERANCE, float(reference.get("val_loss_spread", 0.0))),
        "escape_step": max(ESCAPE_TOLERANCE, float(reference.get("escape_step_spread", 0.0))),
    }
    within = row["verdict_here"] == row["verdict_reference"]
    for metric, allowed in tolerance.items():
        ours = here.get(metric) if here else None
        row[f"{metric}_reference"] = reference[metric]
        row[f"{metric}_here"] = ours
        row[f"{metric}_difference"] = _difference(reference[metric], ours)
        row[f"{metric}_tolerance"] = allowed
        if within and reference["verdict"] == CONVERGED:
            within = abs(row[f"{metric}_difference"]) <= allowed  # NaN: False
    row["within_tolerance"] = bool(within)
    row["device_name"] = here.get("device_name") if here else None
    row["torch_version"] = here.get("torch_version") if here else None
    row["checked_at"] = utc_now()
    return row


def calibrate(
    reference_store: str,
    variants: list[str],
    backbone: str,
    store: str,
    workers: int,
    recipe: str = CONTROLLED,
) -> pd.DataFrame:
    """Re-train one reference cell per variant's arm here; merge the outcome into
    ``<store>/calibration.json`` and return this run's rows."""
    reference = read_runs(reference_store)
    cells = [calibration_cell(reference, variant, backbone, recipe) for variant in variants]
    jobs = [compose(row, store) for row in cells]  # every cell checked before any trains
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(pool.map(lambda job: _train(*job), jobs))
    table = pd.DataFrame(
        [agreement(row, record) for row, record in zip(cells, records, strict=True)]
    )
    table["log"] = [str(_log(cell)) for _, cell in jobs]
    _merge_calibration(store, reference_store, table)
    return table


def _merge_calibration(store: str, reference_store: str, table: pd.DataFrame) -> None:
    """This run's entries replace those of the same arm (variant, backbone, recipe); each
    entry keeps the ship it checked (``reference_shipped_at``), and earlier entries are dropped
    where they checked another reference or an arm shipped anew since."""
    environment = read_environment(reference_store)
    shipped_at = environment.get("shipped_at")
    where = str(resolve_store(reference_store).resolve())
    earlier = read_calibration(store)

    cells = [] if earlier.get("reference") != where else [
        {**cell, "reference_shipped_at": cell.get("reference_shipped_at")
         or earlier.get("reference_shipped_at")}
        for cell in earlier.get("cells", [])
        if checks_the_shipped_runs(cell, earlier, environment)
    ]  # fmt: skip
    new = json.loads(table.assign(reference_shipped_at=shipped_at).to_json(orient="records"))
    done = {calibrated_arm(cell) for cell in new}
    cells = [c for c in cells if calibrated_arm(c) not in done] + new
    outcome = {
        "reference": where,
        "reference_shipped_at": shipped_at,
        "reference_device_name": environment.get("device_name"),
        "tolerance": {"val_loss": LOSS_TOLERANCE, "escape_step": ESCAPE_TOLERANCE,
                      "widened_to": "the reference cell's own seed spread, where larger"},
        "passed": all(cell["within_tolerance"] for cell in cells),
        "failed_variants": sorted({arm_key(*calibrated_arm(c)) for c in cells
                                   if not c["within_tolerance"]}),
        "cells": cells,
    }  # fmt: skip
    write_json(Path(store) / CALIBRATION, outcome)


# --- the command ---------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a name given twice: {text}")
    return names


def _workers(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


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
    run_parser.add_argument(
        "--recipes", type=_names, default=[CONTROLLED],
        help="controlled (default) and/or authors: the authors' arms of DyT, Derf and Admin",
    )  # fmt: skip
    run_parser.add_argument("--preset", default=PRESET, help=f"default: {PRESET}")
    run_parser.add_argument("--out", type=Path, help="default: the shipped reference/<preset>")
    run_parser.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    ship_parser = commands.add_parser("ship", help="the store's reference cells -> reference/")
    ship_parser.add_argument("--store", default=DEFAULT_STORE)
    ship_parser.add_argument("--out", type=Path, help="default: the shipped reference/quick")
    ship_parser.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    calibrate_parser = commands.add_parser(
        "calibrate", help="re-train a few reference cells here; within tolerance?"
    )
    calibrate_parser.add_argument(
        "--variants", type=_names, default=list(CALIBRATED_VARIANTS),
        help="the baselines you will compare against (default: preln,postln)",
    )  # fmt: skip
    calibrate_parser.add_argument("--backbone", default=BACKBONES[0])
    calibrate_parser.add_argument(
        "--recipe", default=CONTROLLED, choices=RECIPES,
        help="the arm's recipe (authors: DyT's, Derf's and Admin's authors' arms)",
    )  # fmt: skip
    calibrate_parser.add_argument("--reference", default="reference", help="default: shipped")
    calibrate_parser.add_argument("--store", default=CALIBRATION_STORE)
    calibrate_parser.add_argument("--workers", type=_workers, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            unknown = sorted(set(args.variants or []) - set(built_ins()))
            if unknown:
                raise ConfigError(f"--variants: not built-ins: {', '.join(unknown)}; the "
                                  f"built-ins are {', '.join(built_ins())}")  # fmt: skip
            unknown = sorted(set(args.recipes) - set(RECIPES))
            if unknown:
                raise ConfigError(f"--recipes: unknown {', '.join(unknown)}; the recipes are "
                                  f"{', '.join(RECIPES)}")  # fmt: skip
            folder = run(args.store, args.variants or built_ins(), args.backbones, args.preset,
                         args.out, args.recipes, keep_shipped=not args.replace)  # fmt: skip
            _shipped_note(folder)
        elif args.command == "ship":
            folder = ship(args.store, out=args.out, keep_shipped=not args.replace)
            _shipped_note(folder)
        else:
            _calibrate_command(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"reference: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted: every finished cell is in the store; the same command goes on "
              "where it stopped", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None


def _shipped_note(folder: Path) -> None:
    environment = read_json(folder / ENVIRONMENT)
    kept = environment.get("kept_arms", {})
    print(f"-> {folder / RUNS}, {folder / ENVIRONMENT}: {len(environment.get('arms', []))} arms"
          + (f", {len(kept)} of them kept from earlier ships" if kept else ""))  # fmt: skip
    machines = environment.get("device_name", [])
    if len(machines) > 1:  # losses agree across CPUs only as far as calibrate shows
        print(f"note: its cells were measured on {len(machines)} CPUs ({'; '.join(machines)}): "
              "tokens/s and wall times compare only within one", file=sys.stderr)  # fmt: skip


def _shown(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _calibrate_command(args: argparse.Namespace) -> None:
    table = calibrate(
        args.reference, args.variants, args.backbone, args.store, args.workers, args.recipe
    )
    shown = table[["variant", "cell", "verdict_reference", "verdict_here", "val_loss_reference",
                   "val_loss_here", "escape_step_reference", "escape_step_here",
                   "within_tolerance"]]  # fmt: skip
    print(f"Calibration against {_shown(resolve_store(args.reference))} (same verdict; a "
          f"converged run within {LOSS_TOLERANCE} nats of validation loss and {ESCAPE_TOLERANCE} "
          "steps of escape, or the cell's own seed spread where larger):")  # fmt: skip
    print(shown.to_string(index=False))
    print(f"-> {Path(args.store) / CALIBRATION}")
    untrained = table[table["verdict_here"] == "not trained"]
    for row in untrained.itertuples():
        print(f"{row.cell} did not train here: see {row.log}", file=sys.stderr)
    failed = sorted(table.loc[~table["within_tolerance"], "variant"])
    if failed:
        print(
            f"\nthis machine does not reproduce the reference for {', '.join(failed)}: re-run "
            f"{'that baseline' if len(failed) == 1 else 'those baselines'} in your own store "
            f"and compare there:\n  python -m suite "
            f"{' '.join(arm_overrides(','.join(failed), args.backbone, recipe=args.recipe))} "
            "store=<your store>",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print("this machine reproduces the reference for these baselines: compare against it with "
          "python -m suite.compare <yours> <baseline> --against reference")  # fmt: skip
