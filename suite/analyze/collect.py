"""Collect: every record in the store → one pandas DataFrame (saved as Parquet) → summary.

Runs as a Hydra callback at the end of every sweep and as a command:

    python -m suite.collect [--store results] [--sweep quick]
    python -m suite.collect --watch [--every 10]    # a sweep's progress while it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from suite.analyze.progress import ProgressPrinter, watch
from suite.analyze.summary import format_summary, stored_config, summarize, with_arm_labels
from suite.analyze.why import budget_check, format_why
from suite.config import (
    ConfigError,
    VerdictConfig,
    identity_hash,
    store_path,
    verdict_config,
    verdict_from_overrides,
)
from suite.launch.launchers import LauncherError, launcher
from suite.mechanism import RULES_VERSION, diagnose
from suite.plan import CELL_POINTER, CLAIMED_MARKER, PLANS_ENV, SKIPPED_MARKER
from suite.record import OPTIONAL_COLUMNS, RECORD_COLUMNS
from suite.store import (
    RUNS,
    SUMMARY,
    UNREADABLE,
    read_records,
    write_table,
)
from suite.verdict import judge_stored, rule_description

log = logging.getLogger(__name__)


def collect(
    store: str | Path, write: bool = True, verdict: VerdictConfig | None = None
) -> pd.DataFrame:
    """All records under ``store`` as one DataFrame, every finished run judged from its stored
    curve with the ``verdict`` knobs (default: the suite's); also written to
    ``<store>/runs.parquet``."""
    verdict = verdict or VerdictConfig()
    records = latest_per_cell(read_records(store))
    records = [_clean(record) for record in records]
    for record in records:
        judge_record(record, store, verdict)
        if "packed" not in record and isinstance(record.get("config"), dict):
            # Written before packed cells were cells of their own (suite 0.3): from its config.
            train = record["config"].get("train")
            record["packed"] = isinstance(train, dict) and train.get("pack_lr") is True
        record["config"] = json.dumps(record.get("config"), sort_keys=True)
    runs = keep_last_good_rows(pd.DataFrame.from_records(records), Path(store) / RUNS)
    extra = [c for c in runs.columns if c not in RECORD_COLUMNS]
    declared = [c for c in RECORD_COLUMNS if c not in OPTIONAL_COLUMNS or c in runs.columns]
    runs = runs.reindex(columns=[*declared, *extra])
    if not runs.empty:
        runs = runs.sort_values(["variant", "depth", "lr", "seed"], kind="stable")
        runs = runs.reset_index(drop=True)
    runs = storable(runs)
    warn_mixed_corpora(runs)
    if write and not runs.empty:
        summary = summarize(with_arm_labels(runs)).reset_index()
        try:
            write_table(runs, Path(store) / RUNS)
            write_table(
                summary.assign(verdict_rule=rule_description(verdict)), Path(store) / SUMMARY
            )
        except OSError as error:  # a read-only store, a full disk: the table is still shown
            log.warning(
                "cannot write the collected table into %s (%s); nothing in the store changed",
                store,
                error.strerror or error,
            )
    return runs


def warn_mixed_corpora(runs: pd.DataFrame) -> list[str]:
    """A warning (logged, and returned) for every data setting whose cells read different text.

    Before the stdlib corpus was pinned, ``data=stdlib`` read the running Python's own library,
    so a store trained under another Python holds other text under the same cell ids; the
    summary, report and leaderboard would pool those cells with new ones as if one benchmark."""
    needed = {"config", "corpus_sha256", "status"}
    if runs.empty or not needed <= set(runs.columns):
        return []
    digest = runs["corpus_sha256"].map(lambda v: v if isinstance(v, str) and len(v) == 64 else None)
    settings = runs["config"].map(_data_setting)
    known = (runs["status"] == "ok") & digest.notna() & settings.notna()
    warnings = []
    for setting, digests in digest[known].groupby(settings[known], sort=True):
        counts = digests.value_counts()
        if len(counts) < 2:
            continue
        listed = ", ".join(f"{value[:12]}… in {n}" for value, n in counts.items())
        why = (
            "A store trained under another Python before the stdlib corpus was pinned? Re-run "
            "its older cells into a fresh store (docs/operations.md)"
            if "source=stdlib" in setting
            else "Was the file changed, or read from another directory (a relative path)?"
        )
        message = (
            f"cells trained with data {setting} read different text (corpus digests: {listed} "
            f"cells); the summary, report and leaderboard pool them as one benchmark. {why}"
        )
        log.warning(message)
        warnings.append(message)
    return warnings


def _data_setting(config: Any) -> str | None:
    data = stored_config(config).get("data")
    if not isinstance(data, dict):
        return None
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(data.items()) if v is not None) + "}"


def storable(runs: pd.DataFrame) -> pd.DataFrame:
    """The table with every column Parquet can hold, instead of one bad field making the whole
    store uncollectable: text that is not valid Unicode (a lone surrogate) is repaired, and a
    column of mixed values or of mappings (an undeclared field a plugin or a damaged record
    wrote) is kept as text, with a warning naming it."""
    runs = runs.rename(columns=lambda name: _valid_text(str(name)))
    for name in runs.columns:
        if runs[name].dtype != object:
            continue
        column = runs[name].map(_valid_text)
        holds_mappings = column.map(lambda v: isinstance(v, dict)).any()
        try:
            if holds_mappings:
                raise pa.ArrowTypeError("a mapping")
            pa.table({name: pa.array(column, from_pandas=True)})
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            log.warning("column %s holds values of several types; it is kept as text", name)
            column = column.map(lambda v: None if v is None else _as_text(v))
        runs[name] = column
    return runs


def _clean(value: Any) -> Any:
    """A record's text made valid Unicode at every depth (a lone surrogate, which JSON allows
    and nothing downstream can write, becomes '?')."""
    if isinstance(value, dict):
        return {_valid_text(k) if isinstance(k, str) else k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return _valid_text(value)


def _valid_text(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str, ensure_ascii=True)
    return _valid_text(str(value))


def keep_last_good_rows(runs: pd.DataFrame, previous_table: Path) -> pd.DataFrame:
    """A cell whose record file went bad keeps the row it had in the previous collected table
    (its last good copy), flagged ``record_unreadable``; without one it stays an ``unreadable``
    row. Either way the table never shrinks because a file went bad, and resume re-trains it."""
    if runs.empty or not (runs["status"] == UNREADABLE).any():
        return runs
    runs = runs.assign(record_unreadable=runs["status"] == UNREADABLE)
    try:
        previous = pd.read_parquet(previous_table).set_index("cell_id")
    except (OSError, ValueError, KeyError):
        return runs
    rows = []
    for _, row in runs.iterrows():
        cell_id = row["cell_id"]
        if row["status"] == UNREADABLE and cell_id in previous.index:
            old = previous.loc[cell_id]
            row = (old.iloc[0] if isinstance(old, pd.DataFrame) else old).copy()
            row["cell_id"], row["record_unreadable"] = cell_id, True
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def judge_record(record: dict[str, Any], store: str | Path, verdict: VerdictConfig) -> None:
    """Judge a finished run from its stored curve (suite.verdict), in place. A curve that is
    missing, unreadable or not the one the record describes (a different number of steps) leaves
    the record's own training-time judgement, marked ``judged_from = record``."""
    if record.get("status") != "ok":
        return
    record["verdict_rule"] = rule_description(verdict)
    try:
        judgement, curve = judge_stored(store, record, verdict)  # record already read
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as error:
        log.warning(
            "%s: cannot judge from its curve (%s); keeping the verdict recorded in training",
            record.get("cell_id"),
            error,
        )
        record["judged_from"] = "record"
        record["verdict_rule"] = "as recorded in training"
        return
    record.update(judgement.fields(), judged_from="curve")
    try:
        diagnosis = diagnose(
            curve,
            judgement.verdict,
            int(record["steps"]),
            diverged_step=record.get("diverged_step"),
            escape_step=judgement.escape_step,
            relapsed=judgement.relapsed,
            borderline=judgement.borderline,
            init_log_z=_number(record.get("init_log_z")),
        )
    except (ValueError, KeyError, TypeError, OverflowError) as error:
        # A damaged diagnostics column costs the mechanism only, never the verdict.
        log.warning("%s: no failure mechanism (%s)", record.get("cell_id"), error)
        record.update(failure_mechanism="unknown", mechanism_rule=f"m{RULES_VERSION}")
        return
    record.update(diagnosis.fields(), mechanism_rule=f"m{RULES_VERSION}")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def latest_per_cell(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per cell identity. A store written before a change of the cell id (e.g. label
    knobs leaving the hash) can hold the same cell under two ids once it is re-run; the identity
    is re-derived from each record's stored config. Of a cell's finished records the newest is
    kept; an unfinished one (errored, interrupted, running) is kept too when it is newer than
    that, so a failed re-run is shown, not hidden behind the older result (nor the result lost)."""
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        config = record.get("config")
        if isinstance(config, dict):  # one cell across the variant's revisions
            key = identity_hash({k: v for k, v in config.items() if k != "variant_revision"})
        else:
            key = str(record.get("cell_id"))
        by_cell.setdefault(key, []).append(record)
    kept = []
    for group in by_cell.values():
        group.sort(key=_recency)
        finished = [record for record in group if record.get("status") == "ok"]
        unfinished = [record for record in group if record.get("status") != "ok"]
        if finished:
            kept.append(finished[-1])
            unfinished = [r for r in unfinished if _recency(r) > _recency(finished[-1])]
        kept.extend(unfinished[-1:])
    superseded = len(records) - len(kept)
    if superseded:
        log.info("%d record(s) superseded by a later run of the same cell", superseded)
    return kept


def _started(record: dict[str, Any]) -> str:
    return str(record.get("started_at") or "")  # ISO 8601 UTC: sorts as text


def _recency(record: dict[str, Any]) -> tuple[int, str]:
    """A later revision of the variant first (a fix supersedes what it fixed), then the newer."""
    config = record.get("config")
    revision = config.get("variant_revision", 1) if isinstance(config, dict) else 1
    return int(revision or 1), _started(record)


def outdated_revisions(runs: pd.DataFrame) -> pd.Series:
    """Per variant, the rows trained by an older revision than the variant's current one (a fix
    since changed what it trains): their results are not the variant's as it is now."""
    if runs.empty or "variant" not in runs:
        return pd.Series(dtype=int)
    import variants  # only here: the registry imports torch, which analysis otherwise avoids

    current = {}
    for name in runs["variant"].dropna().unique():
        try:
            current[name] = variants.get(name).revision
        except variants.UnknownVariantError:
            continue  # a plugin not installed here: nothing to compare with
    recorded = runs.get("variant_revision", pd.Series(1, index=runs.index)).fillna(1)
    now = runs["variant"].map(current)
    old = runs[(runs["status"] == "ok") & now.notna() & (recorded < now)]
    return old.groupby("variant").size()


