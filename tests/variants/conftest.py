"""Fixtures of the variants' tests."""

from __future__ import annotations

import pytest

import variants.native


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch, module_cache):
    """Switches variants.native's kernels on or off (``native(True)``), built into the test
    module's own cache."""
    monkeypatch.setenv("SUITE_NATIVE_CACHE", str(module_cache))

    def switch(on: bool) -> None:
        monkeypatch.setenv("SUITE_NATIVE", "1" if on else "0")
        variants.native.library.cache_clear()

    yield switch
    switch(True)
