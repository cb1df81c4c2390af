"""The store keeps a cell's result whole: record and curve replaced as a unit, a killed re-run
never touching the finished curve, a failed cell keeping what it trained, old layouts readable."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from suite.analyze.collect import collect
from suite.store import (
    CURVE,
    PARTIAL_CURVE,
    RECORD,
    cell_dir,
    curve_path,
    read_curve,
    write_cell,
    write_partial_curve,
    write_started,
)


def curve_of(steps: int, loss: float = 2.0) -> list[dict[str, float]]:
    return [{"step": s, "loss": 5.5 - s * (5.5 - loss) / max(1, steps - 1)} for s in range(steps)]


def record(cell_id: str = "preln-L2-lr0.001-s0-0123456789", steps: int = 40) -> dict:
    return {
        "cell_id": cell_id,
        "status": "ok",
        "verdict": "converged",
        "steps": steps,
        "steps_completed": steps,
        "diverged_step": None,
        "unigram_entropy": 3.2,
        "final_loss": 2.0,
        "variant": "preln",
        "depth": 2,
        "lr": 1e-3,
        "seed": 0,
        "started_at": "2026-01-01T00:00:00+00:00",
    }


def test_a_killed_re_run_leaves_the_finished_result_whole(tmp_path):
    finished = record()
    write_cell(tmp_path, finished, curve_of(40))
    # The same cell trained again (resume=false, or a second sweep): it starts and flushes...
    write_started(tmp_path, finished["cell_id"], {**finished, "pid": 1})
    write_partial_curve(tmp_path, finished["cell_id"], curve_of(15))
    # ... and is killed here. The finished record and its whole curve are what is read.
    assert len(read_curve(tmp_path, finished["cell_id"])) == 40
    runs = collect(tmp_path, write=False)
    assert list(runs["status"]) == ["ok"] and list(runs["judged_from"]) == ["curve"]


def test_a_crash_between_curve_and_record_keeps_the_old_pair(tmp_path):
    finished = record()
    write_cell(tmp_path, finished, curve_of(40))
    folder = cell_dir(tmp_path, finished["cell_id"])
    # A re-run wrote its new curve file, then died before the record (the commit point).
    pd.DataFrame(curve_of(7)).to_parquet(folder / "curve-orphan00000.parquet")
    assert len(read_curve(tmp_path, finished["cell_id"])) == 40
    write_cell(tmp_path, finished, curve_of(40))  # the next finished run cleans up
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([RECORD, json.loads((folder / RECORD).read_text())["curve_file"]])


def test_an_errored_cell_keeps_its_curve(tmp_path):
    failed = {**record(), "status": "error", "verdict": None, "steps_completed": 12}
    write_cell(tmp_path, failed, curve_of(12))
    assert len(read_curve(tmp_path, failed["cell_id"])) == 12


def test_an_interrupted_cell_reads_its_partial_curve(tmp_path):
    started = record()
    write_started(tmp_path, started["cell_id"], {**started, "pid": 1})
    write_partial_curve(tmp_path, started["cell_id"], curve_of(9))
    assert curve_path(tmp_path, started["cell_id"]).name == PARTIAL_CURVE
    assert len(read_curve(tmp_path, started["cell_id"])) == 9


def test_a_store_in_the_old_layout_still_reads(tmp_path):
    old = record()
    folder = cell_dir(tmp_path, old["cell_id"])
    folder.mkdir(parents=True)
    (folder / RECORD).write_text(json.dumps(old))  # no curve_file
    pd.DataFrame(curve_of(40)).to_parquet(folder / CURVE)
    assert len(read_curve(tmp_path, old["cell_id"])) == 40
    assert collect(tmp_path, write=False).loc[0, "judged_from"] == "curve"


@pytest.mark.parametrize("name", ["../../escape.parquet", "/etc/passwd", ""])
def test_a_record_cannot_point_its_curve_outside_its_folder(tmp_path, name):
    bad = {**record(), "curve_file": name}
    folder = cell_dir(tmp_path, bad["cell_id"])
    folder.mkdir(parents=True)
    (folder / RECORD).write_text(json.dumps(bad))
    assert curve_path(tmp_path, bad["cell_id"]).parent == folder


@pytest.mark.parametrize("damage", [b"{truncated", b"[]", b'{"cell_id": "another-cell"}'])
def test_a_damaged_record_keeps_its_last_collected_row(tmp_path, damage):
    from suite.analyze.collect import report_text

    for seed in range(3):
        write_cell(tmp_path, record(f"preln-L2-lr0.001-s{seed}-0123456789"), curve_of(40))
    assert len(collect(tmp_path)) == 3  # writes runs.parquet
    damaged = "preln-L2-lr0.001-s1-0123456789"
    (cell_dir(tmp_path, damaged) / RECORD).write_bytes(damage)
    runs = collect(tmp_path).set_index("cell_id")
    assert len(runs) == 3  # the table never shrinks because a file went bad
    assert runs.loc[damaged, "status"] == "ok" and runs.loc[damaged, "record_unreadable"]
    assert runs.loc[damaged, "verdict"] == "converged"  # the last good copy of the result
    assert damaged in report_text(runs.reset_index())
    assert len(pd.read_parquet(tmp_path / "runs.parquet")) == 3  # ... and it stays written


def test_a_damaged_record_without_an_earlier_table_is_listed_not_dropped(tmp_path):
    from suite.analyze.collect import report_text
    from suite.store import finished_record

    write_cell(tmp_path, record(), curve_of(40))
    (cell_dir(tmp_path, record()["cell_id"]) / RECORD).write_text("{")
    runs = collect(tmp_path, write=False)
    assert list(runs["status"]) == ["unreadable"]
    assert "unreadable record.json" in report_text(runs)
    assert finished_record(tmp_path, record()["cell_id"]) is None  # resume re-trains it


def test_a_lost_record_still_says_which_cell_it_was():
    from suite.store import cell_from_id

    assert cell_from_id("peri-ln-L24-lr0.003-s1-2e702987b1") == {
        "variant": "peri-ln",
        "depth": 24,
        "lr": 0.003,
        "seed": 1,
    }
    assert cell_from_id("not-a-cell") == {}


def test_resume_re_trains_a_cell_whose_curve_is_gone_or_damaged_and_collect_says_so(tmp_path):
    from suite.analyze.collect import report_text
    from suite.store import finished_record

    write_cell(tmp_path, record(), curve_of(40))
    cell_id = record()["cell_id"]
    assert finished_record(tmp_path, cell_id) is not None
    curve_path(tmp_path, cell_id).write_bytes(b"PAR1 garbage")
    assert finished_record(tmp_path, cell_id) is None
    text = report_text(collect(tmp_path, write=False))
    assert "curve is missing, unreadable" in text and cell_id in text
    curve_path(tmp_path, cell_id).unlink()
    assert finished_record(tmp_path, cell_id) is None
    (cell_dir(tmp_path, cell_id) / RECORD).write_text("[1, 2]")  # parseable, not a record
    assert finished_record(tmp_path, cell_id) is None


def test_store_files_follow_the_umask_so_a_group_can_read_a_shared_store(tmp_path):
    import os
    import stat

    write_cell(tmp_path, record(), curve_of(5))
    folder = cell_dir(tmp_path, record()["cell_id"])
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


# --- property: kill or corrupt at random points, the invariants hold -------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import suite.store as store_module  # noqa: E402

OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["finish", "corrupt_record", "corrupt_curve", "collect"]),
        st.integers(min_value=0, max_value=2),  # which cell
        st.integers(min_value=0, max_value=3),  # kill at this file write of write_cell (0: none)
    ),
    min_size=1,
    max_size=12,
)


class Killed(BaseException):
    """A kill -9 stand-in: nothing after it runs."""


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(OPERATIONS)
def test_random_kills_and_corruption_never_lose_or_hide_a_result(tmp_path_factory, operations):
    root = tmp_path_factory.mktemp("store")
    ids = [f"preln-L2-lr0.001-s{i}-0123456789" for i in range(3)]
    committed: dict[str, int] = {}  # cell -> steps of its last finished result
    damaged_record, damaged_curve, collected_ok = set(), set(), set()
    original_write = store_module.atomic_write
    for number, (operation, which, kill_at) in enumerate(operations):
        cell_id = ids[which]
        if operation == "finish":
            steps = 20 + number
            writes = []

            def dying_write(path, write, writes=writes, kill_at=kill_at):
                writes.append(path)
                if len(writes) == kill_at:
                    raise Killed
                original_write(path, write)

            store_module.atomic_write = dying_write
            try:
                write_cell(root, record(cell_id, steps=steps), curve_of(steps))
            except Killed:
                pass
            finally:
                store_module.atomic_write = original_write
            if kill_at == 0 or kill_at > 2:  # the record's rename (write 2) is the commit point
                committed[cell_id] = steps
                damaged_record.discard(cell_id)
                damaged_curve.discard(cell_id)
        elif operation == "corrupt_record" and cell_id in committed:
            (cell_dir(root, cell_id) / RECORD).write_text('{"status": "ok", "cell_')
            damaged_record.add(cell_id)
        elif (
            operation == "corrupt_curve" and cell_id in committed and cell_id not in damaged_record
        ):
            curve_path(root, cell_id).write_bytes(b"PAR1 not a curve")
            damaged_curve.add(cell_id)
        elif operation == "collect":
            runs = collect(root).set_index("cell_id")  # never raises
            for cell, steps in committed.items():
                row = runs.loc[cell]
                if cell in damaged_record:
                    if cell in collected_ok:  # its last good copy is kept
                        assert row["status"] == "ok" and row["record_unreadable"]
                    else:
                        assert row["status"] == "unreadable"
                    continue
                assert row["status"] == "ok" and row["steps_completed"] == steps
                expected = "record" if cell in damaged_curve else "curve"
                assert row["judged_from"] == expected
                if expected == "curve":
                    assert len(read_curve(root, cell)) == steps  # its own, whole curve
                collected_ok.add(cell)
            assert set(runs.index) >= set(committed)


def test_a_diverged_runs_record_with_non_finite_per_layer_values_is_whole(tmp_path):
    """A diverged run's per-layer series hold inf and NaN, which JSON stores as null: its record
    is whole (collected, and resume keeps it), not damaged."""
    from helpers import make_cell

    from suite.run.runner import run_cell
    from suite.store import finished_record, read_records, write_cell

    record, curve = run_cell(make_cell(lr=30.0, steps=20))
    assert record["verdict"] == "diverged"
    record["final_act_rms_by_layer"] = [1.0, float("inf"), float("nan")]
    write_cell(tmp_path, record, curve)
    assert finished_record(tmp_path, record["cell_id"]) is not None
    [stored] = read_records(tmp_path)
    assert stored["status"] == "ok" and stored["final_act_rms_by_layer"][1] is None


def test_a_cell_id_with_an_exponent_learning_rate_parses():
    from suite.store import cell_from_id

    assert cell_from_id("preln-L6-lr1e-05-s0-abcdef0123")["lr"] == 1e-5
    assert cell_from_id("x-L2-lr3e-05-s1-llama-packed-0123456789") == {
        "variant": "x", "depth": 2, "lr": 3e-5, "seed": 1,
    }  # fmt: skip
