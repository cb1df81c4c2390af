"""``python -m suite.compare``: is A more stable, or better, than B, beyond what the seeds allow?

Two arms of one store (``python -m suite.compare preln postln``), the same arm in two stores
(``python -m suite.compare --store mine --against results preln``: did a change to the suite or
to a variant move anything?), or an arm of the store against another's
(``python -m suite.compare mine postln --against reference``: the shipped reference results,
with a note on whether this machine reproduced that baseline: suite/launch/reference.py).
Runs are matched by cell (depth, learning rate and, where both sides ran the same seeds, seed),
on the LR grid both sides ran; every other training setting (width, steps, schedule, data, ...)
must agree, or the comparison is refused naming the setting.
Per depth (and the rate over all depths too) it reports, A − B:

- the convergence rate over the matched runs, with Newcombe's hybrid score interval for a
  difference of two proportions (suite/analyze/statistics.py). It treats the two arms' runs as
  independent, which is conservative for runs matched by LR (their outcomes correlate);
- per seed, the best validation loss over the LR grid, the steps on the plateau (the restricted
  mean: a run that never left it counts its budget) and the max stable LR (the largest LR at
  which that seed converged, in grid steps), compared with a paired t-test over the seeds both
  sides ran, or Welch's t-test for two sets of seeds. Its p-value is never taken below the
  smallest one that many seeds can give at all (a sign test's 2·½ⁿ; a permutation test's
  2 / C(n_a + n_b, n_a)): two seeds that agree by luck are not evidence, so with two or three
  seeds these rows say "no detectable difference" whatever they show, with no interval and an
  infinite ``detectable``;
- Holm's step-down adjustment of the p-values over every row printed: it holds the chance of
  any false "better" at 5 % whatever the dependence between the rows (they share runs, which
  Benjamini–Hochberg's guarantee would need to assume away), at some cost in power;
- a verdict per row (A better / B better at Holm-adjusted p < 0.05, else no detectable
  difference) and the smallest difference these runs could have detected: for the rate, the
  smallest gap whose interval would exclude zero at these run counts; for the per-seed rows,
  the t interval's half-width.

The intervals shown are unadjusted 95 % intervals; the verdict uses the adjusted p-value.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields

import numpy as np
import pandas as pd

from suite.analyze.statistics import (
    holm,
    newcombe_interval,
    newcombe_p_value,
    smallest_p,
    t_critical,
    t_two_sided_p,
)
from suite.analyze.summary import ok_runs, with_arm_labels
from suite.config import SECTIONS, CellConfig, OptimConfig, TrainConfig
from suite.record import GROUPS
from suite.store import (
    CALIBRATION_STORE,
    calibrated_arm,
    checks_the_shipped_runs,
    is_reference,
    read_calibration,
    read_environment,
    resolve_store,
)
from suite.store import read_runs as read_collected
from suite.verdict import CONVERGED

ALPHA = 0.05
# Settings that may differ between the sides: the compared axis itself, and what follows from it.
COMPARED = {"variant", "variant_params", "variant_source", "variant_revision", "n_params"}
MATCHED = {"depth", "lr", "seed"}  # how runs are matched, not a setting to agree on
ENVIRONMENT = ("device_name", "torch_version", "suite_version")


class CompareError(ValueError):
    """What is missing or mismatched, in one line."""


@dataclass
class Side:
    name: str  # "preln", or "preln in results/mine"
    runs: pd.DataFrame  # finished runs of one arm


def arm_runs(runs: pd.DataFrame, arm: str, where: str) -> pd.DataFrame:
    """The finished runs of one arm (as the summary labels it, spaces optional: ``preln·llama``)."""
    finished = ok_runs(runs)
    labelled = with_arm_labels(finished).assign(variant_name=finished["variant"])
    wanted = arm.replace(" ", "")
    found = labelled[labelled["variant"].str.replace(" ", "") == wanted]
    if found.empty:
        arms = ", ".join(sorted(labelled["variant"].unique())) or "none"
        raise CompareError(f"{where} has no finished runs of {arm!r}; it has: {arms}")
    return found


def training_settings(runs: pd.DataFrame) -> list[str]:
    """The columns that define how a run trained, beside the compared and the matched axes."""
    config = [column.name for column in GROUPS["config"]] + ["corpus_sha256"]
    return [c for c in config if c in runs and c not in COMPARED | MATCHED]


def check_comparable(a: Side, b: Side, ignore: set[str] = frozenset()) -> list[str]:
    """Refuse to pool cells whose settings differ beyond the compared axis (and ``ignore``);
    the differences that are part of the compared axis, as notes."""
    notes = []
    for column in training_settings(pd.concat([a.runs, b.runs])):
        if column in ignore:
            continue
        values_a, values_b = _settings(a.runs, column), _settings(b.runs, column)
        if values_a != values_b and column == "weight_decay" and _variants_differ(a, b):
            # A variant that trains without weight decay (nGPT, as its paper does) records 0
            # whatever the sweep set: between two variants, that is part of what is compared.
            without = [side.name for side, v in ((a, values_a), (b, values_b)) if v == {"0.0"}]
            if without:
                notes.append(f"{without[0]} trained without weight decay (its own recipe)")
                continue
        if values_a != values_b and column == "recipe":
            # An arm is (variant, backbone, recipe): DyT with its authors' recipe against DyT, or
            # against a plugin, asks what the recipe (and the variant) changes.
            notes.append(
                f"recipes differ ({a.name}: {', '.join(sorted(values_a))}; {b.name}: "
                f"{', '.join(sorted(values_b))}): part of what is compared"
            )
            continue
        if values_a != values_b and column == "corpus_sha256":
            names = {*a.runs.get("corpus", []), *b.runs.get("corpus", [])}
            why = (
                " (before the stdlib corpus was pinned, a store trained under another Python "
                "read that Python's own library)"
                if names == {"python-stdlib"}
                else ""
            )
            raise CompareError(
                f"they trained on different text: {a.name} on {_corpora(a.runs)}, {b.name} on "
                f"{_corpora(b.runs)}{why}; compare runs of one corpus"
            )
        if values_a != values_b:
            raise CompareError(
                f"{column} differs: {a.name} has {sorted(values_a)}, {b.name} {sorted(values_b)}; "
                "compare runs of the same preset and settings"
            )
    return notes


def _variants_differ(a: Side, b: Side) -> bool:
    def names(side: Side) -> set[str]:
        column = "variant_name" if "variant_name" in side.runs else "variant"
        return set(side.runs[column])

    return names(a) != names(b)


def check_same_rule(a: Side, b: Side) -> None:
    """Verdicts judged with other knobs are other outcomes (a training-time verdict, from a curve
    that could not be read, is the default rule's)."""

    def rules(side: Side) -> set[str]:
        judged = side.runs.get("verdict_rule", pd.Series(dtype=str)).dropna()
        return set(judged) - {"as recorded in training"}

    if rules(a) and rules(b) and rules(a) != rules(b):
        raise CompareError(
            f"verdict_rule differs: {a.name} was judged by {sorted(rules(a))}, {b.name} by "
            f"{sorted(rules(b))}; collect both with the same verdict knobs"
        )


def _corpora(runs: pd.DataFrame) -> str:
    columns = [c for c in ("corpus", "corpus_sha256", "python_version") if c in runs]
    seen = runs[columns].drop_duplicates().astype(str).to_dict("records")
    return "; ".join(
        f"{row.get('corpus', '?')} {row.get('corpus_sha256', '?')[:12]}… "
        f"(Python {row.get('python_version', '?')})"
        for row in seen
    )


def _settings(runs: pd.DataFrame, column: str) -> set[str]:
    """A setting's values; a run recorded before the setting existed trained at its default."""
    values = runs[column] if column in runs else pd.Series([None] * len(runs), dtype=object)
    return {str(v) for v in values.astype(object).where(values.notna(), _default(column))}


# Record columns named otherwise in the config (suite/run/runner.py's base_record).
_CONFIG_NAME = {"optimizer": (OptimConfig, "name"), "packed": (TrainConfig, "pack_lr")}


def _default(column: str) -> object:
    """A setting's default as its record column holds it, for runs recorded before it existed."""
    schema, name = _CONFIG_NAME.get(column, (None, column))
    for section in [schema] if schema else [CellConfig, *SECTIONS.values()]:
        for spec in fields(section):
            if spec.name != name:
                continue
            if spec.default is not MISSING:
                return spec.default
            if spec.default_factory is not MISSING and column == "no_decay":
                return json.dumps(sorted(spec.default_factory()))
    return None


def common_cells(a: Side, b: Side) -> tuple[Side, Side, bool]:
    """Both sides cut to the (depth, LR) cells both ran; whether their seeds match (paired)."""
    cells_a = set(zip(a.runs["depth"], a.runs["lr"], strict=True))
    cells_b = set(zip(b.runs["depth"], b.runs["lr"], strict=True))
    both = cells_a & cells_b
    if not both:
        raise CompareError(
            f"no common cells: {a.name} ran depths {_listed(a.runs['depth'])} at LRs "
            f"{_listed(a.runs['lr'])}, {b.name} depths {_listed(b.runs['depth'])} at LRs "
            f"{_listed(b.runs['lr'])}"
        )

    def cut(side: Side) -> Side:
        keep = [cell in both for cell in zip(side.runs["depth"], side.runs["lr"], strict=True)]
        return Side(side.name, side.runs[keep])

    a, b = cut(a), cut(b)
    paired = set(a.runs["seed"]) == set(b.runs["seed"])
    return a, b, paired


def _listed(values: pd.Series) -> str:
    return " ".join(f"{v:g}" for v in sorted(set(values)))


def detectable_rate_gap(n_a: int, n_b: int, pooled: float) -> float:
    """The smallest gap in convergence rate around ``pooled`` whose interval excludes zero."""
    for gap in np.arange(0.01, 1.001, 0.01):
        p_a, p_b = min(1.0, pooled + gap / 2), max(0.0, pooled - gap / 2)
        lo, _ = newcombe_interval(round(p_a * n_a), n_a, round(p_b * n_b), n_b)
        if lo > 0:
            return float(gap)
    return math.nan


# A metric of one seed's runs at one depth; ``higher_is_better`` says which way is better.
@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[[pd.DataFrame, list[float]], float]
    higher_is_better: bool


def _best_val_loss(runs: pd.DataFrame, grid: list[float]) -> float:
    losses = runs["val_loss"].dropna()
    return float(losses.min()) if len(losses) else math.nan


def _stable_steps(runs: pd.DataFrame, grid: list[float]) -> float:
    converged = runs.loc[runs["verdict"] == CONVERGED, "lr"]
    return float(grid.index(converged.max())) if len(converged) else -1.0


def _plateau_steps(runs: pd.DataFrame, grid: list[float]) -> float:
    """The restricted mean time on the plateau: a run that never left it counts its budget."""
    budget = runs["steps"].astype(float)
    return float(runs["escape_step"].astype(float).fillna(budget).clip(upper=budget).mean())


METRICS = (
    Metric("best val loss", _best_val_loss, higher_is_better=False),
    Metric("steps on plateau", _plateau_steps, higher_is_better=False),
    Metric("max stable LR (grid steps)", _stable_steps, higher_is_better=True),
)


def seed_difference(
    a: pd.DataFrame, b: pd.DataFrame, paired: bool, metric: Metric, grid: list[float]
) -> dict[str, float]:
    """A − B of the metric's per-seed values: a paired t-test on the seeds both ran, or Welch's
    for two sets of seeds; its 95 % interval, p (never below what these seeds can show:
    :func:`smallest_p`) and the smallest difference it could have detected."""
    per_a = a.groupby("seed").apply(metric.compute, grid, include_groups=False).dropna()
    per_b = b.groupby("seed").apply(metric.compute, grid, include_groups=False).dropna()
    row = {"a": per_a.mean(), "b": per_b.mean(), "difference": per_a.mean() - per_b.mean()}
    if paired:
        differences = (per_a - per_b).dropna()
        n, floor = len(differences), smallest_p(len(differences))
        se = differences.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        df = n - 1
    else:
        n, floor = min(len(per_a), len(per_b)), smallest_p(len(per_a), len(per_b))
        var_a = per_a.var(ddof=1) / len(per_a) if len(per_a) > 1 else math.nan
        var_b = per_b.var(ddof=1) / len(per_b) if len(per_b) > 1 else math.nan
        se = math.sqrt(var_a + var_b)
        df = (var_a + var_b) ** 2 / (
            var_a**2 / (len(per_a) - 1) + var_b**2 / (len(per_b) - 1)
        ) if se > 0 else max(1, len(per_a) + len(per_b) - 2)  # fmt: skip
    if n < 2 or math.isnan(se):
        return {**row, "lo": math.nan, "hi": math.nan, "p": math.nan, "detectable": math.nan}
    if floor >= ALPHA:  # no interval these seeds cannot back: they cannot show any difference
        return {**row, "lo": math.nan, "hi": math.nan, "p": floor, "detectable": math.inf}
    critical = t_critical(df)
    if se == 0:
        p = 1.0 if row["difference"] == 0 else 0.0
    else:
        p = t_two_sided_p(row["difference"] / se, df)
    return {
        **row,
        "lo": row["difference"] - critical * se,
        "hi": row["difference"] + critical * se,
        "p": max(p, floor),
        "detectable": critical * se,
    }


def compare(a: Side, b: Side) -> pd.DataFrame:
    """One row per (depth or "all", metric): A, B, A − B, its interval, p, Holm's p, verdict."""
    notes = check_comparable(a, b)
    check_same_rule(a, b)
    a, b, paired = common_cells(a, b)
    grid = sorted(set(a.runs["lr"]))
    rows = []
    depths = sorted(set(a.runs["depth"]))
    for depth in [*depths, "all"]:
        in_a = a.runs if depth == "all" else a.runs[a.runs["depth"] == depth]
        in_b = b.runs if depth == "all" else b.runs[b.runs["depth"] == depth]
        k_a, n_a = int((in_a["verdict"] == CONVERGED).sum()), len(in_a)
        k_b, n_b = int((in_b["verdict"] == CONVERGED).sum()), len(in_b)
        lo, hi = newcombe_interval(k_a, n_a, k_b, n_b)
        rows.append(
            {
                "depth": depth,
                "metric": "converged rate",
                "a": k_a / n_a,
                "b": k_b / n_b,
                "difference": k_a / n_a - k_b / n_b,
                "lo": lo,
                "hi": hi,
                "p": newcombe_p_value(k_a, n_a, k_b, n_b),
                "detectable": detectable_rate_gap(n_a, n_b, (k_a + k_b) / (n_a + n_b)),
                "higher_is_better": True,
            }
        )
        if depth == "all":
            continue  # a loss or an LR pooled over depths is no one's: those stay per depth
        for metric in METRICS:
            difference = seed_difference(in_a, in_b, paired, metric, grid)
            rows.append(
                {"depth": depth, "metric": metric.name, **difference,
                 "higher_is_better": metric.higher_is_better}
            )  # fmt: skip
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].tolist())
    table["verdict"] = [_verdict(row, a.name, b.name) for row in table.itertuples()]
    table = table.drop(columns="higher_is_better")
    table.attrs["notes"] = notes
    return table


