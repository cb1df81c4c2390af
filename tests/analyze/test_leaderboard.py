"""The leaderboard: arms ranked per preset and depth, ties as ties, rank intervals over seeds,
exported to Markdown and CSV."""

from __future__ import annotations

import numpy as np
import pandas as pd
from helpers import run_suite

from suite.analyze.leaderboard import display, leaderboard, leaderboards

LRS = [1e-3, 1e-2, 1e-1]


def runs_of(variant, seeds, failing_from=None, loss=2.3, tokens=1000.0, sweep="quick", depth=6):
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
                    "sweep": sweep,
                    "verdict": "diverged" if failed else "converged",
                    "val_loss": np.nan if failed else loss + 0.1 * abs(np.log10(lr) + 2)
                    + 0.01 * seed,
                    "initial_loss": 5.5,
                    "tokens_per_s": tokens,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_ranks_ties_and_arms_that_never_train():
    runs = pd.concat(
        [
            runs_of("a", [0, 1], loss=2.0, tokens=900),
            runs_of("b", [0, 1], loss=2.2, tokens=1100),  # as stable as a: a tie
            runs_of("c", [0, 1], failing_from=1e-2, loss=2.1),
            runs_of("d", [0, 1], failing_from=1e-3),  # trains at no LR
        ]
    )
    table = leaderboard(runs).set_index("arm")
    assert table.loc[["a", "b"], "stability_rank"].tolist() == [1, 1]
    assert table.loc[["a", "b"], "stability_tied"].all()
    assert table.loc["c", "stability_rank"] == 3 and table.loc["d", "stability_rank"] == 4
    assert table.loc["a", "loss_rank"] == 1 and table.loc["b", "cost_rank"] == 1
    assert np.isnan(table.loc["d", "lr_sensitivity"])  # no stable LR: not ranked insensitive
    assert table.loc["d", "sensitivity_rank"] == 4
    for rank in ("stability", "sensitivity", "loss", "cost"):
        assert (table[f"{rank}_lo"] <= table[f"{rank}_rank"]).all()
        assert (table[f"{rank}_rank"] <= table[f"{rank}_hi"]).all()
    shown = display(table.reset_index()).set_index("arm")
    assert shown.loc["a", "stability rank"] == "1=" and shown.loc["d", "max stable LR"] == "–"


def test_a_rank_the_seeds_disagree_on_has_an_interval():
    # b converges at LR 1e-1 with seed 0 only, a with neither: tied on the whole table, but a
    # resample drawing seed 0 twice puts b alone first and a second.
    b = runs_of("b", [0, 1], failing_from=1e-1)
    b.loc[(b["lr"] == 1e-1) & (b["seed"] == 0), ["verdict", "val_loss"]] = ["converged", 2.5]
    table = leaderboard(pd.concat([runs_of("a", [0, 1], failing_from=1e-1), b])).set_index("arm")
    assert table["stability_rank"].tolist() == [1, 1]
    assert (table.loc["a", "stability_lo"], table.loc["a", "stability_hi"]) == (1, 2)
    assert (table.loc["b", "stability_lo"], table.loc["b", "stability_hi"]) == (1, 1)
    assert display(table.reset_index()).set_index("arm").loc["a", "stability rank"] == "1= (1–2)"


def test_presets_are_ranked_apart_and_exported(tmp_path):
    runs = pd.concat([runs_of("a", [0, 1]), runs_of("b", [0, 1], sweep="lr")])
    assert [table["sweep"].iloc[0] for table in leaderboards(runs)] == ["lr", "quick"]
    (tmp_path / "store").mkdir()
    runs.to_parquet(tmp_path / "store" / "runs.parquet")
    result = run_suite(
        "--store", str(tmp_path / "store"), "--markdown", str(tmp_path / "lb.md"),
        "--csv", str(tmp_path / "lb.csv"), timeout=120, command="suite.leaderboard",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "lb.md").read_text()
    assert "## quick" in markdown and "| depth | arm | max stable LR |" in markdown
    assert len(pd.read_csv(tmp_path / "lb.csv")) == 2
    missing = run_suite("--store", str(tmp_path / "none"), timeout=120, command="suite.leaderboard")
    assert missing.returncode == 2 and "python -m suite.collect" in missing.stderr


def test_one_backbones_arms_are_ranked_on_their_own(tmp_path):
    """--backbone keeps one backbone's arms (a store from before backbones trained gpt2's)."""
    runs = pd.concat([runs_of("a", [0, 1]), runs_of("a", [0, 1]).assign(backbone="llama")])
    (tmp_path / "store").mkdir()
    runs.to_parquet(tmp_path / "store" / "runs.parquet")

    def arms(*args: str) -> list[str]:
        result = run_suite("--store", str(tmp_path / "store"), "--csv", str(tmp_path / "lb.csv"),
                           *args, timeout=120, command="suite.leaderboard")  # fmt: skip
        assert result.returncode == 0, result.stderr
        return sorted(pd.read_csv(tmp_path / "lb.csv")["arm"])

    assert arms() == ["a", "a · llama"]
    assert arms("--backbone", "llama") == ["a · llama"]
    assert arms("--backbone", "gpt2") == ["a"]


def test_tokens_per_s_of_another_machine_is_not_ranked_against_this_ones():
    """The shipped reference holds arms trained on two CPUs: a faster CPU would rank its arms
    cheaper. The arms measured off the machine most runs were measured on keep their stability
    and loss ranks; their cost is unknown here ("–"), and a note names them."""
    runs = pd.concat(
        [
            runs_of("a", [0, 1], tokens=900).assign(device_name="Intel Xeon"),
            runs_of("b", [0, 1], tokens=1000).assign(device_name="Intel Xeon"),
            runs_of("c", [0, 1], tokens=5000).assign(device_name="AMD EPYC"),
        ]
    )
    (table,) = leaderboards(runs)
    table = table.set_index("arm")
    assert np.isnan(table.loc["c", "tokens_per_s"]) and table.loc["b", "cost_rank"] == 1
    assert table.loc["c", "stability_rank"] == 1  # its verdicts still rank
    assert display(table.reset_index()).set_index("arm").loc["c", "cost rank"] == "–"
    assert table.attrs["notes"] == [
        "tokens/s of c left out of the cost rank: measured on another machine than the rest "
        "(Intel Xeon)"
    ]
    one = leaderboard(runs[runs["variant"] != "c"])
    assert one.attrs["notes"] == [] and one["tokens_per_s"].notna().all()
