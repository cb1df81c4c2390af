"""Whether the process that wrote a claim, a running marker or a sweep plan is still alive.

A pid alone does not say so: pids are reused, so a dead sweep's pid may name a new process
minutes later. Every stamp therefore carries the process's start time as the kernel counts it
(``/proc/<pid>/stat``, field 22: clock ticks since boot), and a process counts as the stamp's
owner only when its pid *and* its start time match. A stopped process (Ctrl-Z, SIGSTOP) is
alive: it may be continued, and another sweep must not take its cells meanwhile.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def process_stamp(pid: int | None = None) -> dict[str, Any]:
    """Who a process is, for a file that names its owner: host, pid and start time."""
    pid = os.getpid() if pid is None else pid
    return {"hostname": socket.gethostname(), "pid": pid, "pid_started": _start_ticks(pid)}


def on_this_host(stamp: dict[str, Any]) -> bool:
    return stamp.get("hostname") == socket.gethostname()


def process_alive(stamp: dict[str, Any]) -> bool | None:
    """Whether the stamp's process lives: True or False on this host, None for another host's
    (no signal reaches it; callers decide by a heartbeat or a file's age). A stamp without a
    readable pid is dead. A stamp written before start times were recorded is judged by its pid."""
    if not on_this_host(stamp):
        return None
    try:
        pid = int(stamp["pid"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    if not 0 < pid < 2**31:  # no such process can exist (a damaged file)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # it exists, owned by another user
    started = stamp.get("pid_started")
    if started is None:
        return True
    now = _start_ticks(pid)
    return now is None or now == started
