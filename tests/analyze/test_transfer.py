"""The LR-transfer analysis (suite/analyze/transfer.py): the optimum between grid points and the
power-law exponent of LR vs depth, on constructed losses whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from suite.analyze.transfer import (
    optimal_lrs,
    power_law_exponent,
    refined_optimum,
    transfer_exponents,
)

GRID = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def parabola(optimum: float) -> pd.Series:
    """Losses quadratic in log10 LR with their minimum at ``optimum``."""
    return pd.Series({lr: 2.0 + (math.log10(lr) - math.log10(optimum)) ** 2 for lr in GRID})


@pytest.mark.parametrize("optimum", [2e-3, 5e-3, 1e-2, 2.5e-2])
def test_the_optimum_of_a_parabola_in_log_lr_is_found_between_grid_points(optimum):
    lr, at_edge = refined_optimum(parabola(optimum))
    assert lr == pytest.approx(optimum, rel=1e-9) and not at_edge


def test_an_optimum_at_the_edge_of_the_grid_is_flagged_not_extrapolated():
    assert refined_optimum(parabola(1e-4)) == (1e-3, True)
    assert refined_optimum(parabola(1.0)) == (1e-1, True)


def test_the_exponent_of_a_power_law_is_recovered_and_needs_two_depths():
    depths = pd.Series([4, 8, 16, 32])
    assert power_law_exponent(depths, 0.1 * depths**-0.5) == pytest.approx(-0.5)
    assert power_law_exponent(depths, pd.Series([0.01] * 4)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(power_law_exponent(pd.Series([4]), pd.Series([0.01])))


def runs_with_optimum(variant: str, optimum_at) -> pd.DataFrame:
    """Runs of two seeds at four depths whose val loss is a parabola around optimum_at(depth);
    the highest LR diverges at depth 32."""
    rows = []
    for depth in (4, 8, 16, 32):
        for lr, loss in parabola(optimum_at(depth)).items():
            for seed in (0, 1):
                diverged = depth == 32 and lr == GRID[-1]
                rows.append(
                    {
                        "variant": variant, "depth": depth, "lr": lr, "seed": seed,
                        "status": "ok", "val_loss": np.nan if diverged else loss,
                        "initial_loss": 5.5, "verdict": "diverged" if diverged else "converged",
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_an_arm_whose_optimum_shrinks_as_one_over_root_depth_gets_exponent_minus_half():
    runs = pd.concat(
        [
            runs_with_optimum("preln", lambda n: 2e-2 * (n / 4) ** -0.5),
            runs_with_optimum("preln · completep", lambda n: 1e-2),
        ]
    )
    exponents = transfer_exponents(runs)
    assert exponents.loc["preln", "optimal_lr_exponent"] == pytest.approx(-0.5, abs=1e-6)
    assert exponents.loc["preln · completep", "optimal_lr_exponent"] == pytest.approx(0, abs=1e-6)
    # Max stable LR: 0.1 at depths 4–16, 0.03 at 32 (the diverged highest LR).
    table = optimal_lrs(runs)
    assert table.loc[("preln", 32), "max_stable_lr"] == 3e-2
    assert exponents.loc["preln", "max_stable_lr_exponent"] < 0
    assert exponents.loc["preln", "depths"] == "4, 8, 16, 32"


def test_a_depth_where_nothing_trained_has_no_optimum_and_no_exponent():
    """Every run diverged (all capped at the initial loss) or no loss at all: no optimum, rather
    than the lowest LR of the grid and an exponent of 0 ("the LR transfers")."""
    flat = pd.Series({lr: 5.5 for lr in GRID})
    assert math.isnan(refined_optimum(flat, initial_loss=5.5)[0])
    assert math.isnan(refined_optimum(pd.Series({1e-3: np.nan, 1e-2: np.nan}))[0])
    runs = runs_with_optimum("preln", lambda n: 1e-2)
    runs["val_loss"], runs["verdict"] = np.nan, "diverged"
    exponents = transfer_exponents(runs)
    assert math.isnan(exponents.loc["preln", "optimal_lr_exponent"])
