"""``python -m suite.frontier +variant=... [sweep=quick] [key=value ...]``: the stability frontier
of a sweep without training its whole grid.

The command line is the one ``python -m suite`` takes, and it is checked the same way (every cell
of the grid composed and validated before anything trains). The grid's cells are split into
*brackets*: the cells that differ only in learning rate and seed (one variant, depth, backbone,
...). For each bracket the search finds the largest grid LR at which every seed converges (the
max stable LR, as the summary defines it) and the next grid LR up, where one does not (the first
failing LR), by bisection in log LR over the grid:

- a probe is one grid LR; its seeds are trained in order and the probe stops at the first seed
  that does not converge (that LR already failed), so a failing probe usually costs one cell;
- after a stable probe the next one is taken towards the top of the bracket's open interval,
  after a failing one towards the bottom, so a bracket that is stable (or failing) over the whole
  grid is decided in two probes;
- a bracket stops once no grid LR is left between its highest stable and lowest failing LR.

Bisection assumes a monotone frontier: below it every seed converges, above it one does not. A
grid where a low LR fails and a higher one trains (a run still on the plateau at a small LR) is
not explored below the first stable probe; the full grid's ``unstable_below`` column shows such
gaps. A low LR that *stalls* (too slow within the budget, not unstable) reads as a failure too:
the table's note says when the lowest failing probe stalled rather than diverged.

Every probe is an ordinary cell (the same cell id as in the grid) trained by an ordinary
one-cell sweep (``python -m suite`` with the job's own overrides) into the ordinary store, so
the results collect, report and resume like any others, and a cell the store already holds is
read, not trained. ``--workers`` sweeps run at once (default: the usable CPU cores, one where
GPUs are present); when there are fewer undecided brackets than workers, a probe's later seeds
start beside its first. A cell another sweep is training is waited for, not trained twice.
Ctrl-C or SIGTERM passes a Ctrl-C to every running probe (finished cells are kept; the same
command goes on); the command exits 1 when a bracket could not be decided (a probe that did not
finish). Verdicts are judged from the stored curves by the sweep's verdict rule (``verdict.*``);
the table is printed and written to ``<store>/frontier/<sweep>-<time>-<pid>.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from suite.config import CellConfig, ConfigError
from suite.launch.claims import CLAIM, is_stale
from suite.launch.cli import (
    PARALLEL_ENV,
    finished,
    finished_run,
    preflight_overrides,
    stop_in_turn,
)
from suite.launch.devices import detect_gpus
from suite.launch.preflight import launcher_choice, preflight, root_setting, sweep_cells
from suite.plan import utc_now
from suite.store import cell_dir
from suite.verdict import CONVERGED, STALLED, judge_stored

log = logging.getLogger(__name__)

SEARCHED = ("optim.lr", "seed")  # the axes a bracket searches; every other axis names a bracket
LOCAL_LAUNCHERS = {"basic", "per_core", "joblib"}  # the frontier's own workers replace these
FRONTIER = "frontier"  # <store>/frontier/: the tables and each probe's log (<cell>.<pid>.log)


@dataclass
class Bracket:
    """One point of the other axes: its grid LRs (ascending), seeds, and what is known."""

    label: str
    lrs: list[float]
    seeds: list[int]
    lowest_failing: int = field(init=False)  # len(lrs) until an LR is known to fail
    highest_stable: int = field(init=False, default=-1)  # -1 until an LR is known stable
    verdicts: dict[tuple[int, int], str] = field(default_factory=dict)  # (LR index, seed)
    error: str = ""

    def __post_init__(self) -> None:
        self.lowest_failing = len(self.lrs)

    @property
    def decided(self) -> bool:
        return bool(self.error) or self.lowest_failing - self.highest_stable <= 1

    def probe(self) -> int | None:
        """The grid LR index to try next, or None once decided."""
        if self.decided:
            return None
        low, high = self.highest_stable, self.lowest_failing
        return (low + high + 1) // 2 if low >= 0 else (low + high) // 2

    def wanted(self) -> list[int]:
        """The seeds the current probe still needs, in order (the first one before the rest)."""
        index = self.probe()
        if index is None:
            return []
        return [seed for seed in self.seeds if (index, seed) not in self.verdicts]

    def learn(self, index: int, seed: int, verdict: str) -> None:
        """A seed's verdict at grid LR ``index``; the probe fails with its first failing seed."""
        self.verdicts[index, seed] = verdict
        if index != self.probe():
            return  # a seed started beside a probe that another seed has already decided
        if verdict != CONVERGED:
            self.lowest_failing = index
        elif all(self.verdicts.get((index, s)) == CONVERGED for s in self.seeds):
            self.highest_stable = index

    def _stalled_at(self, index: int) -> bool:
        failed = [v for (i, _), v in self.verdicts.items() if i == index and v != CONVERGED]
        return bool(failed) and all(v == STALLED for v in failed)

    def result(self) -> dict[str, object]:
        stable = self.lrs[self.highest_stable] if self.highest_stable >= 0 else None
        failing = self.lrs[self.lowest_failing] if self.lowest_failing < len(self.lrs) else None
        if self.error:
            note = f"error: {self.error}"
        elif not self.decided:
            note = "not finished"
        elif failing is None:
            note = "stable at the grid's top LR: the frontier is above the grid"
        elif stable is None and self._stalled_at(self.lowest_failing):
            note = (
                "no probed LR is stable; the lowest stalled rather than diverged: the budget may "
                "be too short rather than every LR too high (the full grid shows which)"
            )
        elif stable is None:
            note = "no grid LR is stable: the frontier is below the grid"
        else:
            note = ""
        return {
            "bracket": self.label,
            "max_stable_lr": math.nan if stable is None else stable,
            "first_failing_lr": math.nan if failing is None else failing,
            "cells": len(self.verdicts),
            "grid_cells": len(self.lrs) * len(self.seeds),
            "note": note,
        }


