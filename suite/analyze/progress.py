"""Progress of a sweep that runs elsewhere (a cluster's nodes, a box's workers), for a person.

When a sweep starts, its main process writes the sweep's plan into the store,
``<store>/sweeps/<started>-<host>-<pid>.json`` (every cell id, the command, who runs it).
Everything else is read from the store the jobs write anyway: a cell is

- ``done`` when its finished record is there (``earlier`` if it was finished before the sweep
  started and the sweep kept it), ``errored`` when its record says so;
- ``running`` while a live process holds its claim (suite/launch/claims.py; any host, by heartbeat);
- ``interrupted`` when it was started after the sweep began (by this sweep, or another one on
  the store) and its process is gone without a record;
- ``queued`` otherwise.

Times are compared as datetimes; the store's clocks are assumed to agree (a login node whose
clock runs ahead of the compute nodes' would count their first cells as earlier ones). When the
sweep's process ends it writes ``ended_at`` into its plan.

``python -m suite.collect --watch`` prints this every few seconds until no sweep is running;
under a cluster launcher (or submitit's local one, whose workers log to files) the sweep's own
process prints one line of it every ``progress_every`` seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow.parquet as pq

import suite.plan as plan_module
from suite.launch.claims import CLAIM, describe, is_stale
from suite.liveness import on_this_host, process_alive
from suite.plan import PLANS
from suite.store import PARTIAL_CURVE, RECORD, RUNNING, cell_dir

QUIET_AFTER_S = 300.0  # a sweep on another host with nothing running or finishing: over
STATES = ("done", "errored", "running", "interrupted", "queued")


def read_plans(store: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable plan in the store (suite/plan.py), oldest first, as its fields."""
    return [(path, plan.as_dict()) for path, plan in plan_module.read_plans(store)]


@dataclass
class CellProgress:
    cell_id: str
    state: str  # one of STATES
    verdict: str | None = None  # of a done cell, as judged in training
    earlier: bool = False  # done before this sweep started
    step: int | None = None  # of a running cell: steps in its last saved partial curve
    steps: int | None = None
    holder: str = ""  # of a running cell: user@host pid


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _time(value: Any) -> dt.datetime | None:
    """An ISO 8601 time as an aware datetime (a naive one is taken as UTC); None if not one."""
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _since(value: Any, start: dt.datetime | None) -> bool:
    moment = _time(value)
    return start is not None and moment is not None and moment >= start


def _steps(marker: dict[str, Any]) -> int | None:
    steps = marker.get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def cell_progress(store: str | Path, cell_id: str, plan: dict[str, Any]) -> CellProgress:
    folder = cell_dir(store, cell_id)
    started = _time(plan.get("started_at"))
    claim = _read_json(folder / CLAIM)
    marker = _read_json(folder / RUNNING) or {}
    if claim is not None and not is_stale(claim):
        partial = _rows(folder / PARTIAL_CURVE) if _since(marker.get("started_at"), started) else 0
        return CellProgress(
            cell_id, "running", step=partial, steps=_steps(marker), holder=describe(claim)
        )
    record = _read_json(folder / RECORD)
    if record is not None and _since(record.get("started_at"), started):
        state = "done" if record.get("status") == "ok" else "errored"
        return CellProgress(cell_id, state, verdict=record.get("verdict"))
    if record is not None and record.get("status") == "ok" and plan.get("resume", True):
        return CellProgress(cell_id, "done", verdict=record.get("verdict"), earlier=True)
    if marker and _since(marker.get("started_at"), started):
        return CellProgress(cell_id, "interrupted", steps=_steps(marker))
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
    alive = process_alive(plan)
    if alive is None:
        return f"on {plan.get('hostname')}"
    return f"pid {plan.get('pid')}" if alive else "its process has ended"


