"""Why runs failed (suite/analyze/why.py): mechanisms counted per arm, and each mechanism's
remedy with how often its signature also shows in converged runs."""

from __future__ import annotations

import pandas as pd

from suite.analyze.why import budget_check, format_why, mechanism_counts, remedy_table


def runs_frame() -> pd.DataFrame:
    rows = [
        # variant, depth, verdict, mechanism, signatures
        ("postln", 6, "stalled", "vanishing_gradient_early", "vanishing_gradient_early"),
        ("postln", 6, "stalled", "vanishing_gradient_early", "vanishing_gradient_early"),
        ("postln", 24, "stalled", "plateau", ""),
        ("rezero", 6, "diverged", "output_logit_divergence", "output_logit_divergence"),
        ("preln", 6, "converged", "", "attention_logit_growth"),
        ("preln", 6, "converged", "", "output_logit_divergence"),
        ("preln", 6, "converged", "", ""),
        ("preln", 6, "converged", "", ""),
    ]
    frame = pd.DataFrame(
        rows, columns=["variant", "depth", "verdict", "failure_mechanism", "signatures"]
    )
    return frame.assign(status="ok")


def test_mechanisms_are_counted_per_variant_and_depth():
    counts = mechanism_counts(runs_frame())
    assert list(counts.columns) == [
        "output_logit_divergence",
        "vanishing_gradient_early",
        "plateau",
    ]
    assert counts.loc[("postln", 6), "vanishing_gradient_early"] == 2
    assert counts.loc[("postln", 24), "plateau"] == 1
    assert counts.loc[("rezero", 6)].sum() == 1
    assert ("preln", 6) not in counts.index  # converged cleanly: nothing to explain


def test_remedy_table_names_the_setting_and_the_signature_s_rate_in_converged_runs():
    table = remedy_table(runs_frame()).set_index("mechanism")
    assert table.loc["vanishing_gradient_early", "setting"] == "optim.warmup_steps=100"
    assert table.loc["output_logit_divergence", "setting"] == "optim.z_loss=1e-4"
    # one of the four converged runs shows the output-logit signature, none the vanishing one
    assert table.loc["output_logit_divergence", "in_converged_%"] == 25
    assert table.loc["vanishing_gradient_early", "in_converged_%"] == 0
    assert pd.isna(table.loc["plateau", "in_converged_%"])  # no signature of its own
    assert table.loc["vanishing_gradient_early", "arms"] == "postln L6"


def test_a_table_collected_before_mechanisms_has_nothing_to_say():
    old = runs_frame().drop(columns=["failure_mechanism", "signatures"])
    assert mechanism_counts(old).empty and remedy_table(old).empty and format_why(old) == ""


def test_the_console_lists_counts_and_what_to_try():
    text = format_why(runs_frame())
    assert "vanishing_gradient_early: try optim.warmup_steps=100" in text
    assert "postln" in text and "rezero" in text


def reference_runs(escapes: list[float | None], variant: str = "preln") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": variant,
            "depth": 24,
            "steps": 400,
            "lr": 1e-3,
            "escape_step": escapes,
            "status": "ok",
            "judged_from": "curve",
            "verdict": ["converged" if e is not None else "stalled" for e in escapes],
        }
    )


def test_budget_check_is_quiet_when_every_reference_run_escapes_in_the_first_half():
    assert budget_check(reference_runs([50.0, 120.0, 199.0])) == ""


def test_budget_check_proposes_twice_the_step_by_which_every_reference_run_escaped():
    """The case a new user met on their own corpus: Pre-LN at depth 24 leaving the plateau at
    step 273 of 400."""
    text = budget_check(reference_runs([60.0, 120.0, 273.0]))
    assert "1 of 3 runs" in text and "as late as step 273" in text
    assert "train.steps=550" in text  # 2 × 273, rounded up to 50


def test_budget_check_with_a_reference_run_that_never_escaped_asks_for_at_least_double():
    text = budget_check(reference_runs([60.0, None], variant="rmsnorm · llama"))
    assert "rmsnorm · llama at depth 24" in text and "train.steps=800 or more" in text


def test_budget_check_ignores_other_variants_and_higher_learning_rates():
    other = reference_runs([390.0], variant="postln")
    high = reference_runs([390.0]).assign(lr=3e-2)
    assert budget_check(pd.concat([other, high])) == ""


def test_budget_check_does_not_blame_the_budget_for_a_divergence():
    runs = reference_runs([60.0, None]).assign(verdict=["converged", "diverged"])
    assert budget_check(runs) == ""
