"""Why runs failed: the failure mechanisms collect named (suite/mechanism.py), counted per arm,
and the remedy for each (definitions in docs/results.md, Why it failed).

Pure functions of the collected table, as suite/analyze/summary.py's.
"""

from __future__ import annotations

import math

import pandas as pd

from suite.analyze.summary import CELL, kaplan_meier, ok_runs, with_escape_known
from suite.mechanism import MECHANISMS
from suite.verdict import CONVERGED

REMEDY_COLUMNS = ["mechanism", "runs", "arms", "in_converged_%", "remedy", "setting", "source"]


def labelled(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs with a failure mechanism (none in a table collected before them)."""
    if "failure_mechanism" not in runs:
        return runs.iloc[0:0]
    finished = ok_runs(runs)
    mechanism = finished["failure_mechanism"]  # float NaN when no run has one
    return finished[mechanism.notna() & (mechanism.astype(str) != "")]


def mechanism_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth), how many runs each mechanism was named for (the mechanisms that
    occur, in suite/mechanism.py's order)."""
    failed = labelled(runs)
    if failed.empty:
        return pd.DataFrame()
    table = failed.groupby([*CELL, "failure_mechanism"]).size().unstack(fill_value=0)
    known = [name for name in MECHANISMS if name in table.columns]
    table = table[known + [name for name in table.columns if name not in known]]  # "unknown"
    table.columns.name = None
    return table.sort_index()


def remedy_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per mechanism that occurs: the runs and arms it was named for, how often its signature
    also shows in runs that converged (a signature common in healthy runs is weak evidence of
    cause; empty for the fallback labels, which have no signature), the published remedy and the
    suite setting that applies it."""
    failed = labelled(runs)
    if failed.empty:
        return pd.DataFrame(columns=REMEDY_COLUMNS)
    finished = ok_runs(runs)
    converged = finished[finished["verdict"] == CONVERGED]
    shown_by = converged.get("signatures", pd.Series(dtype=str)).fillna("").astype(str)
    rows = []
    for name, mechanism in MECHANISMS.items():
        named = failed[failed["failure_mechanism"] == name]
        if named.empty:
            continue
        has_signature = name not in ("still_descending", "plateau", "abrupt")
        also = shown_by.str.split(",").map(lambda names, n=name: n in names)
        rows.append(
            {
                "mechanism": name,
                "runs": len(named),
                "arms": ", ".join(
                    f"{variant} L{depth}"
                    for variant, depth in named[CELL].drop_duplicates().itertuples(index=False)
                ),
                "in_converged_%": 100 * also.mean() if has_signature and len(also) else None,
                "remedy": mechanism.remedy,
                "setting": mechanism.setting,
                "source": mechanism.source,
            }
        )
    return pd.DataFrame(rows, columns=REMEDY_COLUMNS)


def format_why(runs: pd.DataFrame) -> str:
    """The console rendering: counts per arm, then each mechanism's setting ('' when no run
    needs one)."""
    counts = mechanism_counts(runs)
    if counts.empty:
        return ""
    remedies = remedy_table(runs)
    lines = ["Why runs failed (failure_mechanism; docs/results.md, Why it failed):"]
    lines.append(counts.to_string())
    lines += [f"  {row.mechanism}: try {row.setting}" for row in remedies.itertuples()]
    return "\n".join(lines)


# Variants that train at every LR ≤ CHECKED_LR of the presets (docs/calibration.md): when they
# leave the plateau late, the budget is short for the corpus, not the variants weak.
REFERENCE_VARIANTS = ("preln", "rmsnorm")
CHECKED_LR = 1e-2


def budget_check(runs: pd.DataFrame) -> str:
    """docs/calibration.md's criterion on this store: every reference run (Pre-LN, RMSNorm, any
    arm, at LR ≤ 1e-2) leaves the plateau within the first half of its budget. When one does
    not, the warning proposes a budget: twice the step by which every reference run of the
    deepest failing arm had escaped (its plateau-survival curve reaching 0), rounded up to 50;
    or, when some never escaped, at least twice the budget. Empty when the criterion holds."""
    if "escape_step" not in runs or runs.empty:
        return ""
    known = with_escape_known(runs)
    base = known["variant"].astype(str).str.split(" ").str[0]
    reference = known[base.isin(REFERENCE_VARIANTS) & (known["lr"] <= CHECKED_LR * (1 + 1e-9))]
    lines = []
    for (variant, depth, steps), group in reference.groupby(["variant", "depth", "steps"]):
        # Never escaped counts as late, unless it diverged: that is the LR's, not the budget's.
        late = group[~(group["escape_step"] < steps / 2) & (group["verdict"] != "diverged")]
        if late.empty:
            continue
        survival = kaplan_meier(group["escape_step"], group["steps"])
        cleared = survival[survival["on_plateau"] <= 0]
        if cleared.empty:
            proposal = f"{2 * int(steps)} or more"
        else:
            proposal = str(int(math.ceil(2 * cleared["step"].iloc[0] / 50) * 50))
        latest = late["escape_step"].max()
        where = "never" if pd.isna(latest) else f"as late as step {int(latest)}"
        lines.append(
            f"  {variant} at depth {depth}: {len(late)} of {len(group)} runs at LR ≤ "
            f"{CHECKED_LR:g} left the plateau after half the budget of {int(steps)} "
            f"({where}); propose train.steps={proposal}"
        )
    if not lines:
        return ""
    header = (
        "Budget check (docs/calibration.md): reference variants leave the plateau late on this "
        "corpus, so late escapes and stalls here may be the budget's, not the variants':"
    )
    return "\n".join([header, *lines])