def progress_line(
    cells: list[CellProgress], plan: dict[str, Any], now: float, over: bool = False
) -> str:
    """One line: counts per state, verdicts of the done cells, rate and time left (no estimate
    for a sweep that is ``over``; its rate runs to its ``ended_at`` when it has one)."""
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
    started, ended = _time(plan.get("started_at")), _time(plan.get("ended_at"))
    end = ended.timestamp() if ended else now
    elapsed = end - started.timestamp() if started else 0.0
    if finished_here and elapsed > 0:
        rate = finished_here / elapsed * 3600
        left = counts["queued"] + counts["running"] + counts["interrupted"]
        line += f"; {rate:.1f} cells/h"
        if left and not over:
            line += f", {_duration(left / rate * 3600)} left at that rate"
    return line


def sweep_over(store: str | Path, plan: dict[str, Any], cells: list[CellProgress]) -> bool:
    """Nothing of the sweep runs now or will start: every cell finished, or its process has
    ended (``ended_at``, or gone from this host) and no cell of it is running; a sweep from
    another host without an end is over once nothing of it ran or finished for 5 minutes."""
    if is_over(cells):
        return True
    if any(cell.state == "running" for cell in cells):
        return False
    if plan.get("ended_at") or _sweep_process(plan) == "its process has ended":
        return True
    if on_this_host(plan):
        return False  # its process is alive
    newest = max((_mtime(cell_dir(store, cell.cell_id)) for cell in cells), default=0.0)
    return time.time() - max(newest, _time(plan["started_at"]).timestamp()) > QUIET_AFTER_S


def _mtime(folder: Path) -> float:
    times = []
    for name in (RECORD, RUNNING, PARTIAL_CURVE):
        try:
            times.append((folder / name).stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def progress_text(
    store: str | Path, path: Path, plan: dict[str, Any], cells: list[CellProgress], over: bool
) -> str:
    command = " ".join(str(arg) for arg in plan.get("command", []))
    state = "ended" if over else _sweep_process(plan)
    lines = [
        f"sweep {path.stem} ({state}): python -m suite {command}",
        "  " + progress_line(cells, plan, time.time(), over),
    ]
    for cell in cells:
        if cell.state == "running":
            step = f"step {cell.step}/{cell.steps}" if cell.steps else "starting"
            lines.append(f"    running      {cell.cell_id}  {step}  {cell.holder}")
        elif cell.state in ("interrupted", "errored"):
            lines.append(f"    {cell.state:12} {cell.cell_id}")
    return "\n".join(lines)


def watch(
    store: str | Path,
    every_s: float = 10.0,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print the progress of the store's running sweeps (or, if none runs, its latest one) every
    ``every_s`` seconds until none is left running."""
    if not Path(store).is_dir():
        raise SystemExit(f"no store at {store}")
    while True:
        plans = read_plans(store)
        if not plans:
            raise SystemExit(f"no sweep has been started on {store} (no plan in {PLANS}/)")
        states = []
        for path, plan in plans:
            cells = sweep_progress(store, plan)
            states.append((path, plan, cells, sweep_over(store, plan, cells)))
        running = [state for state in states if not state[3]]
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S UTC")
        text = "\n".join(progress_text(store, *state) for state in running or states[-1:])
        if out.isatty():
            out.write("\033[2J\033[H")  # redraw in place on a terminal; append to a log file
        out.write(f"[{stamp}] {store}\n{text}\n")
        out.flush()
        if not running:
            return
        sleep(every_s)


class ProgressPrinter:
    """In the sweep's own process, under a quiet launcher (a cluster's, or submitit local):
    one progress line every ``every_s`` seconds, for each plan in ``plan_paths``
    (``<store>/sweeps/<plan>.json``)."""

    def __init__(self, plan_paths: list[Path], every_s: float) -> None:
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
                stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S UTC")
                print(f"[{stamp}] progress: {progress_line(cells, plan, time.time())}", flush=True)

    def stop(self) -> None:
        self._stop.set()
