"""The results store: one folder per cell, written atomically; the interface to reporting.

    <store>/cells/<cell_id>/record.json          one flat record (columns: suite/record.py)
    <store>/cells/<cell_id>/curve-<token>.parquet  the per-step curve the record names (curve_file)
    <store>/cells/<cell_id>/curve.partial.parquet  the curve so far, while the cell trains
    <store>/cells/<cell_id>/running.json         while the cell trains; left behind if it was killed
    <store>/runs.parquet                         every record, collected into one table
    <store>/summary.parquet                      its per-(variant, depth) summary, with intervals

A cell's result is its record and the curve file the record names, replaced as a unit: the curve
is written under a new name first, then the record is replaced by an atomic rename (the commit
point), then older curve files are removed. A run killed at any point leaves the previous result
whole (its record still names its own curve) and its own progress only in the partial curve.
Every file is written to a unique temporary name first, so concurrent workers never interleave
bytes. Records written before this layout name no curve file; their curve is ``curve.parquet``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from suite.liveness import process_alive
from suite.record import record_problems

log = logging.getLogger(__name__)

RECORD = "record.json"
CURVE = "curve.parquet"  # the curve of a record that names none (stores written before)
PARTIAL_CURVE = "curve.partial.parquet"
UNREADABLE = "unreadable"  # the status of a cell whose record file cannot be read
RUNS = "runs.parquet"
SUMMARY = "summary.parquet"
RUNNING = "running.json"


def cell_dir(store: str | Path, cell_id: str) -> Path:
    return Path(store) / "cells" / cell_id


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


# mkstemp creates files readable by their owner only; a store is often shared by a group (a
# cluster's nodes and users), so every file gets the mode the user's umask gives a new file.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """NaN/inf become null: JSON has no such numbers and pandas reads null back as NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_started(store: str | Path, cell_id: str, marker: dict[str, Any]) -> None:
    """Mark a cell as running; a marker left without a record means the run was interrupted."""
    text = json.dumps(_json_safe(marker), indent=1, sort_keys=True)
    atomic_write(cell_dir(store, cell_id) / RUNNING, lambda tmp: Path(tmp).write_text(text))


def write_partial_curve(store: str | Path, cell_id: str, curve: list[dict[str, float]]) -> None:
    """(Re)write the curve of a cell in training; called periodically so a killed run keeps
    most of it. Never touches the curve of the cell's finished result."""
    path = cell_dir(store, cell_id) / PARTIAL_CURVE
    atomic_write(path, lambda tmp: pd.DataFrame(curve).to_parquet(tmp, index=False))


def write_cell(store: str | Path, record: dict[str, Any], curve: list[dict[str, float]]) -> Path:
    """Write a finished (or errored) cell as a unit: its curve under a new name, then its record
    naming that curve (the commit), then clean up older curves and the running marker."""
    folder = cell_dir(store, record["cell_id"])
    curve_file = f"curve-{uuid.uuid4().hex[:12]}.parquet"
    atomic_write(folder / curve_file, lambda tmp: pd.DataFrame(curve).to_parquet(tmp, index=False))
    text = json.dumps(_json_safe({**record, "curve_file": curve_file}), indent=1, sort_keys=True)
    atomic_write(folder / RECORD, lambda tmp: Path(tmp).write_text(text))
    for old in folder.glob("curve*.parquet"):
        if old.name != curve_file:
            old.unlink(missing_ok=True)
    (folder / RUNNING).unlink(missing_ok=True)
    return folder


def write_table(runs: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: runs.to_parquet(tmp, index=False))


# The reference results shipped with the suite: a store holding only its collected table (the
# curves stay with whoever trained it) and the environment it was measured in.
# A wheel carries it as the package data ``suite/reference_results`` (pyproject maps the
# checkout's reference/ onto it), so an installed suite has it too.
_INSTALLED_REFERENCE = Path(__file__).resolve().parent / "reference_results"
REFERENCE_ROOT = (
    _INSTALLED_REFERENCE
    if _INSTALLED_REFERENCE.is_dir()
    else Path(__file__).resolve().parent.parent / "reference"
)
REFERENCE = "reference"  # what a user types for the shipped reference wherever a store is read
ENVIRONMENT = "environment.json"


def reference_dir(name: str = "quick") -> Path:
    """The shipped reference of that name (``reference/<name>``): its runs.parquet and
    environment.json."""
    return REFERENCE_ROOT / name


def is_reference(store: str | Path) -> bool:
    """Whether a store as typed names the shipped reference: ``reference``, ``reference:<name>``."""
    text = str(store)
    return text == REFERENCE or text.startswith(f"{REFERENCE}:")


