from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_suite


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
