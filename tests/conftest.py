from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import run_suite


@pytest.fixture(autouse=True, scope="session")
def no_gpu_pinning(tmp_path_factory):
    """The tests' sweeps assert the records of unpinned runs: on a machine with GPUs, the local
    launchers would pin their workers (suite/launch/devices.py) and share the machine's slot folder
    with any real sweep there. Tests of pinning set SUITE_FAKE_GPUS themselves."""
    saved = {key: os.environ.get(key) for key in ("SUITE_FAKE_GPUS", "SUITE_SLOT_DIR")}
    os.environ["SUITE_FAKE_GPUS"] = ""
    os.environ["SUITE_SLOT_DIR"] = str(tmp_path_factory.mktemp("gpu-slots"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A real tiny sweep of two variants through the CLI, shared by the end-to-end tests."""
    store = tmp_path_factory.mktemp("cli") / "store"
    result = run_suite("+variant=postln,preln", "sweep=tiny", f"store={store}")
    assert result.returncode == 0, result.stderr[-3000:]
    return store, result
