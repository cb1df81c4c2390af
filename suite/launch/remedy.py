"""``python -m suite.remedy --store S``: does the fix fix it? Re-runs a store's failed cells with
the published remedy for their failure mechanism (suite/mechanism.py) and shows, per mechanism,
whether the verdicts moved.

It reads the store's collected table (``<store>/runs.parquet``, which every sweep and
``python -m suite.collect`` write), and for each failed run whose mechanism has a remedy that
changes training (not ``abrupt``, whose setting only samples more often) rebuilds the run's
command line: ``+variant``, the preset, depth, LR and seed, plus every identity setting in which
the stored config differs from what the preset composes. A cell is only re-run when that command
line composes to exactly the stored cell (the same config hash); the remedy's overrides are then
added and the cells are trained as ordinary sweeps (``python -m suite ...``, one per variant,
depth, seed and remedy, LRs swept) into ``<store>/remedies`` (``--out``), a store of their own
so the remedied runs never pool with the originals. ``remedies.json`` there maps each original
cell to its remedied one; the outcome table is printed and written as ``remedy_outcomes.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from suite.config import ConfigError, result_defining
from suite.mechanism import MECHANISMS
from suite.store import RUNS, in_reference, resolve_store

log = logging.getLogger(__name__)

NOT_A_FIX = {"abrupt"}  # its setting samples more often; the cell would be the same
MANIFEST, OUTCOMES = "remedies.json", "remedy_outcomes.csv"
_PLAIN = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def hydra_value(value: Any) -> str:
    """A value as a Hydra command-line override writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, str) and _PLAIN.match(value):
        return value
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise ConfigError(f"cannot write {value!r} as a command-line value")


def _differences(stored: dict[str, Any], composed: dict[str, Any]) -> list[str]:
    """Overrides that take the composed cell's identity settings to the stored ones."""
    overrides = []
    for name, value in stored.items():
        mine = composed.get(name)
        if isinstance(value, dict) and name != "variant_params":
            for key, item in value.items():
                if not isinstance(mine, dict) or mine.get(key) != item:
                    overrides.append(f"{name}.{key}={hydra_value(item)}")
        elif name == "variant_params":
            for key, item in value.items():
                if (mine or {}).get(key) != item:
                    overrides.append(f"variant.{key}={hydra_value(item)}")
        elif name not in ("variant", "variant_revision", "seed") and value != mine:
            overrides.append(f"{name}={hydra_value(value)}")
    return overrides


def base_command(run: pd.Series, compositions: dict | None = None) -> list[str]:
    """The overrides that compose exactly the stored cell of ``run``; ConfigError if none do
    (``compositions``: Hydra's composed configs, kept from call to call; see sweep_cells)."""
    from suite.launch.preflight import sweep_cells  # composing needs Hydra and the registry

    config = json.loads(run["config"]) if isinstance(run["config"], str) else run["config"]
    preset = run.get("sweep") if run.get("sweep") not in (None, "", "custom") else None
    command = [f"+variant={run['variant']}", *([f"sweep={preset}"] if preset else [])]
    command += [f"model.depth={int(run['depth'])}", f"seed={int(run['seed'])}"]
    command += [f"optim.lr={hydra_value(float(run['lr']))}"]
    (_, cell), *_ = sweep_cells(command, compositions)
    differences = _differences(result_defining(config), cell.result_defining())
    if differences:  # composed again with them, to check they take it to the stored cell
        command += differences
        (_, cell), *_ = sweep_cells(command, compositions)
    if cell.config_hash() != run["config_hash"]:
        raise ConfigError(
            f"{run['cell_id']}: no command line composes its stored config (a setting the "
            "suite no longer has, or a --config-dir preset); not re-run"
        )
    return command


def remedy_overrides(command: list[str], mechanism: str) -> list[str]:
    """The command with the mechanism's remedy applied: its settings added, or, for a remedy
    that is another arrangement (``+variant=mhc``), the variant and its parameters replaced."""
    remedy = MECHANISMS[mechanism].setting.split()
    if any(item.startswith("+variant=") for item in remedy):
        command = [c for c in command if not c.startswith(("+variant=", "variant."))]
    return [*command, *remedy]


