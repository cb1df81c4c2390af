"""The shipped reference results as the baseline beside a store's own runs, so a plugin author
ranks and reports their variant against the built-ins without training them (``--reference`` of
the leaderboard and the report; the reference itself: suite/launch/reference.py).

A reference arm joins only where it can be compared: on a preset the store ran (the store's
finished runs of it trained with the same settings, or it is refused naming the setting), and
only where the store has no finished runs of that arm (same label, same preset): the store's
own runs of a baseline, trained on the user's machine, always win over the shipped ones. Tokens/s
measured on another machine than the store's is left out (cost ranks arms measured together).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from suite.analyze.compare import Side, check_comparable
from suite.analyze.summary import ARM_DEFAULTS, ARM_FLAGS, ok_runs, with_arm_labels
from suite.store import read_environment, read_runs

_SOURCE = "_source"
# Settings that make arms of their own (labelled by the summary), not a mismatch.
_ARM_AXES = {*ARM_DEFAULTS, *ARM_FLAGS, "base_depth"}


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
    store's runs of the reference's preset trained differently."""
    shipped = select(read_runs(reference))
    mine = ok_runs(runs)
    presets = set(mine["sweep"].dropna()) if not mine.empty else set(shipped["sweep"])
    shipped = shipped[shipped["sweep"].isin(presets)]
    if shipped.empty:
        made = ", ".join(sorted(set(read_runs(reference)["sweep"].dropna())))
        return runs, f"none (the reference is of the {made} preset; this store's runs are not)"
    for preset in sorted(set(shipped["sweep"]) & set(mine["sweep"].dropna())):
        _check_settings(mine[mine["sweep"] == preset], shipped[shipped["sweep"] == preset])
    both = pd.concat(
        [mine.assign(**{_SOURCE: "store"}), shipped.assign(**{_SOURCE: "reference"})],
        ignore_index=True,
    )
    arm = with_arm_labels(both)["variant"] + " | " + both["sweep"].astype(str)
    added = (both[_SOURCE] == "reference") & ~arm.isin(set(arm[both[_SOURCE] == "store"]))
    if not added.any():
        return runs, "none (the store has every arm of the reference)"
    extra = shipped.loc[added[both[_SOURCE] == "reference"].to_numpy()]
    environment = read_environment(reference)
    where = ", ".join(environment.get("device_name", [])) or "an unrecorded machine"
    note = ""
    if not mine.empty and set(extra["device_name"].dropna()) - set(mine["device_name"].dropna()):
        extra = extra.assign(tokens_per_s=float("nan"))
        note = "; their tokens/s, from another machine, is left out"
    names = sorted(set(with_arm_labels(extra)["variant"]))
    note = (
        f"{', '.join(names)} from the shipped reference ({reference}: measured on {where}, torch "
        f"{', '.join(environment.get('torch_version', []))}; judged by the default verdict rule, "
        f"no curves{note})"
    )
    return pd.concat([runs, extra], ignore_index=True), note


def _check_settings(mine: pd.DataFrame, shipped: pd.DataFrame) -> None:
    """The store's runs and the reference's, of one preset, must have trained alike beside the
    axes that make arms (variant, backbone, recipe, optimizer, ...)."""
    try:
        check_comparable(Side("your runs", mine), Side("the reference", shipped), ignore=_ARM_AXES)
    except ValueError as error:
        preset = shipped["sweep"].iloc[0]
        raise BaselineError(f"{preset}: {error}") from None