_UNFINISHED = (
    ("error", "errored (traceback in their record.json)"),
    (
        UNREADABLE,
        "with an unreadable record.json and no earlier collected row (re-running the same "
        "command re-trains them)",
    ),
    ("interrupted", "interrupted (re-run the same command to finish them)"),
    ("running", "still running"),
)


def report_text(runs: pd.DataFrame) -> str:
    lines = [format_summary(summarize(with_arm_labels(runs)))]
    labelled = with_arm_labels(runs)
    lines += ["\n" + text for text in (format_why(labelled), budget_check(labelled)) if text]
    if "record_unreadable" in runs:
        restored = runs[(runs["record_unreadable"] == True) & (runs["status"] != UNREADABLE)]  # noqa: E712
        if len(restored):
            lines.append(
                f"\n{len(restored)} cell(s) with an unreadable record.json, shown as last "
                "collected (re-running the same command re-trains them):"
            )
            lines.extend(f"  {cell_id}" for cell_id in restored["cell_id"])
    if "judged_from" in runs:
        unjudged = runs.loc[runs["judged_from"] == "record", "cell_id"]
        if len(unjudged):
            lines.append(
                f"\n{len(unjudged)} cell(s) whose curve is missing, unreadable or not the "
                "record's: judged as recorded in training (re-running the same command "
                "re-trains them):"
            )
            lines.extend(f"  {cell_id}" for cell_id in unjudged)
    for variant, count in outdated_revisions(runs).items():
        lines.append(
            f"\n{count} {variant} cell(s) were trained by an earlier revision of {variant}, "
            "before a fix that changes what it trains: re-run the same command to replace them"
        )
    for status, what in _UNFINISHED:
        cells = runs.loc[runs["status"] == status, "cell_id"] if not runs.empty else []
        if len(cells):
            lines.append(f"\n{len(cells)} cell(s) {what}:")
            lines.extend(f"  {cell_id}" for cell_id in cells)
    return "\n".join(lines)


