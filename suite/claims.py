"""Cell claims: two sweeps (or two workers) on one store never train the same cell at once.

Before training, a job claims its cell by creating ``claim.json`` in the cell's folder with
``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFS v3+, so it works where SLURM nodes
share the store; no in-memory lock). The claim names its owner (user, host, pid) and carries a
heartbeat the owner refreshes every ``HEARTBEAT_S`` seconds. A job that finds a live claim skips
the cell and says so. A claim is stale when its process is gone (same host) or its heartbeat is
older than ``STALE_AFTER_S`` (another host); a stale claim is moved aside by rename (one taker
wins) and claimed anew.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from suite.store import atomic_write, cell_dir

log = logging.getLogger(__name__)

CLAIM = "claim.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the owner's machine is gone or hung


def _now() -> float:
    return time.time()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether a claim's owner is gone: its process has exited (same host), or its heartbeat
    stopped (any host)."""
    now = _now() if now is None else now
    if holder.get("hostname") == socket.gethostname():
        try:
            if not _alive(int(holder["pid"])):
                return True
        except (KeyError, TypeError, ValueError):
            return True
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

    def _ours(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.owner["token"]
        except (OSError, ValueError, AttributeError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._ours():
                log.warning("claim on %s was taken over; stopped refreshing it", self.path.parent)
                return
            self.owner["heartbeat"] = _now()
            text = json.dumps(self.owner, sort_keys=True)
            atomic_write(self.path, lambda tmp, text=text: Path(tmp).write_text(text))

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._ours():
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
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
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
