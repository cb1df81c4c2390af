"""The record schema (suite/record.py) is the one list of what a run records: every column is
documented, and everything a real run or a collect writes is declared there, of its kind."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import make_cell

from suite.analyze.collect import collect
from suite.record import COLUMNS, CURVE, KINDS, RECORD_COLUMNS, describe
from suite.run.runner import run_cell

STORE_V0_2_0 = Path(__file__).parent / "data" / "store_v0_2_0"


def _of_kind(value, kind: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True  # missing: the column does not apply to this run
    if kind == "list":
        return isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
    if kind == "json":
        return isinstance(value, str) and isinstance(json.loads(value), dict)
    python_type = {"str": str, "int": int, "float": int | float, "bool": bool}[kind]
    if kind == "int" and isinstance(value, float):
        return value.is_integer()  # pandas stores an int column with missing values as float
    return isinstance(value, python_type) and (kind == "bool" or not isinstance(value, bool))


def test_every_column_is_declared_once_with_a_kind_and_a_meaning():
    for columns in (COLUMNS, CURVE):
        names = [column.name for column in columns]
        assert len(names) == len(set(names))
        assert all(column.kind in KINDS for column in columns)
        undocumented = [column.name for column in columns if len(column.doc) < 10]
        assert undocumented == []
    assert all(f" {name} " in describe() for name in RECORD_COLUMNS)


@pytest.fixture(scope="module")
def trained():
    return run_cell(make_cell(steps=30))


def test_a_real_runs_record_and_curve_hold_only_declared_columns_of_their_kind(trained):
    record, curve = trained
    kinds = {column.name: column.kind for column in COLUMNS}
    undeclared = sorted(set(record) - set(kinds))
    assert undeclared == [], f"declare these in suite/record.py: {undeclared}"
    record = {**record, "config": json.dumps(record["config"])}  # as the collected table has it
    wrong = {k: v for k, v in record.items() if not _of_kind(v, kinds[k])}
    assert wrong == {}
    curve_kinds = {column.name: column.kind for column in CURVE}
    assert {key for row in curve for key in row} <= set(curve_kinds)
    assert all(_of_kind(v, curve_kinds[k]) for row in curve for k, v in row.items())
    # diagnostics on: every sampled curve column shows up within 30 steps, but the two of
    # particular variants (DyT/Derf's saturation, the multi-stream gain)
    particular = {"saturation_by_layer", "stream_amax_gain", "stream_share", "skipped"}
    assert {key for row in curve for key in row} == set(curve_kinds) - particular


def test_a_collected_table_holds_only_declared_columns_in_schema_order(tmp_path):
    store = shutil.copytree(STORE_V0_2_0, tmp_path / "store")
    (store / "cells" / "preln-L2-lr0.001-s0-dfc90f4a43" / "record.json").write_text("{bad")
    runs = collect(store)
    # record_unreadable shows up (one record was bad), pid does not (no cell is running), nor
    # pinned_gpu (no cell was pinned to a GPU)
    absent = ("pid", "pid_started", "pinned_gpu")
    assert list(runs.columns) == [c for c in RECORD_COLUMNS if c not in absent]
    kinds = {column.name: column.kind for column in COLUMNS}
    for name in runs.columns:
        values = [v.tolist() if hasattr(v, "tolist") else v for v in runs[name]]
        assert all(_of_kind(v, kinds[name]) for v in values), name