def in_reference(store: str | Path) -> bool:
    """Whether a store names the shipped reference or a folder in it: no place to write."""
    if is_reference(store):
        return True
    path, root = Path(store).expanduser().resolve(), REFERENCE_ROOT.resolve()
    if path == root or root in path.parents:
        return True
    # By identity too: on a case-insensitive filesystem (macOS, Windows) `Reference/Quick` is the
    # same folder under a spelling no path comparison catches.
    return root.is_dir() and any(_same_folder(folder, root) for folder in (path, *path.parents))


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.is_dir() and a.samefile(b)
    except OSError:
        return False


def resolve_store(store: str | Path) -> Path:
    """A store as typed: the shipped reference's folder for ``reference`` (or
    ``reference:<name>``), anything else a folder."""
    if is_reference(store):
        return reference_dir(str(store).partition(":")[2] or "quick")
    return Path(store)


def column(table: pd.DataFrame, name: str, default: object = None) -> pd.Series:
    """A column of a collected table, or ``default`` on every row of a table written before the
    column existed (and in its missing values, when a default is given)."""
    if name not in table:
        return pd.Series([default] * len(table), index=table.index)
    return table[name] if default is None else table[name].fillna(default)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (an environment, a calibration, a wall-time log); {} when it is
    missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    """``value`` as indented JSON (non-ASCII kept: arm labels carry "·"), written atomically."""
    text = json.dumps(value, indent=1, ensure_ascii=False) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_environment(store: str | Path) -> dict[str, Any]:
    """A shipped reference's environment (where and how it was measured); {} when none."""
    return read_json(resolve_store(store) / ENVIRONMENT)


# Where ``python -m suite.reference calibrate`` says whether this machine reproduces the reference.
CALIBRATION_STORE = "results/calibration"
CALIBRATION = "calibration.json"


def read_calibration(store: str | Path = CALIBRATION_STORE) -> dict[str, Any]:
    """The last calibration's outcome in that store; {} when there was none."""
    return read_json(Path(store) / CALIBRATION)


def calibrated_arm(entry: Any) -> tuple[str, str, str]:
    """The arm a calibration entry (or a reference row) is of: (variant, backbone, recipe); an
    entry written before calibrations named their recipe checked the controlled arm."""
    recipe = entry.get("recipe")
    missing = recipe is None or pd.isna(recipe)
    return (
        str(entry.get("variant")),
        str(entry.get("backbone")),
        "controlled" if missing else str(recipe),
    )


def arm_key(variant: str, backbone: str, recipe: str = "controlled") -> str:
    """How a reference's environment.json names an arm: "dyt · gpt2", "dyt · gpt2 · authors"."""
    return f"{variant} · {backbone}" + (f" · {recipe}" if recipe != "controlled" else "")


def arm_shipped_at(environment: dict[str, Any], key: str) -> str | None:
    """When the reference's cells of an arm were shipped: the ship that first shipped these very
    runs (``arm_shipped_at``; a reference shipped before it had that names kept arms in
    ``kept_arms`` and dates the rest by the ship itself)."""
    dated = environment.get("arm_shipped_at", {})
    if isinstance(dated, dict) and dated.get(key):
        return str(dated[key])
    kept = environment.get("kept_arms", {})
    entry = kept.get(key) if isinstance(kept, dict) else None
    if isinstance(entry, dict) and entry.get("shipped_at"):
        return str(entry["shipped_at"])
    shipped_at = environment.get("shipped_at")
    return None if shipped_at is None else str(shipped_at)


def checks_the_shipped_runs(
    entry: dict[str, Any], calibration: dict[str, Any], environment: dict[str, Any]
) -> bool:
    """Whether a calibration entry checked its arm's runs as the reference ships them now: it
    checked a ship no older than the one that first shipped them (an entry written before
    entries carried their own ship date goes by its file's)."""
    checked = entry.get("reference_shipped_at") or calibration.get("reference_shipped_at")
    made = arm_shipped_at(environment, arm_key(*calibrated_arm(entry)))
    return checked is not None and made is not None and str(checked) >= made


def read_runs(store: str | Path) -> pd.DataFrame:
    """The store's collected table as the last collect wrote it; FileNotFoundError, saying how
    to make it, when there is none. ``reference`` reads the shipped reference."""
    path = resolve_store(store) / RUNS
    if not path.exists():
        if is_reference(store):
            raise FileNotFoundError(
                f"{store}: no shipped reference at {path.parent} "
                "(python -m suite.reference run makes it)"
            )
        raise FileNotFoundError(
            f"{store} has no {RUNS}: collect it first (python -m suite.collect --store {store})"
        )
    return pd.read_parquet(path)


