"""python -m suite.compare: A vs B cell by cell, with intervals, Holm-adjusted verdicts and the
smallest detectable difference; refusals name what is missing."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest
from helpers import run_suite

from suite.analyze.compare import CompareError, Side, arm_runs, compare
from suite.analyze.statistics import (
    holm,
    newcombe_interval,
    newcombe_p_value,
    smallest_p,
    t_critical,
    t_two_sided_p,
)

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def runs_of(variant: str, seeds, loss_shift=0.0, failing_from=None, depth=6, steps=400, noise=0):
    """A quick-preset-shaped table: every LR × seed; runs at LRs from ``failing_from`` diverge;
    the validation loss is a bowl in log LR plus ``loss_shift`` and a per-seed offset."""
    rng = np.random.default_rng(noise)
    offsets = {seed: rng.normal(0, 0.02) for seed in seeds}
    escapes = {seed: int(rng.integers(60, 100)) for seed in seeds}
    rows = []
    for lr in LRS:
        for seed in seeds:
            failed = failing_from is not None and lr >= failing_from
            rows.append(
                {
                    "variant": variant,
                    "depth": depth,
                    "lr": lr,
                    "seed": seed,
                    "status": "ok",
                    "verdict": "diverged" if failed else "converged",
                    "val_loss": np.nan if failed else 2.3 + 0.1 * (np.log10(lr) + 2) ** 2
                    + loss_shift + offsets[seed],
                    "initial_loss": 5.5,
                    "steps": steps,
                    "escape_step": None if failed else escapes[seed],
                    "judged_from": "curve",
                    "width": 64,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_newcombe_interval_matches_the_papers_worked_example():
    # Newcombe 1998, Table II, method 10: 56/70 − 48/80 = 0.2, interval 0.0524 to 0.3339.
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)
    assert newcombe_p_value(56, 70, 48, 80) < 0.05 < newcombe_p_value(6, 10, 4, 10)
    assert newcombe_p_value(5, 10, 5, 10) == 1.0


def test_t_distribution_matches_its_tables():
    # Student's t tables: the two-sided 5 % critical values.
    for df, critical in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_critical(df) == pytest.approx(critical, abs=2e-3)
    assert t_two_sided_p(0.0, 3) == pytest.approx(1.0)
    assert t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=1e-4)


def test_few_seeds_can_never_show_a_difference():
    assert smallest_p(2) == 0.5 and smallest_p(5) == pytest.approx(0.0625)
    assert smallest_p(3, 3) == pytest.approx(0.1) and smallest_p(5, 5) < 0.05
    # Post-LN never trains above 1e-3 at either of two seeds: a real gap, but two seeds cannot
    # show it by themselves; the convergence rate over all ten runs can.
    a = Side("a", runs_of("a", [0, 1]))
    b = Side("b", runs_of("b", [0, 1], failing_from=3e-3))
    table = compare(a, b).set_index(["depth", "metric"])
    stable = table.loc[(6, "max stable LR (grid steps)")]
    assert stable["difference"] == 4 and stable["verdict"] == "no detectable difference"
    assert stable["detectable"] == float("inf")
    assert table.loc[(6, "converged rate"), "verdict"] == "a better"


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm([0.2, float("nan")])[1])


def test_a_planted_difference_is_found_in_loss_and_in_stability():
    seeds = list(range(8))  # eight seeds: a sign test's smallest p, 0.008, survives Holm's ×5
    a = Side("a", runs_of("a", seeds))
    b = Side("b", runs_of("b", seeds, loss_shift=0.3, failing_from=3e-2, noise=1))
    table = compare(a, b).set_index(["depth", "metric"])
    assert table.loc[(6, "best val loss"), "verdict"] == "a better"
    assert table.loc[(6, "best val loss"), "hi"] < 0  # the interval excludes zero
    assert table.loc[(6, "max stable LR (grid steps)"), "verdict"] == "a better"
    assert table.loc[(6, "converged rate"), "difference"] == pytest.approx(0.4)


def test_the_same_variant_with_other_seeds_shows_no_detectable_difference():
    a = Side("x in one", runs_of("x", [0, 1, 2, 3, 4, 5], noise=1))
    b = Side("x in two", runs_of("x", [6, 7, 8, 9, 10, 11], noise=2))
    table = compare(a, b)
    assert (table["verdict"] == "no detectable difference").all(), table.to_string()
    assert (table["p_holm"].fillna(1) >= 0.05).all()


def test_refusals_say_what_is_missing():
    a = runs_of("a", [0, 1])
    with pytest.raises(CompareError, match="has no finished runs of 'c'; it has: a"):
        arm_runs(a, "c", "store")
    other_depth = Side("b", runs_of("b", [0, 1], depth=24))
    with pytest.raises(CompareError, match="no common cells"):
        compare(Side("a", a), other_depth)
    other_preset = Side("b", runs_of("b", [0, 1], steps=300))
    with pytest.raises(CompareError, match="steps differs"):
        compare(Side("a", a), other_preset)


def test_a_variant_that_trains_without_weight_decay_is_compared_and_said_to():
    """nGPT records weight decay 0 whatever the sweep set (its paper's recipe): between two
    variants that is part of the compared axis; within one variant it is a different setting."""
    preln = runs_of("preln", [0, 1]).assign(weight_decay=0.1)
    ngpt = runs_of("ngpt", [0, 1]).assign(weight_decay=0.0)
    table = compare(Side("ngpt", ngpt), Side("preln", preln))
    assert table.attrs["notes"] == ["ngpt trained without weight decay (its own recipe)"]
    with pytest.raises(CompareError, match="weight_decay differs"):
        compare(Side("preln in one", preln), Side("preln in two", preln.assign(weight_decay=0.0)))
    with pytest.raises(CompareError, match="weight_decay differs"):  # neither side without it
        compare(Side("ngpt", ngpt.assign(weight_decay=0.01)), Side("preln", preln))


def test_an_arm_of_another_recipe_is_compared_and_said_to():
    """DyT with its authors' recipe against DyT (or a plugin) asks what the recipe changes: the
    recipe is part of the compared arm, not a setting to refuse on."""
    controlled = runs_of("dyt", [0, 1]).assign(recipe="controlled")
    authors = runs_of("dyt", [0, 1], loss_shift=-0.2).assign(recipe="authors")
    table = compare(Side("dyt · authors", authors), Side("dyt", controlled))
    assert table.attrs["notes"] == [
        "recipes differ (dyt · authors: authors; dyt: controlled): part of what is compared"
    ]
    old = controlled.drop(columns="recipe")  # a store from before recipes: controlled
    assert compare(Side("dyt", controlled), Side("dyt in old", old)).attrs["notes"] == []


def test_the_command_compares_two_arms_and_two_stores(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    seeds = [0, 1, 2, 3, 4, 5]
    pd.concat([runs_of("a", seeds), runs_of("b", seeds, 0.3, 3e-2)]).to_parquet(
        one / "runs.parquet"
    )
    runs_of("a", seeds).to_parquet(two / "runs.parquet")

    def command(*args: str) -> subprocess.CompletedProcess:
        return run_suite(*args, timeout=120, command="suite.compare")

    arms = command("a", "b", "--store", str(one), "--csv", str(tmp_path / "t.csv"))
    assert arms.returncode == 0, arms.stderr
    assert "a better" in arms.stdout and (tmp_path / "t.csv").exists()
    stores = command("a", "--store", str(one), "--against", str(two))
    assert stores.returncode == 0 and "better" not in stores.stdout
    missing = command("a", "nosuch", "--store", str(one))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "nosuch" in missing.stderr and "it has: a, b" in missing.stderr
    empty = command("a", "b", "--store", str(tmp_path / "none"))
    assert empty.returncode == 2 and "python -m suite.collect" in empty.stderr
