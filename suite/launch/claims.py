"""Cell claims: two sweeps (or two workers) on one store never train the same cell at once.

Before training, a job claims its cell by creating ``claim.json`` in the cell's folder with
``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFS v3+, so it works where SLURM nodes
share the store; no in-memory lock). The claim names its owner (user, host, pid) and carries a
heartbeat the owner refreshes every ``HEARTBEAT_S`` seconds. A job that finds a live claim skips
the cell and says so. On the owner's host a claim is alive exactly while its process is (pid and
start time, suite/liveness.py: a suspended sweep keeps its cells, a reused pid does not); from
another host it is stale once its heartbeat is older than ``STALE_AFTER_S``. A stale claim is
moved aside by rename (one taker wins) and claimed anew. An owner whose claim was taken over
(a host that hung past the heartbeat limit, then woke up) finds out before it writes anything
of the cell, and stops without writing: the taker's result stands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from suite.liveness import process_alive, process_stamp
from suite.store import atomic_write, cell_dir

log = logging.getLogger(__name__)

CLAIM = "claim.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the owner's machine is gone or hung


def _now() -> float:
    return time.time()


class ClaimLost(RuntimeError):
    """This process's claim on a cell was taken over by another: it must not write the cell."""


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether a claim's owner is gone: on this host, its process has exited (a stopped one is
    alive); from another host, its heartbeat stopped."""
    alive = process_alive(holder)
    if alive is not None:
        return not alive
    now = _now() if now is None else now
    try:
        return now - float(holder["heartbeat"]) > STALE_AFTER_S
    except (KeyError, TypeError, ValueError):
        return True


def describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('user', '?')}@{holder.get('hostname', '?')} pid {holder.get('pid', '?')}"


class Claim:
    """A held claim: refreshes its heartbeat in the background until released."""

    def __init__(self, path: Path, owner: dict[str, Any]) -> None:
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether the claim is still this process's (not taken over meanwhile)."""
        try:
            return json.loads(self.path.read_text()).get("token") == self.owner["token"]
        except (OSError, ValueError, AttributeError):
            return False

    def check(self) -> None:
        """Raise ClaimLost unless the claim is still held: called before every write."""
        if not self.held():
            raise ClaimLost(
                f"the claim on {self.path.parent.name} was taken over by another process "
                f"({describe(_read(self.path) or {})}); this run stops without writing it"
            )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.held():
                log.warning("claim on %s was taken over; stopped refreshing it", self.path.parent)
                return
            self.owner["heartbeat"] = _now()
            text = json.dumps(self.owner, sort_keys=True)
            atomic_write(self.path, lambda tmp, text=text: Path(tmp).write_text(text))

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)


def claim_cell(store: str | Path, cell_id: str) -> Claim | dict[str, Any]:
    """Claim the cell for this process: a :class:`Claim`, or the live holder's claim (a dict)
    when another process holds it."""
    folder = cell_dir(store, cell_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM
    for _ in range(5):
        owner = {
            "token": uuid.uuid4().hex,
            "user": getpass.getuser(),
            **process_stamp(),
            "claimed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": _now(),
        }
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read(path)
            if holder is not None and not is_stale(holder):
                return holder
            _move_aside(path, holder)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(owner, sort_keys=True))
        return Claim(path, owner)
    holder = _read(path)
    return holder if holder is not None else {"hostname": "?", "pid": "?"}


def _read(path: Path) -> dict[str, Any] | None:
    """The claim's content; a claim being written right now (empty, or not yet whole JSON) is
    read as a fresh claim of an unknown owner, so it is never taken over."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        if _now() - _mtime(path) < STALE_AFTER_S:
            return {"hostname": "?", "pid": "?", "heartbeat": _now()}
        return None
    return holder if isinstance(holder, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _move_aside(path: Path, seen: dict[str, Any] | None) -> None:
    """Take a stale claim out of the way; of two takers only one rename succeeds. If what was
    moved is not the stale claim that was read (its owner replaced it meanwhile), put it back."""
    aside = path.with_name(f".{CLAIM}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read(aside)
    if seen is not None and moved is not None and moved.get("token") != seen.get("token"):
        with contextlib.suppress(OSError):  # a new claim appeared meanwhile: keep that one
            os.link(aside, path)
    else:
        log.info("took over a stale claim on %s (%s)", path.parent.name, describe(seen or {}))
    aside.unlink(missing_ok=True)