def search(brackets: list[Bracket], verdict_of: Callable[[Bracket, int, int], str]) -> None:
    """Decide every bracket one cell at a time, asking ``verdict_of(bracket, lr index, seed)``:
    the order of cells the frontier trains, without its parallel workers (for tests and for
    replaying a full grid's verdicts: benchmarks/frontier.py)."""
    for bracket in brackets:
        while (seeds := bracket.wanted()) and (index := bracket.probe()) is not None:
            bracket.learn(index, seeds[0], verdict_of(bracket, index, seeds[0]))


def stored_verdict(cell: CellConfig) -> str | None:
    """The verdict of the cell's finished run in its store, judged from its curve by the cell's
    verdict rule (``verdict.*``, as collect judges); None when the store has no finished run of
    this cell (as resume decides: a record trained differently is not). A curve that cannot be
    read leaves the verdict recorded in training, as collect does."""
    record = finished_run(cell)
    if record is None:
        return None
    try:
        return judge_stored(cell.store, record, cell.verdict)[0].verdict
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as error:
        log.warning("%s: cannot judge from its curve (%s); using its record", cell.cell_id(), error)
        return record.get("verdict")


@dataclass
class Grid:
    """The sweep's brackets, and each job's overrides and cell by (bracket, LR index, seed)."""

    brackets: list[Bracket]
    jobs: dict[tuple[int, int, int], tuple[list[str], CellConfig]]  # (bracket, LR index, seed)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def split_grid(cells: list[tuple[list[str], CellConfig]]) -> Grid:
    """Brackets from a sweep's (job overrides, cell) pairs, in the sweep's order."""
    if len({cell.optim.lr for _, cell in cells}) < 2:
        raise ConfigError("optim.lr: the frontier searches an LR grid; sweep at least two values")
    if any(cell.train.pack_lr for _, cell in cells):
        raise ConfigError(
            "train.pack_lr: a packed run trains the whole LR grid at once, which is what the "
            "frontier avoids; run it without train.pack_lr"
        )
    by_point: dict[tuple[str, ...], list[tuple[list[str], CellConfig]]] = {}
    for job, cell in cells:
        point = tuple(override for override in job if _key(override) not in SEARCHED)
        by_point.setdefault(point, []).append((job, cell))
    varying = _varying_keys(list(by_point))
    brackets: list[Bracket] = []
    jobs: dict[tuple[int, int, int], tuple[list[str], CellConfig]] = {}
    seen: dict[frozenset[str], Bracket] = {}  # a recipe sweep can name one cell in two points
    for point, members in by_point.items():
        label = " ".join(o for o in point if _key(o) in varying) or "the sweep"
        same = seen.get(frozenset(cell.cell_id() for _, cell in members))
        if same is not None:
            same.label += f" = {label}"
            continue
        lrs = sorted({cell.optim.lr for _, cell in members})
        seeds = sorted({cell.seed for _, cell in members})
        if len(members) != len(lrs) * len(seeds):
            raise ConfigError(f"{label}: its LRs and seeds do not form a full grid")
        number = len(brackets)
        brackets.append(Bracket(label, lrs, seeds))
        seen[frozenset(cell.cell_id() for _, cell in members)] = brackets[-1]
        for job, cell in members:
            jobs[number, lrs.index(cell.optim.lr), cell.seed] = (job, cell)
    return Grid(brackets, jobs)