def finished_record(store: str | Path, cell_id: str) -> dict[str, Any] | None:
    """The cell's record if it finished (status ok), is whole, and its curve is the one it
    describes; None if absent, errored, unreadable, damaged, or its curve is missing, unreadable
    or of another length, so that resume trains the cell again (what collect says it will do)."""
    try:
        record = json.loads((cell_dir(store, cell_id) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok":
        return None
    problems = record_problems(record)
    if problems:
        log.warning("%s: its record is damaged (%s); it is trained again", cell_id, problems[0])
        return None
    try:
        path = curve_path(store, cell_id, record)
        rows = pq.read_metadata(path).num_rows
        losses = pq.read_schema(path).field("loss").type if rows else None
    except (OSError, ValueError, KeyError):
        log.warning("%s: its curve is missing or unreadable; it is trained again", cell_id)
        return None
    if losses is not None and not (pa.types.is_floating(losses) or pa.types.is_integer(losses)):
        log.warning("%s: its curve's losses are not numbers; it is trained again", cell_id)
        return None
    if rows != curve_length(record):
        log.warning(
            "%s: its curve has %d steps, its record %s; it is trained again",
            cell_id,
            rows,
            curve_length(record),
        )
        return None
    return record


def curve_length(record: dict[str, Any]) -> int | None:
    """The rows a finished record's curve must have: its steps, and the diverging one."""
    try:
        return int(record["steps_completed"]) + (record.get("diverged_step") is not None)
    except (KeyError, TypeError, ValueError):
        return None


def _process_alive(marker: dict[str, Any]) -> bool:
    # Another machine's run: assume it is still going.
    return process_alive(marker) is not False


# <variant>-L<depth>-lr<lr>-s<seed>[-<tag>...]-<10 hex digits> (tags: CellConfig.id_tags)
_CELL_ID = re.compile(
    r"^(?P<variant>.+)-L(?P<depth>\d+)-lr(?P<lr>[0-9.]+(?:e[+-]\d+)?|inf)-s(?P<seed>\d+)"
    r"(?:-[a-z][a-z0-9_]*)*-[0-9a-f]{10}$"
)


def cell_from_id(cell_id: str) -> dict[str, Any]:
    """Variant, depth, LR and seed as a cell id spells them (for a cell whose record is lost)."""
    match = _CELL_ID.match(cell_id)
    if match is None:
        return {}
    try:
        lr = float(match["lr"])
    except ValueError:
        return {}
    return {
        "variant": match["variant"],
        "depth": int(match["depth"]),
        "lr": lr,
        "seed": int(match["seed"]),
    }


def read_records(store: str | Path) -> list[dict[str, Any]]:
    """Every record under the store, plus a row for each cell that started but has no record
    (``interrupted``, or ``running`` while its process lives). A record that cannot be read, or
    is not a record of its folder's cell, becomes a row with status ``unreadable`` (and a
    warning naming it), so the cell is never silently dropped."""
    records = []
    for folder in sorted(Path(store).glob("cells/*")):
        record_path, marker_path = folder / RECORD, folder / RUNNING
        path = record_path if record_path.exists() else marker_path
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or record.get("cell_id") != folder.name:
                raise ValueError("not a record of this cell")
            problems = record_problems(record)
            if problems:
                raise ValueError(f"damaged: {'; '.join(problems)}")
        except (OSError, ValueError) as error:
            log.warning("unreadable record %s: %s", path, error)
            records.append(
                {
                    **cell_from_id(folder.name),
                    "cell_id": folder.name,
                    "status": UNREADABLE,
                    "error": str(error),
                }
            )
            continue
        if path is marker_path:
            record["status"] = "running" if _process_alive(record) else "interrupted"
        records.append(record)
    return records


def curve_path(store: str | Path, cell_id: str, record: dict[str, Any] | None = None) -> Path:
    """The curve of the cell's result: the file its record names; for a record that names none
    (written before), ``curve.parquet``; for a cell without a readable record (interrupted or
    still running), the partial curve. A caller that has read the record already passes it."""
    folder = cell_dir(store, cell_id)
    if record is None:
        try:
            record = json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            return folder / PARTIAL_CURVE if not (folder / CURVE).exists() else folder / CURVE
    named = record.get("curve_file") if isinstance(record, dict) else None
    if isinstance(named, str) and named and Path(named).name == named:
        return folder / named
    return folder / CURVE


def read_curve(
    store: str | Path, cell_id: str, record: dict[str, Any] | None = None
) -> pd.DataFrame:
    return pd.read_parquet(curve_path(store, cell_id, record))


def read_curve_columns(
    store: str | Path, cell_id: str, record: dict[str, Any] | None = None
) -> dict[str, list[Any]]:
    """A cell's stored curve, column by column (list columns as Python lists; empty for a
    zero-step run). Raises OSError or ValueError when the curve is missing or unreadable, or
    has no loss column."""
    path = curve_path(store, cell_id, record)
    table = pd.read_parquet(path)
    if not table.empty and "loss" not in table:
        raise ValueError(f"{path} has no loss column")
    return {column: [_plain(value) for value in table[column].tolist()] for column in table.columns}


def _plain(value: Any) -> Any:
    """A stored list cell (a numpy array) as a list; anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, float) else value
