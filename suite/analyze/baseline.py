"""The shipped reference results as the baseline beside a store's own runs, so a plugin author
ranks and reports their variant against every built-in without training one
(``--reference`` of the leaderboard and the report; the reference: suite/launch/reference.py).

A reference arm joins only where the store has no runs of that arm (same label, same preset): the
store's own runs of a baseline, trained on the user's machine, always win over the shipped ones.
"""

from __future__ import annotations

import pandas as pd

from suite.analyze.summary import with_arm_labels
from suite.store import read_environment, read_runs

_SOURCE = "_source"


def with_reference(runs: pd.DataFrame, reference: str = "reference") -> tuple[pd.DataFrame, str]:
    """The runs with the reference's arms they lack appended, and a line saying which were
    added and where they were measured ("" when none). FileNotFoundError without a reference."""
    shipped = read_runs(reference)
    both = pd.concat(
        [runs.assign(**{_SOURCE: "store"}), shipped.assign(**{_SOURCE: "reference"})],
        ignore_index=True,
    )
    arm = with_arm_labels(both)["variant"] + " | " + both["sweep"].astype(str)
    own = set(arm[both[_SOURCE] == "store"])
    keep = (both[_SOURCE] == "store") | ~arm.isin(own)
    added = sorted(set(with_arm_labels(both[keep & (both[_SOURCE] == "reference")])["variant"]))
    if not added:
        return runs, ""
    environment = read_environment(reference)
    where = ", ".join(environment.get("device_name", [])) or "an unrecorded machine"
    note = (
        f"{', '.join(added)} from the shipped reference ({reference}; measured on {where}, torch "
        f"{', '.join(environment.get('torch_version', []))}; judged by the default rule, no curves)"
    )
    return both[keep].drop(columns=_SOURCE).reset_index(drop=True), note