def _varying_keys(points: list[tuple[str, ...]]) -> set[str]:
    values: dict[str, set[str]] = {}
    for point in points:
        for override in point:
            values.setdefault(_key(override), set()).add(override)
    return {key for key, seen in values.items() if len(seen) > 1} or {"variant"}


def probe_command(job: list[str], cell: CellConfig, launcher: str) -> list[str]:
    """The one-cell sweep that trains ``cell``: its job's overrides, checked to compose back to
    exactly that cell (the same id) before it is run."""
    overrides = list(job)
    if launcher in LOCAL_LAUNCHERS:
        overrides.append("hydra/launcher=basic")
    composed = sweep_cells(overrides)
    if len(composed) != 1 or composed[0][1].cell_id() != cell.cell_id():
        found = ", ".join(c.cell_id() for _, c in composed)
        raise ConfigError(f"{' '.join(job)} composes to {found}, not to {cell.cell_id()}")
    return [sys.executable, "-m", "suite", *overrides]


_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


def _train(command: list[str], cell: CellConfig, workers: int) -> bool:
    """Train the cell with a one-cell sweep; True when this process trained it. When another
    sweep holds the cell, wait for its result; when that sweep is gone without one, train it."""
    log_path = _log(cell)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, PARALLEL_ENV: str(workers)}
    for _ in range(3):
        logged = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as output:
            child = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env=environment
            )
            with _children_lock:
                _children.add(child)
            try:
                code = child.wait()
            finally:
                with _children_lock:
                    _children.discard(child)
        if code in (130, -signal.SIGINT) or _stopping.is_set():
            raise KeyboardInterrupt
        if finished(cell):
            return _trained_here(log_path, logged, cell.cell_id())
        while _held_elsewhere(cell) and not _stopping.is_set():
            time.sleep(WAIT_S)
        if finished(cell):
            return False
        if code != 0:
            return False  # the sweep failed: its log says why
    return False


def _trained_here(log_path: Path, offset: int, cell_id: str) -> bool:
    """Whether the probe's own sweep trained the cell (its "done" line, as suite.launch.cli logs
    it), rather than finding it in the store or leaving it to another sweep."""
    with open(log_path, "rb") as output:
        output.seek(offset)
        text = output.read().decode(errors="replace")
    return f"done: {cell_id} " in text


WAIT_S = 5.0
_stopping = threading.Event()