def plan(runs: pd.DataFrame, only: set[str] | None = None) -> list[dict[str, Any]]:
    """One entry per failed run (stalled, diverged or relapsed) that can be re-run with its
    remedy: original cell, mechanism, and the remedied command line (without the store)."""
    failed = runs[
        (runs["status"] == "ok")
        & runs["failure_mechanism"].fillna("").ne("")
        & (runs["verdict"].isin(["stalled", "diverged"]) | runs["relapsed"].eq(True))
    ]  # a borderline convergence has a mechanism too, but nothing to fix
    from suite.launch.preflight import sweep_cells

    entries, compositions = [], {}  # one composition per set of config groups, not per run
    for _, run in failed.iterrows():
        mechanism = run["failure_mechanism"]
        if mechanism not in MECHANISMS or mechanism in NOT_A_FIX:
            continue  # no remedy that changes training ("abrupt"; "unknown": a damaged curve)
        if only and mechanism not in only:
            continue
        try:
            command = remedy_overrides(base_command(run, compositions), mechanism)
            (_, remedied), *_ = sweep_cells(command, compositions)
        except ConfigError as error:
            log.warning("%s: not re-run (%s)", run["cell_id"], error)
            continue
        if remedied.config_hash() == run["config_hash"]:
            log.warning(
                "%s: already trained with its remedy (%s); not re-run",
                run["cell_id"],
                MECHANISMS[mechanism].setting,
            )
            continue
        entries.append(
            {
                "cell_id": run["cell_id"],
                "mechanism": mechanism,
                "command": command,
                "remedied_cell_id": remedied.cell_id(),
            }
        )
    return entries


def sweeps(entries: list[dict[str, Any]]) -> list[list[str]]:
    """The entries as few sweep command lines: the LRs of one otherwise equal command swept."""
    grouped: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for entry in entries:
        lr = next(c for c in entry["command"] if c.startswith("optim.lr="))
        rest = tuple(c for c in entry["command"] if c != lr)
        value = lr.split("=", 1)[1]
        if value not in grouped[rest]:
            grouped[rest].append(value)
    return [[*rest, f"optim.lr={','.join(lrs)}"] for rest, lrs in grouped.items()]


def outcomes(remedied: pd.DataFrame, manifest: list[dict]) -> pd.DataFrame:
    """Per mechanism: the remedy, how many failed runs were re-run, and their verdicts after."""
    after = remedied.set_index("cell_id")["verdict"] if not remedied.empty else pd.Series()
    rows = []
    for entry in manifest:
        verdict = after.get(entry["remedied_cell_id"], "not trained")
        rows.append({"mechanism": entry["mechanism"], "after": verdict})
    table = pd.DataFrame(rows, columns=["mechanism", "after"])
    if table.empty:
        return table
    counts = table.groupby(["mechanism", "after"]).size().unstack(fill_value=0)
    counts.columns.name = None
    counts.insert(0, "remedy", [MECHANISMS[name].setting for name in counts.index])
    counts.insert(1, "runs", table.groupby("mechanism").size())
    return counts.reset_index()


def merged_manifest(path: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's entries added to those an earlier run wrote (by original cell: this run's
    win), so that every remedied cell in the folder keeps its original."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = []
    mine = {entry["cell_id"] for entry in entries}
    kept = [e for e in earlier if isinstance(e, dict) and e.get("cell_id") not in mine]
    return [*kept, *entries]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m suite.remedy",
        description="Re-run a store's failed cells with the remedy for their failure mechanism "
        "and show whether the verdicts moved (docs/findings.md, Does the remedy fix it?).",
    )
    parser.add_argument("--store", default="results", help="the store whose failures to remedy")
    parser.add_argument("--out", help="where the remedied cells go (default <store>/remedies)")
    parser.add_argument("--only", help="comma-separated mechanisms to remedy (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps, train nothing")
    args = parser.parse_args(argv)
    store = resolve_store(Path(args.store).expanduser())
    out = Path(args.out).expanduser() if args.out else store / "remedies"
    if in_reference(out):
        sys.exit(
            f"config error: --out: {out} is in the suite's shipped reference results; name a "
            "store of your own for the remedied cells (--out results/remedies)"
        )
    try:
        runs = pd.read_parquet(store / RUNS)
    except (OSError, ValueError) as error:
        sys.exit(f"config error: --store: no collected table in {store} ({error})")
    if "failure_mechanism" not in runs:
        sys.exit(
            f"config error: {store / RUNS} was collected before failure mechanisms existed: "
            f"run python -m suite.collect --store {store} first"
        )
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - set(MECHANISMS))
    if unknown:
        sys.exit(f"config error: --only: unknown mechanism(s) {unknown}; known: {list(MECHANISMS)}")
    try:
        entries = plan(runs, only)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    if not entries:
        print("No failed run with a remedy to try.")
        return
    commands = [[sys.executable, "-m", "suite", *c, f"store={out}"] for c in sweeps(entries)]
    for command in commands:
        print(" ".join(command[1:]))
    if args.dry_run:
        return
    out.mkdir(parents=True, exist_ok=True)
    entries = merged_manifest(out / MANIFEST, entries)
    (out / MANIFEST).write_text(json.dumps(entries, indent=1))
    failed_sweeps = sum(subprocess.run(command).returncode != 0 for command in commands)
    remedied = pd.read_parquet(out / RUNS) if (out / RUNS).exists() else pd.DataFrame()
    table = outcomes(remedied, entries)
    table.to_csv(out / OUTCOMES, index=False)
    print(f"\nRemedies ({len(entries)} failed runs re-run; {out}):")
    print(table.to_string(index=False))
    if failed_sweeps:
        sys.exit(1)
