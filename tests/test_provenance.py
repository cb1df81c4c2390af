"""The commit every record carries says `-dirty` when the checkout differs from it in what can
change a result, and not for the data the suite's own commands write into the checkout."""

from __future__ import annotations

import subprocess

import suite.provenance as provenance


def test_dirty_means_a_change_that_can_change_a_result(tmp_path, monkeypatch):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for path in ("suite/model.py", "reference/quick/runs.parquet", "reports/.gitkeep"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    monkeypatch.setattr(provenance, "_REPO", tmp_path)

    def sha() -> str:
        provenance.git_sha.cache_clear()
        return provenance.git_sha()

    clean = sha()
    assert len(clean) == 40
    (tmp_path / "reference/quick/runs.parquet").write_text("1")  # a ship between arms
    (tmp_path / "reports/.gitkeep").write_text("1")
    assert sha() == clean
    (tmp_path / "suite/model.py").write_text("1")
    assert sha() == clean + "-dirty"
    provenance.git_sha.cache_clear()