def _held_elsewhere(cell: CellConfig) -> bool:
    """Whether another live process has claimed the cell (it is training it)."""
    path = cell_dir(cell.store, cell.cell_id()) / CLAIM
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(holder, dict) and not is_stale(holder)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(grid: Grid, launcher: str, workers: int, resume: bool) -> int:
    """Train the probes of every bracket until each is decided; returns the cells trained."""
    trained = 0
    in_flight: dict[Future, tuple[int, int, int]] = {}
    started: set[tuple[int, int, int]] = set()

    def next_cells() -> list[tuple[int, int, int]]:
        # First one cell per bracket with nothing in flight, then later seeds beside a probe.
        busy = {number for number, _, _ in in_flight.values()}
        first, beside = [], []
        for number, bracket in enumerate(grid.brackets):
            index = bracket.probe()
            todo = [(number, index, s) for s in bracket.wanted()]
            todo = [key for key in todo if key not in started]
            if todo and number not in busy:
                first.append(todo.pop(0))
            beside.extend(todo)
        return first + beside

    def fail(key: tuple[int, int, int], why: str) -> None:
        number, index, _ = key
        bracket = grid.brackets[number]
        if index == bracket.probe():  # a seed of a probe already decided changes nothing
            bracket.error = why
            _say(f"{bracket.label}: {why}")

    def record(key: tuple[int, int, int], verdict: str | None = None) -> None:
        number, index, seed = key
        bracket = grid.brackets[number]
        job, cell = grid.jobs[key]
        if verdict is None:
            verdict = stored_verdict(cell)
        if verdict is None:
            fail(key, f"{cell.cell_id()} did not finish (its log: {_log(cell)})")
            return
        bracket.learn(index, seed, verdict)
        lr = bracket.lrs[index]
        _say(f"{bracket.label} lr {lr:g} seed {seed}: {verdict}  ({_state(bracket)})")

    def fill(pool: ThreadPoolExecutor) -> None:
        # Cells the store already holds are read, which can move a probe: then look again.
        looking = True
        while looking and len(in_flight) < workers:
            looking = False
            for key in next_cells():
                started.add(key)
                job, cell = grid.jobs[key]
                stored = stored_verdict(cell) if resume else None
                if stored is not None:
                    record(key, stored)
                    looking = True
                    break
                try:
                    command = probe_command(job, cell, launcher)
                except ConfigError as error:
                    fail(key, f"its probe does not compose: {error}")
                    looking = True
                    break
                in_flight[pool.submit(_train, command, cell, workers)] = key
                if len(in_flight) >= workers:
                    break

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        while True:
            fill(pool)
            if not in_flight:
                return trained
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                key = in_flight.pop(future)
                trained += future.result()
                record(key)
    except KeyboardInterrupt:
        _stop_children()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_children() -> None:
    """Ctrl-C (or a SIGTERM) reaches the frontier: each running one-cell sweep gets the Ctrl-C
    a terminal would have sent it, which keeps every finished cell. One that ignores it (started
    from a background shell, SIGINT ignored) gets a SIGTERM after a grace period, then a kill."""
    _stopping.set()
    with _children_lock:
        children = list(_children)
    stop_in_turn(children, ((signal.SIGINT, 10.0), (signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)))


def _log(cell: CellConfig) -> Path:
    """The probe's output, one file per cell and frontier process (two on one store never mix)."""
    return Path(cell.store) / FRONTIER / "logs" / f"{cell.cell_id()}.{os.getpid()}.log"


def _state(bracket: Bracket) -> str:
    row = bracket.result()
    unknown = "?" if not bracket.decided else "none on the grid"
    low, high = (
        unknown if math.isnan(row[key]) else f"{row[key]:g}"
        for key in ("max_stable_lr", "first_failing_lr")
    )
    if not bracket.decided:
        return f"stable ≤ {low}, failing ≥ {high}"
    return f"decided: max stable {low}, first failing {high}"


def _default_workers() -> int:
    """The usable CPU cores; one where GPUs are present (each probe would take the first GPU:
    give ``--workers`` with a launcher that pins GPUs, e.g. ``hydra/launcher=gpus``)."""
    if detect_gpus():
        return 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _refuse_sweep_folders(overrides: list[str]) -> None:
    for override in overrides:
        key = _key(override)
        if key in ("hydra.sweep.dir", "hydra.sweep.subdir"):
            raise ConfigError(
                f"{key}: each probe of the frontier is a sweep of its own in Hydra's default "
                "folder (outputs/<date>/<time>); leave it out"
            )


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m suite.frontier",
        description="Each bracket's max stable LR by bisection over the sweep's LR grid.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="one-cell sweeps run at once (default: the usable CPU cores; 1 with GPUs)",
    )
    known, overrides = parser.parse_known_args(argv)
    if known.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        _refuse_sweep_folders(overrides)
        overrides = preflight_overrides(overrides)
        grid = split_grid(preflight(overrides))
        launcher = launcher_choice(overrides)
        resume = bool(root_setting(overrides, "resume"))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    signal.signal(signal.SIGTERM, _on_sigterm)
    began = time.monotonic()
    try:
        trained = run(grid, launcher, known.workers, resume)
    except KeyboardInterrupt:
        print("\ninterrupted: every finished cell is in the store; run the same command again "
              "to go on", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    table = pd.DataFrame([bracket.result() for bracket in grid.brackets])
    grid_cells = int(table["grid_cells"].sum())
    print(f"\nStability frontier ({int(table['cells'].sum())} of {grid_cells} grid cells, "
          f"{trained} trained now, {time.monotonic() - began:.0f} s):")  # fmt: skip
    print(table.to_string(index=False))
    _, first = next(iter(grid.jobs.values()))
    name = f"{first.sweep}-{utc_now().replace(':', '')}-{os.getpid()}.csv"
    out = Path(first.store) / FRONTIER / name
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"-> {out}")
    if any(bracket.error for bracket in grid.brackets):
        raise SystemExit(1)