def sweep_cell_ids(sweep_dir: str | Path) -> set[str]:
    """The cells of one sweep: one id per Hydra job, or one per line for a packed job."""
    pointers = Path(sweep_dir).glob(f"*/{CELL_POINTER}")
    return {cell_id for p in pointers for cell_id in p.read_text().split()}


def left_to_others(sweep_dir: str | Path) -> set[str]:
    """The cells of one sweep that another live sweep was training: this one left them to it."""
    markers = Path(sweep_dir).glob(f"*/{CLAIMED_MARKER}")
    return {cell_id for p in markers for cell_id in p.read_text().split()}


def count_skipped(sweep_dir: str | Path) -> int:
    """Cells skipped because the store had them (a packed job's marker holds its count)."""
    markers = Path(sweep_dir).glob(f"*/{SKIPPED_MARKER}")
    return sum(int(p.read_text().strip() or 1) for p in markers)


class CollectCallback(Callback):
    """At the end of a multirun: collect the whole store, print this sweep's summary. While a
    quiet launcher (SLURM, Ray, submitit local) runs the cells, print the sweep's progress every
    ``progress_every`` seconds."""

    _progress: ProgressPrinter | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Cluster launchers pickle the callbacks with the job; the printer's thread stays here.
        return {k: v for k, v in self.__dict__.items() if k != "_progress"}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        plans = [Path(p) for p in os.environ.get(PLANS_ENV, "").split(os.pathsep) if p]
        choice = str(config.hydra.runtime.choices.get("hydra/launcher") or "basic")
        try:
            quiet = not launcher(
                choice, str(config.hydra.launcher.get("_target_", ""))
            ).shows_cell_logs
        except LauncherError:
            quiet = True
        if plans and quiet:
            self._progress = ProgressPrinter(plans, float(config.progress_every))
            self._progress.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        store = store_path(config.store)
        try:
            runs = collect(store, verdict=verdict_config(config.get("verdict")))
        except Exception as error:  # Hydra would turn it into a warning and exit 0
            print(
                f"\ncollect failed: {type(error).__name__}: {error}; every finished cell's "
                f"record is kept in {store}/cells",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        sweep_dir = config.hydra.sweep.dir
        if runs.empty:
            if sweep_cell_ids(sweep_dir):
                print(f"\nnothing of this sweep is in {store}: every cell failed to write")
                raise SystemExit(1)
            return
        this_sweep = runs[runs["cell_id"].isin(sweep_cell_ids(sweep_dir))]
        skipped, others = count_skipped(sweep_dir), left_to_others(sweep_dir)
        reused = f", {skipped} already in the store (resume=false re-runs them)" if skipped else ""
        if others:
            reused += f", {len(others)} left to another sweep training them at the same time"
        print(
            f"\nSummary of this sweep ({len(this_sweep)} cells{reused}; "
            f"all runs: {Path(store) / RUNS}):"
        )
        print(report_text(this_sweep))
        missing = sorted(sweep_cell_ids(sweep_dir) - set(runs["cell_id"]) - others)
        if missing:
            print(
                f"\n{len(missing)} cell(s) of this sweep left nothing in the store (their "
                "process was killed, or could not write; re-running the same command trains "
                "them):"
            )
            print("\n".join(f"  {cell_id}" for cell_id in missing))
        unfinished = this_sweep[~this_sweep["cell_id"].isin(others)]
        if missing or (unfinished["status"] != "ok").any():
            raise SystemExit(1)  # the records are kept; the exit code tells scripts to look


def add_verdict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "verdict",
        nargs="*",
        metavar="verdict.KEY=VALUE",
        help="judge with other verdict knobs, e.g. verdict.stall_margin=0.2 (nothing re-trains)",
    )


