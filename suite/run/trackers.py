"""Experiment trackers: each cell's curve and record, logged to TensorBoard, MLflow or Weights &
Biases through their own libraries (``tracker=tensorboard|mlflow|wandb``; off by default).

One tracker run per cell, named by its cell id and tagged with variant, depth, LR, seed,
backbone and recipe. The curve goes in live, from an observer in the step loop
(suite/run/observers.py): every numeric column of each row, a per-layer list as one series per
block (``grad_norm_by_layer/block_3``), booleans as 0/1; non-finite values (a diverging step)
are left out, as the trackers disagree on how to store them. When the cell ends, the runner
logs its record: the numbers as a summary, the verdict and the identity as tags or text.

Where each writes (``tracker.dir``, default ``<store>/trackers/<kind>``):

- tensorboard: event files in ``<dir>/<cell_id>/`` (``tensorboard --logdir <dir>``);
- mlflow: the SQLite store ``<dir>/mlflow.db``, experiment ``stability-suite``
  (``mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db``);
- wandb: offline runs in ``<dir>/wandb/`` (``wandb sync <dir>/wandb/offline-run-*`` uploads).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from suite.config import TRACKERS, CellConfig, ConfigError
from suite.run.observers import Curve, Observer, StepEvent

PROJECT = "stability-suite"
log = logging.getLogger(__name__)


def check_installed(kind: str) -> None:
    """A ConfigError naming the pip extra when the tracker's package is missing."""
    module, extra = TRACKERS[kind]
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"tracker.kind: {kind} needs the {module} package, which is not installed: "
            f"pip install 'stability-suite[{extra}]' (or pip install -e '.[{extra}]')"
        )


def tracker_dir(cell: CellConfig) -> Path:
    chosen = cell.tracker.dir or str(Path(cell.store) / "trackers" / cell.tracker.kind)
    return Path(os.path.expanduser(chosen))


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a curve row or a record, lists as one entry per block."""
    out: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, list | tuple):
            for block, item in enumerate(value, start=1):
                _put(out, f"{name}/block_{block}", item)
        else:
            _put(out, name, value)
    return out


def _put(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, bool) or isinstance(value, int | float) and math.isfinite(value):
        out[name] = float(value)


def tags(cell: CellConfig) -> dict[str, str]:
    return {
        "cell_id": cell.cell_id(),
        "variant": cell.variant,
        "depth": str(cell.model.depth),
        "lr": f"{cell.optim.lr:g}",
        "seed": str(cell.seed),
        "backbone": cell.model.backbone,
        "recipe": cell.recipe,
        "sweep": cell.sweep,
    }


def _record_text(record: Mapping[str, Any]) -> dict[str, str]:
    """The record's words (verdict, mechanism, status, device, ...), each as text."""
    return {
        name: str(value)
        for name, value in record.items()
        if isinstance(value, str) and name not in ("error", "config") and value
    }


class Tracker:
    """One cell's tracker run: ``log_row`` every step, ``log_record`` once, then ``close``;
    ``close(failed=True)`` where the cell errored or its record could not be logged, so that the
    tracker's own UI shows the run as failed (a diverged cell is a result: it closes as done)."""

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def log_record(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    def __init__(self, cell: CellConfig, where: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(where / cell.cell_id()))
        self.writer.add_text("tags", json.dumps(tags(cell), sort_keys=True))
        self.last_step = 0

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        self.last_step = step
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, step)

    def log_record(self, record: Mapping[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(f"record/{name}", value, self.last_step)
        self.writer.add_text("record", json.dumps(_record_text(record), sort_keys=True))

    def close(self, failed: bool = False) -> None:
        # TensorBoard has no run status: the record's text (status, error) says it.
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, cell: CellConfig, where: Path) -> None:
        from mlflow.tracking import MlflowClient

        where.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{where / 'mlflow.db'}"
        # Cells training at once would each create the database's tables and the experiment:
        # one at a time (a lock file beside the database; the machine's cells share it).
        with open(where / "mlflow.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiment = self.client.get_experiment_by_name(PROJECT)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
            )
            run = self.client.create_run(experiment_id, run_name=cell.cell_id(), tags=tags(cell))
        self.run_id = run.info.run_id
        self.last_step = 0

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        self.last_step = step
        stamp = 0  # the step orders the series; a wall-clock stamp would make reruns differ
        metrics = [Metric(n, v, stamp, step) for n, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_record(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        numbers = [Metric(f"record/{n}", v, 0, self.last_step) for n, v in scalars(record).items()]
        words = [RunTag(f"record.{n}", v[:5000]) for n, v in _record_text(record).items()]
        self.client.log_batch(self.run_id, metrics=numbers, tags=words)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    def __init__(self, cell: CellConfig, where: Path) -> None:
        import wandb

        where.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode="offline",
            dir=str(where),
            project=PROJECT,
            name=cell.cell_id(),
            tags=[f"{k}={v}" for k, v in tags(cell).items() if k != "cell_id"],
            config=tags(cell),
            reinit="create_new",
        )

    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        # Committed now, not when the next step or finish() arrives: the last step's row was
        # once missing from an offline run file written under heavy load.
        self.run.log(scalars(row), step=step, commit=True)

    def log_record(self, record: Mapping[str, Any]) -> None:
        summary = {f"record/{n}": v for n, v in scalars(record).items()}
        summary.update({f"record/{n}": v for n, v in _record_text(record).items()})
        self.run.summary.update(summary)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a run with exit code 1 as failed


KINDS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def open_tracker(cell: CellConfig) -> Tracker | None:
    """The cell's tracker run, or None when ``tracker.kind=none`` or when the tracker cannot
    start (logged: a tracker never costs a cell its training or its record)."""
    if cell.tracker.kind == "none":
        return None
    check_installed(cell.tracker.kind)
    try:
        return KINDS[cell.tracker.kind](cell, tracker_dir(cell))
    except Exception as error:  # the tracker's own failure: a full disk, a locked database, ...
        log.warning("%s: %s tracker not started (%s)", cell.cell_id(), cell.tracker.kind, error)
        return None


class TrackerRows(Observer):
    """Hands each curve row to the cell's tracker as the step loop records it; a tracker that
    fails is logged once and then left alone, and training goes on."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.failed = tracker, False

    def after_step(self, event: StepEvent, curve: Curve) -> dict[str, Any]:
        if not self.failed:
            try:
                self.tracker.log_row(event.step, curve[-1])
            except Exception as error:
                self.failed = True
                log.warning("the tracker failed at step %d (%s); no more rows", event.step, error)
        return {}
