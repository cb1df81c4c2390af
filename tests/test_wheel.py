"""The product as a user installs it: a wheel built from the tracked sources, installed into a
fresh venv (no source tree, no editable install), runs a sweep and a report from another folder,
and a variant plugin installs against it.

Takes about two minutes (a venv with torch and the dependencies); ``-m "not wheel"`` skips it.
The torch it installs is ``$TORCH_SPEC`` (the Makefile passes its own; default torch==2.13.0,
the light CPU wheel), so a GPU user's ``make test`` does not pull another build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCES = (
    ".git",
    ".venv",
    "build",
    "dist",
    "results",
    "reports",
    "test-artifacts",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".benchmarks",
    "outputs",
    "multirun",
)


def run(*command: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the suite's wheel installed; returns its python."""
    root = tmp_path_factory.mktemp("wheel")
    sources = shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(*NOT_SOURCES))
    dist = root / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        dist,
        sources,
        cwd=root,
    )
    (wheel,) = dist.glob("stability_suite-*.whl")
    run(sys.executable, "-m", "venv", root / "venv", cwd=root)
    python = root / "venv" / "bin" / "python"
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0").split()
    run(python, "-m", "pip", "install", "-q", *torch_spec, cwd=root)
    run(python, "-m", "pip", "install", "-q", wheel, cwd=root)
    shutil.rmtree(sources)  # nothing of the source tree is left to import from
    return python


@pytest.mark.slow
@pytest.mark.wheel
def test_the_installed_wheel_runs_a_sweep_and_a_report_outside_the_source_tree(installed, tmp_path):
    where = run(
        installed,
        "-c",
        "import suite, variants; print(suite.__file__, variants.__file__)",
        cwd=tmp_path,
    )
    assert str(REPO) not in where.stdout and "site-packages" in where.stdout

    # mHC's C kernel ships as source and builds from the installed package (a warning, the
    # sign of a failed build, is an error here).
    kernel = (
        f"import os; os.environ['SUITE_NATIVE_CACHE'] = {str(tmp_path / 'native')!r}; "
        "import warnings; warnings.simplefilter('error'); "
        "import variants.native; assert variants.native.library('sinkhorn')"
    )
    if shutil.which("cc") or os.environ.get("CC"):  # without one, the loop runs (tested)
        run(installed, "-c", kernel, cwd=tmp_path)

    sweep = run(installed, "-m", "suite", "+variant=preln", "sweep=tiny", cwd=tmp_path)
    assert "Summary of this sweep (4 cells" in sweep.stdout
    assert len(list((tmp_path / "results" / "cells").glob("preln-*/record.json"))) == 4

    # The shipped reference comes with the wheel: a plugin author compares without a checkout.
    board = run(installed, "-m", "suite.leaderboard", "--store", "reference", cwd=tmp_path)
    assert "Leaderboard (quick" in board.stdout and " postln " in board.stdout

    report = run(installed, "-m", "suite.report", cwd=tmp_path)
    html = (tmp_path / "reports" / "stability.html").read_text()
    assert "preln" in html and "<img" in html, report.stdout

    # The README's plugin walk-through, against the installed wheel (not a checkout).
    # A copy, so that building it leaves nothing in the source tree.
    example = shutil.copytree(REPO / "examples" / "b2t", tmp_path / "b2t")
    run(installed, "-m", "pip", "install", "-q", example, cwd=tmp_path)
    listing = run(installed, "-m", "variants", cwd=tmp_path)
    assert any(row.startswith("b2t") for row in listing.stdout.splitlines()), listing.stdout
    run(
        installed,
        "-m",
        "suite",
        "+variant=b2t",
        "sweep=tiny",
        "train.steps=2",
        "store=plugin",
        cwd=tmp_path,
    )
    assert len(list((tmp_path / "plugin" / "cells").glob("b2t-*/record.json"))) == 4
