"""The sweep plan: what preflight checked, written once into each store, read by every job.

The sweep's main process builds the plan after preflight has validated every cell: each Hydra
job's cells (one cell, or a pack's members), the packs' learning rates, ``resume`` as composed,
the launcher, and who runs the sweep (host, pid and its start time). It is written atomically as
``<store>/sweeps/<name>.json`` in every store the sweep writes to. Jobs learn only the plan's
*name* (through Hydra's ``hydra.job.env_set``, a key preflight refuses from users), read the plan
from their cell's store, and train only cells the plan lists: nothing reaches a job except
through the config preflight checked. ``python -m suite.collect --watch`` reads the same plans to
show a sweep's progress (suite/analyze/progress.py).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from suite.liveness import process_alive, process_stamp
from suite.store import atomic_write

PLANS = "sweeps"  # <store>/sweeps/: one plan per sweep started on the store
PLAN_ENV = "SUITE_SWEEP_PLAN"  # the plan's name, set per job through hydra.job.env_set
RESERVED_ENV_PREFIX = "SUITE_"  # hydra.job.env_set keys the suite keeps for itself
PLANS_ENV = "SUITE_SWEEP_PLANS"  # in the main process: the plans it wrote, for its progress lines
# What each Hydra job leaves in its own folder, for its sweep's summary (suite/analyze/collect.py):
CELL_POINTER = "cell_id"  # the cell(s) it trains, one per line
SKIPPED_MARKER = "skipped"  # ... how many of them were already in the store
CLAIMED_MARKER = "claimed"  # ... the cells another live sweep was training, one per line


class PlanError(RuntimeError):
    """A job that cannot show that preflight checked what it was asked to train."""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SweepPlan:
    command: list[str]
    resume: bool
    launcher: str  # the hydra/launcher choice (basic, per_core, slurm, ...)
    jobs: list[list[str]]  # per Hydra job, in its order: the cell ids it trains
    packs: dict[str, list[float]] = field(default_factory=dict)  # lead cell id → its LRs
    started_at: str = field(default_factory=utc_now)
    user: str = field(default_factory=getpass.getuser)
    hostname: str = ""
    pid: int = 0
    pid_started: int | None = None
    ended_at: str | None = None
    store_cells: list[str] | None = None  # as read from one store: the cells trained there

    def __post_init__(self) -> None:
        if not self.hostname:
            stamp = process_stamp()
            self.hostname, self.pid, self.pid_started = (
                stamp["hostname"],
                stamp["pid"],
                stamp["pid_started"],
            )

    @property
    def name(self) -> str:
        return f"{self.started_at.replace(':', '')}-{self.hostname}-{self.pid}"

    @property
    def size(self) -> int:
        return len(self.jobs)

    @property
    def cells(self) -> list[str]:
        """Every cell of the sweep, once (a recipe sweep can name a cell in two jobs)."""
        return list(dict.fromkeys(cell_id for job in self.jobs for cell_id in job))

    def in_main_process(self) -> bool:
        """Whether this process is the sweep's main one (the basic launcher trains there)."""
        return process_alive(self.as_dict()) is True and self.pid == os.getpid()

    def digest(self) -> str:
        """A fingerprint of what the jobs obey (their cells, packs and resume): a job checks
        the plan it reads against the one its sweep started with."""
        facts = json.dumps({"jobs": self.jobs, "packs": self.packs, "resume": self.resume})
        return hashlib.sha256(facts.encode()).hexdigest()[:16]

    @property
    def job_env(self) -> str:
        """What a job learns of its plan (``SUITE_SWEEP_PLAN``): its name and digest."""
        return f"{self.name}:{self.digest()}"

    def as_dict(self) -> dict[str, Any]:
        # "cells" is what progress watchers (also older ones) read: this store's cells.
        fields = {k: v for k, v in asdict(self).items() if k != "store_cells"}
        cells = self.cells if self.store_cells is None else self.store_cells
        return {**fields, "name": self.name, "size": self.size, "cells": cells}

    def write(self, store: str | Path, cell_ids: set[str] | None = None) -> Path:
        """Write the plan into ``store``: every job of the sweep (what jobs check), and as
        ``cells`` only those trained there (``cell_ids``; all when None), which progress
        watchers show. Returns the plan's path."""
        plan = self.as_dict()
        if cell_ids is not None:
            plan["cells"] = [cell for cell in self.cells if cell in cell_ids]
        path = plan_path(store, self.name)
        text = json.dumps(plan, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path


def plan_path(store: str | Path, name: str) -> Path:
    return Path(store) / PLANS / f"{name}.json"


def load_plan(path: Path) -> SweepPlan | None:
    """The plan at ``path``; None when it is missing, unreadable or not a whole plan (plans
    written before 0.4 hold only ``cells``: read as one job per cell)."""
    try:
        data = json.loads(path.read_text())
        dt.datetime.fromisoformat(data["started_at"])
        cells = data["cells"]
        jobs = data.get("jobs") or ([[cell] for cell in cells] if isinstance(cells, list) else 0)
        plan = SweepPlan(
            command=[str(arg) for arg in data.get("command", [])],
            resume=bool(data.get("resume", True)),
            launcher=str(data.get("launcher", "")),
            jobs=jobs,
            packs={str(k): [float(lr) for lr in v] for k, v in data.get("packs", {}).items()},
            started_at=data["started_at"],
            user=str(data.get("user", "?")),
            hostname=str(data.get("hostname") or "?"),
            pid=int(data.get("pid") or 0),
            pid_started=data.get("pid_started"),
            ended_at=data.get("ended_at"),
            store_cells=[str(cell) for cell in cells] if isinstance(cells, list) else None,
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(jobs, list) or not all(
        isinstance(job, list) and all(isinstance(c, str) for c in job) for job in jobs
    ):
        return None
    return plan


def read_plans(store: str | Path) -> list[tuple[Path, SweepPlan]]:
    """Every readable plan in the store, oldest first (an unreadable one is skipped)."""
    plans = []
    for path in sorted((Path(store) / PLANS).glob("*.json")):
        plan = load_plan(path)
        if plan is not None:
            plans.append((path, plan))
    return plans


def job_plan(store: str | Path) -> SweepPlan:
    """In a job: the plan its sweep's main process wrote into the job's store, as it was
    written (its digest is the one the job was given)."""
    name, _, digest = os.environ.get(PLAN_ENV, "").partition(":")
    if not name or Path(name).name != name or not digest:
        raise PlanError(
            "this job has no sweep plan: sweeps start with `python -m suite ...`, whose "
            "preflight checks every cell first"
        )
    plan = load_plan(plan_path(store, name))
    if plan is None:
        raise PlanError(f"the sweep plan {plan_path(store, name)} is missing or unreadable")
    if plan.digest() != digest:
        raise PlanError(
            f"the sweep plan {plan_path(store, name)} was changed after the sweep started; "
            "its jobs train nothing"
        )
    return plan


def mark_ended(path: Path) -> None:
    """The sweep's process is ending: say so in its plan (a watcher then stops at once). A plan
    that cannot be read or written (a full disk) is left as it is: the watcher then judges the
    sweep by its process."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            text = json.dumps({**data, "ended_at": utc_now()}, indent=1)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except (OSError, ValueError):
        return
