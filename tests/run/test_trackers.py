"""Experiment trackers (suite/run/trackers.py), read back through the real libraries: every
curve row and the record reach TensorBoard's event files, MLflow's SQLite store and W&B's
offline run file; a missing package is a config error naming the pip extra."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import make_cell

from suite.config import ConfigError
from suite.launch.cell import validate
from suite.run.runner import run_cell, run_pack

STEPS = 12


def tracked_cell(kind: str, where: Path, **overrides):
    cell = make_cell("preln", depth=2, steps=STEPS, **overrides)
    cell.tracker.kind, cell.tracker.dir = kind, str(where)
    return cell


def test_tensorboard_event_files_hold_every_step_and_the_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cell = tracked_cell("tensorboard", tmp_path)
    record, curve = run_cell(cell)
    events = EventAccumulator(str(tmp_path / cell.cell_id()), size_guidance={"scalars": 0})
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(STEPS))
    assert [e.value for e in loss] == pytest.approx([row["loss"] for row in curve])
    sampled = [e.step for e in events.Scalars("grad_norm_by_layer/block_2")]
    assert sampled == [row["step"] for row in curve if "grad_norm_by_layer" in row]
    assert events.Scalars("record/val_loss")[0].value == pytest.approx(record["val_loss"])
    assert {"record/text_summary", "tags/text_summary"} <= set(events.Tags()["tensors"])


def test_mlflow_sqlite_store_holds_every_step_the_tags_and_the_record(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cell = tracked_cell("mlflow", tmp_path)
    record, curve = run_cell(cell)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stability-suite").experiment_id])
    assert run.info.run_name == cell.cell_id() and run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "preln" and run.data.tags["depth"] == "2"
    assert run.data.tags["record.verdict"] == record["verdict"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(STEPS))
    assert run.data.metrics["record/val_loss"] == pytest.approx(record["val_loss"])


def wandb_records(path: Path):
    """The protobuf records of a W&B offline run file: its 7-byte header, then LevelDB's log
    format (32 KiB blocks; each chunk a CRC, a length and a type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending += chunk
        if kind in (1, 4):  # full or last: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
    assert not pending, "the run file ends inside a record: W&B had not finished writing it"


def test_wandb_offline_run_file_holds_every_step_and_the_record(tmp_path):
    pytest.importorskip("wandb")
    import json

    import wandb

    cell = tracked_cell("wandb", tmp_path)
    record, curve = run_cell(cell)
    # finish() returns before W&B's service process closes the run file: its last block (the
    # record's summary) was once still unwritten when read under CI's load. teardown() waits
    # for the service to exit, as the end of a sweep's process does.
    wandb.teardown()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary = [], {}
    for item in wandb_records(run_file):
        kind = item.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {h.key or "/".join(h.nested_key): h.value_json for h in item.history.item}
            )
        elif kind == "summary":
            summary.update(
                {s.key or "/".join(s.nested_key): s.value_json for s in item.summary.update}
            )
    steps = [json.loads(h["_step"]) for h in history]
    assert steps == list(range(STEPS))
    assert [json.loads(h["loss"]) for h in history] == pytest.approx([r["loss"] for r in curve])
    assert json.loads(summary["record/verdict"]) == record["verdict"]


def test_each_member_of_a_packed_run_is_its_own_tracker_run(tmp_path):
    pytest.importorskip("tensorboard")
    cells = [tracked_cell("tensorboard", tmp_path, lr=lr) for lr in (1e-3, 1e-2)]
    for cell in cells:
        cell.train.pack_lr = True
    run_pack(cells)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(c.cell_id() for c in cells)


def test_a_missing_tracker_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"tracker.kind: wandb .*stability-suite\[wandb\]"):
        validate(tracked_cell("wandb", tmp_path))


def test_no_tracker_by_default_writes_nothing(tmp_path):
    cell = make_cell("preln", depth=2, steps=3)
    cell.store = str(tmp_path)
    assert cell.tracker.kind == "none"
    run_cell(cell)
    assert not (tmp_path / "trackers").exists()


def test_a_failing_tracker_costs_a_log_line_never_the_cell(tmp_path, monkeypatch, caplog):
    from suite.run import trackers

    closed = []

    class Broken(trackers.Tracker):
        def __init__(self, cell, where) -> None:
            pass

        def log_row(self, step, row) -> None:
            raise OSError("disk full")

        def log_record(self, record) -> None:
            raise OSError("disk full")

        def close(self, failed: bool = False) -> None:
            closed.append(failed)  # ended (as failed) even though its record was not logged

    def unstartable(cell, where):
        raise RuntimeError("database is locked")

    for kind in (Broken, unstartable):
        monkeypatch.setitem(trackers.KINDS, "tensorboard", kind)
        record, curve = run_cell(tracked_cell("tensorboard", tmp_path))
        assert record["status"] == "ok" and len(curve) == STEPS
    assert "no more rows" in caplog.text and "tracker not started" in caplog.text
    assert "could not log the record" in caplog.text and closed == [True]


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_a_cell_that_errors_is_a_failed_run_in_the_tracker(tmp_path, monkeypatch, interruption):
    """A crashed or interrupted (Ctrl-C) cell shows as FAILED in MLflow's UI, not as finished
    or left running; a diverged cell is a result and finishes (the MLflow test above)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import suite.run.runner

    def explode(*args, **kwargs):
        raise interruption("simulated crash inside training")

    monkeypatch.setattr(suite.run.runner, "train", explode)
    if interruption is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):  # no record: the sweep's Ctrl-C handling goes on
            run_cell(tracked_cell("mlflow", tmp_path))
    else:
        record, _ = run_cell(tracked_cell("mlflow", tmp_path))
        assert record["status"] == "error"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stability-suite").experiment_id])
    assert run.info.status == "FAILED"
    if interruption is RuntimeError:
        assert run.data.tags["record.status"] == "error"


def test_cells_training_at_once_share_one_mlflow_database(tmp_path):
    """Two processes start their runs against one new SQLite store at the same moment."""
    pytest.importorskip("mlflow")
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.starmap(_mlflow_run, [(str(tmp_path), 1e-3), (str(tmp_path), 1e-2)])
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("stability-suite").experiment_id])
    assert sorted(r.data.tags["lr"] for r in runs) == ["0.001", "0.01"]


def _mlflow_run(where: str, lr: float) -> None:
    from suite.run.trackers import open_tracker

    tracker = open_tracker(tracked_cell("mlflow", Path(where), lr=lr))
    assert tracker is not None
    tracker.log_row(0, {"loss": 1.0})
    tracker.close()
