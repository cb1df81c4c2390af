"""Helpers shared by the tests: the real CLI in a subprocess, tiny cells, fake plugin installs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_suite(
    *args: str, timeout: int = 300, env: dict | None = None, command: str = "suite"
) -> subprocess.CompletedProcess:
    """The real CLI, as a user types it, in a subprocess: ``python -m suite`` (or another of the
    suite's commands, e.g. ``command="suite.compare"``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", command, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_suite(*args: str, **popen: object) -> subprocess.Popen:
    """The real CLI started in the background (stdout and stderr merged, unbuffered), for tests
    that interrupt or kill it mid-sweep; ``popen`` overrides any of those settings."""
    settings = {
        "cwd": REPO,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
        "env": {**os.environ, "PYTHONUNBUFFERED": "1"},
        **popen,
    }
    return subprocess.Popen([sys.executable, "-m", "suite", *args], **settings)


def make_cell(
    variant: str = "preln",
    *,
    lr: float = 3e-3,
    depth: int = 2,
    steps: int = 20,
    seed: int = 0,
    width: int = 32,
    heads: int = 2,
    **train,
):
    """A tiny, fast cell built directly (no Hydra), for unit and behaviour tests."""
    from suite.config import (
        CellConfig,
        DataConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        VerdictConfig,
    )

    return CellConfig(
        variant=variant,
        variant_params={},
        model=ModelConfig(width=width, heads=heads, depth=depth, seq_len=32),
        data=DataConfig(max_bytes=300_000),
        optim=OptimConfig(lr=lr),
        train=TrainConfig(
            steps=steps, batch_size=16, eval_batches=2, log_every=1000, threads=1, **train
        ),
        verdict=VerdictConfig(),
        seed=seed,
    )


def fake_distribution(site: Path, name: str, module_source: str) -> None:
    """A plugin 'installed' the way importlib.metadata finds one: a module and a .dist-info
    folder with its entry point, on PYTHONPATH."""
    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "entry_points.txt").write_text(f"[stability_suite.variants]\n{module} = {module}\n")


def resubmit_with_a_third_lr(
    first: Path, store: Path, sweep: tuple[str, ...], launcher: tuple[str, ...], env: dict
) -> subprocess.CompletedProcess:
    """The cluster tests' resume check: a copy of ``first`` (the 4 cells of ``sweep`` at LRs 1e-3
    and 3e-2) submitted again with a third LR trains only the 2 new cells through ``launcher``,
    leaves the first submission's records untouched and collects all 6."""
    import shutil

    from suite.analyze.collect import collect

    shutil.copytree(first, store)
    before = {p.parent.name: p.stat().st_mtime_ns for p in store.glob("cells/*/record.json")}
    result = run_suite(*sweep, "optim.lr=1e-3,3e-2,1e-2", f"store={store}", *launcher, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Summary of this sweep (6 cells, 4 already in the store" in result.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in store.glob("cells/*/record.json")}
    assert {k: after[k] for k in before} == before
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and all("-lr0.01-" in cell for cell in new)
    runs = collect(store)
    assert len(runs) == 6 and (runs["status"] == "ok").all()
    return result


def compose_cell(*overrides: str):
    """A cell composed by Hydra from the suite's configs and ``overrides``, as a job gets it."""
    from hydra import compose, initialize_config_dir

    from suite.launch.cell import cell_from_config, config_dir
    from suite.launch.preflight import register_configs

    register_configs()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return cell_from_config(compose("config", overrides=list(overrides)))


def has_c_compiler() -> bool:
    """Whether variants.native finds a C compiler here (its kernels can be built)."""
    import variants.native

    try:
        return variants.native._compiler() is not None
    except RuntimeError:  # a $CC that names no program: as no compiler here
        return False


needs_compiler = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler on this machine")


def record_calls(monkeypatch: pytest.MonkeyPatch, module: object, names: tuple[str, ...]) -> list:
    """The names of ``module``'s functions ``names``, in the order they are called (a kernel
    module's Python entry points: which of them ran)."""
    calls: list[str] = []
    for name in names:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def assert_as_accurate_as_pytorch(kernel: list, pytorch: list, exact: list) -> None:
    """Each of a kernel's float32 outputs within 4x PyTorch's float32 error against float64
    plus 4e-6 of its largest entry: sums over tokens cancel, so that bound rather than a
    relative one; a formula error (a term left out) is ~1e-2 of it."""
    for got, reference, want in zip(kernel, pytorch, exact, strict=True):
        pytorch_error = (reference.double() - want).abs().max()
        bound = 4 * pytorch_error + 4e-6 * want.abs().max()
        assert (got.double() - want).abs().max() <= bound, tuple(want.shape)