def parse_verdict(parser: argparse.ArgumentParser, overrides: list[str]) -> VerdictConfig:
    """The verdict knobs given on the command line; a bad one exits 2 naming the key."""
    try:
        return verdict_from_overrides(overrides)
    except ConfigError as error:
        parser.exit(2, f"config error: {error}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results", help="results store (default: results)")
    parser.add_argument("--sweep", help="only runs of this sweep preset (e.g. quick)")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="show the progress of the store's running sweeps (cells done / running / queued) "
        "until they end",
    )
    parser.add_argument(
        "--every", type=float, default=10.0, help="seconds between --watch updates (default 10)"
    )
    add_verdict_arguments(parser)
    args = parser.parse_args(argv)
    if args.watch:
        if not 0 < args.every < 86400:
            parser.exit(2, f"config error: --every: must be > 0 s and < a day (got {args.every})\n")
        if args.sweep or args.verdict:
            parser.exit(
                2,
                "config error: --watch shows every running sweep's progress; "
                "--sweep and verdict knobs apply to the collected table, without --watch\n",
            )
        try:
            watch(args.store, args.every)
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        return
    runs = collect(args.store, verdict=parse_verdict(parser, args.verdict))
    if runs.empty:
        raise SystemExit(f"no records under {args.store}/cells")
    if args.sweep:
        runs = runs[runs["sweep"] == args.sweep]
    print(f"{len(runs)} runs collected into {Path(args.store) / RUNS}")
    print(report_text(runs))


if __name__ == "__main__":
    main()
