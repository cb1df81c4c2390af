"""How long a step budget has to be: escape steps of a long sweep, and the verdicts it would give
if it had stopped earlier.

    python -m suite +variant=preln,postln sweep=quick train.steps=500 diagnostics.enabled=false \
        store=results/calibration                                   # train long, once
    python -m benchmarks.budget_calibration --store results/calibration --budgets 200,300,400

The quick preset trains at a constant LR without warmup, so the first B steps of a 500-step run
are exactly a B-step run (same init, same batches, same LR at every step): its curve cut at B is
judged as a B-step run would be (suite.verdict.judge_curve; a run that diverged after B did not
diverge within it). Prints the escape step of every run and, per budget, each (variant, depth)'s
verdicts, its latest escape and whether every run of a variant at the deepest depth left the
plateau within the first half of the budget. Only schedules whose LR does not depend on the
total step count can be cut this way; the script refuses the others.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from suite.analyze.collect import add_verdict_arguments, collect, parse_verdict
from suite.config import VerdictConfig
from suite.store import read_curve_columns
from suite.verdict import judge_curve


def cut(store: str, run: pd.Series, budget: int, verdict: VerdictConfig) -> dict[str, object]:
    """The judgement of ``run`` had it been given ``budget`` steps."""
    losses = read_curve_columns(store, run["cell_id"]).get("loss", [])
    diverged = pd.notna(run["diverged_step"]) and run["diverged_step"] < budget
    judged = judge_curve(
        losses[:budget], diverged, budget, float(run["unigram_entropy"]), verdict
    ).fields()
    return {"budget": budget, **judged}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store of long constant-LR runs")
    parser.add_argument(
        "--budgets", default="200,300,400", help="step budgets to judge, e.g. 200,400"
    )
    add_verdict_arguments(parser)
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    verdict = parse_verdict(parser, args.verdict)
    runs = collect(args.store, write=False, verdict=verdict)
    runs = runs[runs["status"] == "ok"].copy()
    optims = [json.loads(c)["optim"] for c in runs["config"]]
    if any(o["schedule"] != "constant" or o["warmup_fraction"] for o in optims):
        parser.error(
            "only runs whose LR at a step does not depend on the step budget can be cut to a "
            "shorter one: a constant schedule, warmup in optim.warmup_steps (not a fraction)"
        )
    too_short = runs[runs["steps"] < max(budgets)]
    if not too_short.empty:
        parser.error(f"runs shorter than the largest budget: {', '.join(too_short['cell_id'])}")
    keys = ["variant", "depth", "lr"]

    escapes = runs.pivot_table(index=keys, columns="seed", values="escape_step", aggfunc="first")
    print(f"Escape step of every run ({int(runs['steps'].max())} steps; empty = never):")
    print(escapes.map(lambda v: "" if pd.isna(v) else f"{v:.0f}").to_string())

    rows = []
    for _, run in runs.iterrows():
        for budget in budgets:
            rows.append({**run[[*keys, "seed"]].to_dict(), **cut(args.store, run, budget, verdict)})
    cuts = pd.DataFrame(rows)
    letters = cuts.assign(
        letter=cuts["verdict"].str[0] + cuts["borderline"].map({True: "*", False: ""})
    )
    table = letters.pivot_table(
        index=keys, columns="budget", values="letter", aggfunc=lambda v: " ".join(v)
    )
    print("\nVerdicts per budget, one letter per seed (c converged, s stalled, d diverged;")
    print("* borderline):")
    print(table.to_string())

    deepest = cuts["depth"].max()
    print(f"\nAt depth {deepest}: latest escape per variant and LR, and whether every run left")
    print("the plateau within the first half of the budget:")
    for budget in budgets:
        at = cuts[(cuts["budget"] == budget) & (cuts["depth"] == deepest)]
        for (name, lr), group in at.groupby(["variant", "lr"]):
            latest = group["escape_step"].max()
            never = group["escape_step"].isna().sum()
            within = never == 0 and latest < budget / 2
            print(
                f"  budget {budget}: {name:>10} lr {lr:<7g} latest escape "
                f"{'never' if never == len(group) else f'{latest:.0f}'}"
                f"{f' ({never} never)' if 0 < never < len(group) else ''}"
                f"  {'within first half' if within else '-'}"
            )


if __name__ == "__main__":
    main()
