"""Progress of a sweep that runs elsewhere (a cluster's nodes, a box's workers), for a person.

When a sweep starts, its main process writes the sweep's plan into the store,
``<store>/sweeps/<started>-<host>-<pid>.json`` (every cell id, the command, who runs it).
Everything else is read from the store the jobs write anyway: a cell is

- ``done`` when its finished record is there (``earlier`` if it was finished before the sweep
  started and the sweep kept it), ``errored`` when its record says so;
- ``running`` while a live process holds its claim (suite/claims.py; any host, by heartbeat);
- ``interrupted`` when this sweep started it and its process is gone without a record;
- ``queued`` otherwise.

``python -m suite.collect --watch`` prints this every few seconds until the sweep is over;
under a cluster launcher the sweep's own process prints one line of it every minute.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow.parquet as pq

from suite.claims import CLAIM, describe, is_stale
from suite.store import PARTIAL_CURVE, RECORD, RUNNING, atomic_write, cell_dir

PLANS = "sweeps"  # <store>/sweeps/: one plan per sweep started on the store
PLANS_ENV = "SUITE_SWEEP_PLANS"  # the plans this sweep wrote, for its own progress printer
# Launchers that run every cell on this machine and log as they go; the others are clusters',
# whose sweep process waits silently.
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher")
STATES = ("done", "errored", "running", "interrupted", "queued")


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_plan(store: str | Path, cell_ids: list[str], command: list[str], resume: bool) -> Path:
    """Record what a sweep is about to run; returns the plan's path."""
    started = _utc_now()
    host, pid = socket.gethostname(), os.getpid()
    path = Path(store) / PLANS / f"{started.replace(':', '')}-{host}-{pid}.json"
    plan = {
        "started_at": started,
        "hostname": host,
        "pid": pid,
        "user": getpass.getuser(),
        "command": command,
        "resume": resume,
        "cells": cell_ids,
    }
    text = json.dumps(plan, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_plans(store: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable plan in the store, oldest first (an unreadable one is skipped)."""
    plans = []
    for path in sorted((Path(store) / PLANS).glob("*.json")):
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        try:
            dt.datetime.fromisoformat(plan["started_at"])
            cells = plan["cells"]
            cells_listed = isinstance(cells, list) and all(isinstance(c, str) for c in cells)
        except (TypeError, KeyError, ValueError):
            continue
        if cells_listed:
            plans.append((path, plan))
    return plans


@dataclass
class CellProgress:
    cell_id: str
    state: str  # one of STATES
    verdict: str | None = None  # of a done cell, as judged in training
    earlier: bool = False  # done before this sweep started
    step: int | None = None  # of a running cell: steps in its last saved partial curve
    steps: int | None = None
    holder: str = ""  # of a running cell: user@host pid
    wall_time_s: float | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def cell_progress(store: str | Path, cell_id: str, plan: dict[str, Any]) -> CellProgress:
    folder = cell_dir(store, cell_id)
    started = str(plan.get("started_at", ""))
    claim = _read_json(folder / CLAIM)
    marker = _read_json(folder / RUNNING) or {}
    if claim is not None and not is_stale(claim):
        partial = _rows(folder / PARTIAL_CURVE) if marker.get("started_at", "") >= started else 0
        return CellProgress(
            cell_id, "running", step=partial, steps=marker.get("steps"), holder=describe(claim)
        )
    record = _read_json(folder / RECORD)
    if record is not None and str(record.get("started_at", "")) >= started:
        state = "done" if record.get("status") == "ok" else "errored"
        return CellProgress(
            cell_id, state, verdict=record.get("verdict"), wall_time_s=record.get("wall_time_s")
        )
    if record is not None and record.get("status") == "ok" and plan.get("resume", True):
        return CellProgress(cell_id, "done", verdict=record.get("verdict"), earlier=True)
    if marker and str(marker.get("started_at", "")) >= started:
        return CellProgress(cell_id, "interrupted", steps=marker.get("steps"))
    return CellProgress(cell_id, "queued")


def _rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError):
        return 0


def sweep_progress(store: str | Path, plan: dict[str, Any]) -> list[CellProgress]:
    return [cell_progress(store, cell_id, plan) for cell_id in plan["cells"]]


def is_over(cells: list[CellProgress]) -> bool:
    """Nothing left to train: every cell done or errored (an interrupted cell may be re-run)."""
    return all(cell.state in ("done", "errored") for cell in cells)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    return "about " + (
        f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
    )


def _sweep_process(plan: dict[str, Any]) -> str:
    if plan.get("hostname") != socket.gethostname():
        return f"on {plan.get('hostname')}"
    try:
        os.kill(int(plan["pid"]), 0)
    except ProcessLookupError:
        return "its process has ended"
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return f"pid {plan.get('pid')}"


def progress_line(cells: list[CellProgress], plan: dict[str, Any], now: float) -> str:
    """One line: counts per state, verdicts of the done cells, rate and time left."""
    counts = Counter(cell.state for cell in cells)
    verdicts = Counter(c.verdict for c in cells if c.state == "done" and not c.earlier)
    earlier = sum(cell.earlier for cell in cells)
    done = f"{counts['done']} done"
    details = [f"{n} {verdict}" for verdict, n in sorted(verdicts.items()) if verdict]
    if earlier:
        details.append(f"{earlier} from earlier runs")
    if details:
        done += f" ({', '.join(details)})"
    parts = [done] + [f"{counts[state]} {state}" for state in STATES[1:] if counts[state]]
    line = f"{len(cells)} cell{'' if len(cells) == 1 else 's'}: " + ", ".join(parts)
    finished_here = counts["done"] + counts["errored"] - earlier
    elapsed = now - dt.datetime.fromisoformat(plan["started_at"]).timestamp()
    if finished_here and elapsed > 0:
        rate = finished_here / elapsed * 3600
        left = counts["queued"] + counts["running"] + counts["interrupted"]
        line += f"; {rate:.1f} cells/h"
        if left:
            line += f", {_duration(left / rate * 3600)} left at that rate"
    return line


def progress_text(store: str | Path, path: Path, plan: dict[str, Any], now: float) -> str:
    cells = sweep_progress(store, plan)
    command = " ".join(plan.get("command", []))
    lines = [
        f"sweep {path.stem} ({_sweep_process(plan)}): python -m suite {command}",
        "  " + progress_line(cells, plan, now),
    ]
    for cell in cells:
        if cell.state == "running":
            step = f"step {cell.step}/{cell.steps}" if cell.steps else "starting"
            lines.append(f"    running  {cell.cell_id}  {step}  {cell.holder}")
        elif cell.state in ("interrupted", "errored"):
            lines.append(f"    {cell.state:11}{cell.cell_id}")
    return "\n".join(lines)


def watch(
    store: str | Path,
    every_s: float = 10.0,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print the progress of the store's unfinished sweeps (or else its latest one) every
    ``every_s`` seconds until none is left running."""
    while True:
        plans = read_plans(store)
        if not plans:
            raise SystemExit(f"no sweep has been started on {store} (no {PLANS}/ folder)")
        active = [(p, plan) for p, plan in plans if not is_over(sweep_progress(store, plan))]
        shown = active or plans[-1:]
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        text = "\n".join(progress_text(store, p, plan, time.time()) for p, plan in shown)
        if out.isatty():
            out.write("\033[2J\033[H")  # redraw in place on a terminal; append to a log file
        out.write(f"[{stamp}] {store}\n{text}\n")
        out.flush()
        if not active or all(_ended(plan) for _, plan in active):
            return
        sleep(every_s)


def _ended(plan: dict[str, Any]) -> bool:
    """The sweep's own process is known to be gone (same host): nothing more will start."""
    return _sweep_process(plan) == "its process has ended"


def cluster_launcher(target: str) -> bool:
    return not any(name in target for name in LOCAL_LAUNCHERS)


class ProgressPrinter:
    """In the sweep's own process, under a cluster launcher (which prints nothing while it
    waits): one progress line every ``every_s`` seconds, for each plan in ``plan_paths``
    (``<store>/sweeps/<plan>.json``)."""

    def __init__(self, plan_paths: list[Path], every_s: float = 60.0) -> None:
        self.plan_paths, self.every_s = plan_paths, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        plans = [(path.parent.parent, _read_json(path)) for path in self.plan_paths]
        plans = [(store, plan) for store, plan in plans if plan is not None]
        while plans and not self._stop.wait(self.every_s):
            for store, plan in plans:
                cells = sweep_progress(store, plan)
                stamp = dt.datetime.now().strftime("%H:%M:%S")
                print(f"[{stamp}] progress: {progress_line(cells, plan, time.time())}", flush=True)

    def stop(self) -> None:
        self._stop.set()
