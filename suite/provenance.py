"""What the suite itself is and where it runs, without torch: its version, its commit, the CPU.
Every record carries these (suite/run/environment.py adds the device's), and the report names
the suite that wrote it."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
# What the suite's commands write into the checkout: no training reads them.
_OUTPUTS = (":(exclude)reference", ":(exclude)reports")


@lru_cache(maxsize=1)
def suite_version() -> str:
    try:
        return version("stability-suite")
    except PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def git_sha() -> str:
    """Commit of the suite's checkout, with ``-dirty`` when it has uncommitted changes to what
    can change a result (the shipped reference's data, which ``python -m suite.reference
    ship`` rewrites in the checkout between arms, is not one); ``unknown`` for an installed
    wheel (whose site-packages may sit inside someone else's repository: its commit is not the
    suite's)."""
    if not (_REPO / ".git").exists():
        return "unknown"
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *_OUTPUTS)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    """The stripped output of a git command in the suite's checkout (raises when it fails)."""
    return subprocess.run(
        ["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()
