"""The shipped reference results as the baseline beside a store's own runs, so a plugin author
ranks and reports their variant against the built-ins without training them (``--reference`` of
the leaderboard and the report; the reference itself: suite/launch/reference.py).

A reference arm joins only where it can be compared: on a preset the store ran, when the store's
finished runs of that preset trained on the same grid (LRs, seeds) and the same shape of run
(width, heads, sequence, steps, batch, dtype, corpus: what a user changes for a whole sweep, not
what a variant or its recipe sets for itself, like nGPT's weight decay) and were judged by the
same verdict rule, or it is refused naming what differs; and only where the store has no
finished runs of that arm (same label, same preset): the store's own runs of a baseline, trained
on the user's machine, win over the shipped ones. Tokens/s measured on another machine than the
store's is left out (cost ranks arms measured together). Added rows carry ``baseline_source``.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from suite.analyze.compare import Side, check_comparable, check_same_rule, training_settings
from suite.analyze.summary import ok_runs, with_arm_labels
from suite.store import column, read_environment, read_runs

SOURCE = "baseline_source"  # the reference a row was added from; absent for the store's own
# The settings a sweep's user sets for every arm alike; variants and recipes leave them alone.
RUN_SHAPE = ("width", "heads", "mlp_ratio", "seq_len", "steps", "batch_size", "dtype",
             "corpus_sha256")  # fmt: skip


class BaselineError(ValueError):
    """Why the reference cannot stand beside this store, in one line."""


def with_reference(
    runs: pd.DataFrame,
    reference: str = "reference",
    select: Callable[[pd.DataFrame], pd.DataFrame] = lambda runs: runs,
) -> tuple[pd.DataFrame, str]:
    """The runs with the reference's comparable arms they lack appended (of the reference's
    rows, those ``select`` keeps: the caller's filters), and a line saying which were added and
    where they were measured. FileNotFoundError without a reference; BaselineError when the
    store's runs of the reference's preset trained or were judged otherwise."""
    everything = read_runs(reference)
    shipped = select(everything)
    mine = ok_runs(runs)
    if shipped.empty:
        return runs, "none (no run of the reference passes the filters)"
    presets = set(column(mine, "sweep").dropna()) if not mine.empty else set(shipped["sweep"])
    shipped = shipped[shipped["sweep"].isin(presets)]
    if shipped.empty:
        made = ", ".join(sorted(set(everything["sweep"].dropna())))
        return runs, f"none (the reference is of the {made} preset; this store's runs are not)"
    for preset in sorted(set(shipped["sweep"]) & set(column(mine, "sweep").dropna())):
        _check(mine[column(mine, "sweep") == preset], shipped[shipped["sweep"] == preset], preset)
    both = pd.concat([mine.assign(_own=True), shipped.assign(_own=False)], ignore_index=True)
    arm = with_arm_labels(both)["variant"] + " | " + both["sweep"].astype(str)
    added = ~both["_own"] & ~arm.isin(set(arm[both["_own"]]))
    if not added.any():
        return runs, "none (the store has every arm of the reference)"
    extra = shipped.loc[added[~both["_own"]].to_numpy()].assign(**{SOURCE: reference})
    environment = read_environment(reference)
    where = ", ".join(environment.get("device_name", [])) or "a machine it does not record"
    torch = ", ".join(environment.get("torch_version", [])) or "unrecorded"
    left_out = ""
    elsewhere = ~column(extra, "device_name").isin(set(column(mine, "device_name").dropna()))
    if not mine.empty and elsewhere.any():
        extra = extra.assign(tokens_per_s=extra["tokens_per_s"].where(~elsewhere))
        left_out = "; tokens/s measured on another machine than this store's is left out"
    names = sorted(set(with_arm_labels(extra)["variant"]))
    note = (
        f"{', '.join(names)} from the shipped reference ({reference}: measured on {where}, torch "
        f"{torch}; judged by the default verdict rule, no curves{left_out})"
    )
    return pd.concat([runs, extra], ignore_index=True), note


def _check(mine: pd.DataFrame, shipped: pd.DataFrame, preset: str) -> None:
    """The store's runs of one preset against the reference's: same run shape, grid and rule."""
    yours, theirs = Side("your store", mine), Side("the reference", shipped)
    arms_own = set(training_settings(pd.concat([mine, shipped]))) - set(RUN_SHAPE)
    try:
        check_comparable(yours, theirs, ignore=arms_own)
        check_same_rule(yours, theirs)
    except ValueError as error:
        raise BaselineError(f"{preset}: {error}") from None
    for key, what in (("lr", "learning rates"), ("seed", "seeds")):
        own, ref = set(mine[key]), set(shipped[key])
        if own != ref:
            raise BaselineError(
                f"{preset}: your store trained at {what} {sorted(own)}, the reference at "
                f"{sorted(ref)}: ranks over other grids are not comparable"
            )