def _verdict(row, name_a: str, name_b: str) -> str:
    if math.isnan(row.p_holm) or row.p_holm >= ALPHA or row.difference == 0:
        return "no detectable difference"
    a_better = (row.difference > 0) == row.higher_is_better
    return f"{name_a if a_better else name_b} better"


def environment_notes(a: Side, b: Side) -> list[str]:
    """Where the two sides were measured differently (losses can depend on the CPU and torch)."""
    notes = []
    for column in ENVIRONMENT:
        values_a = set(a.runs.get(column, pd.Series(dtype=str)).dropna().astype(str))
        values_b = set(b.runs.get(column, pd.Series(dtype=str)).dropna().astype(str))
        if values_a != values_b:
            notes.append(f"{column}: {a.name} {sorted(values_a)}, {b.name} {sorted(values_b)}")
    return notes


def calibration_note(
    mine: Side,
    baseline: Side,
    calibration: dict,
    reference: str,
    where: str,
    mine_store: str = "results",
) -> str:
    """Whether the machine (CPU and torch) that ran ``mine`` was found to reproduce the shipped
    reference's baseline arm (variant, backbone, recipe: ``python -m suite.reference
    calibrate``)."""
    variant = str(baseline.runs["variant_name"].iloc[0])
    backbone = str(baseline.runs["backbone"].iloc[0]) if "backbone" in baseline.runs else "gpt2"
    recipe = calibrated_arm(baseline.runs.iloc[0])[2]
    controlled = recipe == "controlled"
    arm = f"{variant} on {backbone}" + ("" if controlled else f" ({recipe} recipe)")
    command = f"python -m suite.reference calibrate --variants {variant} --backbone {backbone}"
    command += "" if controlled else f" --recipe {recipe}"
    command += f" --reference {reference}" if reference != "reference" else ""
    command += f" --store {where}" if where != CALIBRATION_STORE else ""
    if not calibration:
        return f"no calibration in {where}: does your machine reproduce the reference? {command}"
    stale = (
        f"the calibration in {where} checked another reference (or this one before its {arm} "
        f"was shipped): calibrate again: {command}"
    )
    if calibration.get("reference") != str(resolve_store(reference).resolve()):
        return stale
    entry = next(
        (cell for cell in calibration.get("cells", [])
         if calibrated_arm(cell) == (variant, backbone, recipe)),
        None,
    )  # fmt: skip
    if entry is None:
        return f"the calibration in {where} did not check {arm}: {command}"
    # Valid while the arm's cells are the ones it checked: a later ship that kept the arm, or
    # re-shipped its runs unchanged, leaves them as they were.
    if not checks_the_shipped_runs(entry, calibration, read_environment(reference)):
        return stale
    if entry.get("verdict_here") == "not trained":
        return (
            f"the calibration of {variant} did not train (its log: {entry.get('log')}): {command}"
        )
    devices = set(mine.runs.get("device_name", pd.Series(dtype=str)).dropna())
    torches = set(mine.runs.get("torch_version", pd.Series(dtype=str)).dropna())
    here = ({entry.get("device_name")}, {entry.get("torch_version")})
    if not devices or (devices, torches) != here:
        yours = f"{sorted(devices) or 'an unrecorded machine'} with torch {sorted(torches)}"
        return (
            f"the calibration of {variant} ran on {entry.get('device_name')} with torch "
            f"{entry.get('torch_version')}, your runs on {yours}: calibrate where they ran: "
            f"{command}"
        )
    if entry.get("within_tolerance"):
        return (
            f"this machine reproduced the reference's {arm} within tolerance "
            f"({entry.get('checked_at')})"
        )
    return (
        f"this machine did NOT reproduce the reference's {arm} (calibration, "
        f"{entry.get('checked_at')}): re-run it in your store and compare there: "
        f"python -m suite +variant={variant} model.backbone={backbone}"
        f"{'' if controlled else f' recipe={recipe}'} store={mine_store}"
    )


def read_runs(store: str) -> pd.DataFrame:
    try:
        return read_collected(store)
    except FileNotFoundError as error:
        raise CompareError(str(error)) from None


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in ("a", "b", "difference", "lo", "hi", "detectable"):
        shown[column] = [f"{value:.3g}" if pd.notna(value) else "" for value in shown[column]]
    for column in ("p", "p_holm"):
        shown[column] = [f"{value:.3f}" if pd.notna(value) else "" for value in shown[column]]
    return shown.to_string(index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m suite.compare",
        description="A vs B, cell by cell: convergence rate, best loss, escape step, max stable "
        "LR, with intervals, Holm-adjusted verdicts and the smallest detectable difference.",
    )
    parser.add_argument(
        "arms", nargs="+", help="A B (two arms of --store), or one arm with --against"
    )
    parser.add_argument("--store", default="results", help="results store (default: results)")
    parser.add_argument(
        "--against",
        help="a second store (or 'reference', the shipped reference results): A from --store, "
        "B (or the same arm, given one) from this store",
    )
    parser.add_argument(
        "--calibration",
        default=CALIBRATION_STORE,
        help=f"where python -m suite.reference calibrate wrote (default: {CALIBRATION_STORE})",
    )
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.store)
        if args.against:
            if len(args.arms) not in (1, 2):
                raise CompareError(
                    "with --against give one arm (the same in both stores) or two (A B)"
                )
            other = read_runs(args.against)
            arm_a, arm_b = args.arms[0], args.arms[-1]
            name_a = arm_a if arm_a != arm_b else f"{arm_a} in {args.store}"
            a = Side(name_a, arm_runs(runs, arm_a, args.store))
            b = Side(f"{arm_b} in {args.against}", arm_runs(other, arm_b, args.against))
        else:
            if len(args.arms) != 2:
                raise CompareError(
                    "give two arms of the store (A B), or one arm and --against STORE"
                )
            a = Side(args.arms[0], arm_runs(runs, args.arms[0], args.store))
            b = Side(args.arms[1], arm_runs(runs, args.arms[1], args.store))
        table = compare(a, b)
    except CompareError as error:
        print(f"compare: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{a.name} vs {b.name}: A − B, 95% intervals, verdicts at Holm-adjusted p < {ALPHA}")
    print(format_table(table))
    for note in table.attrs.get("notes", []):
        print(f"note: {note}")
    for note in environment_notes(a, b):
        print(f"note: measured in different environments ({note}); losses can differ by machine")
    if args.against and is_reference(args.against):
        calibration = read_calibration(args.calibration)
        note = calibration_note(a, b, calibration, args.against, args.calibration, args.store)
        print(f"note: {note}")
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"-> {args.csv}")
