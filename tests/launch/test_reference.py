"""The shipped reference results: made by ``python -m suite.reference ship``, checked by
``calibrate``, read by compare, the leaderboard and the report as the baseline (a plugin author
trains only their own variant). The shipped table itself is held against the suite: every row a
built-in's cell that the suite still composes with the same id."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, run_suite

from suite.analyze.baseline import BaselineError, with_reference
from suite.config import ConfigError, VerdictConfig
from suite.launch.reference import (
    ESCAPE_TOLERANCE,
    LOSS_TOLERANCE,
    RECIPES,
    agreement,
    arm_key,
    built_ins,
    calibration_cell,
    expected_cells,
    has_arm,
    ship,
)
from suite.store import (
    ENVIRONMENT,
    RUNS,
    arm_shipped_at,
    read_environment,
    read_json,
    read_runs,
    reference_dir,
    resolve_store,
)

SHIPPED = reference_dir("quick")
# A converged reference cell (no seed spread recorded: the stated tolerances alone apply).
CONVERGED_CELL = {
    "variant": "preln", "cell_id": "c", "verdict": "converged", "val_loss": 2.3, "escape_step": 60.0
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A reference made by the command that makes the shipped one, on the tiny preset."""
    root = tmp_path_factory.mktemp("reference")
    store, folder = root / "store", root / "tiny"
    result = run_suite(
        "run", "--preset", "tiny", "--variants", "preln,postln", "--store", str(store),
        "--out", str(folder), command="suite.reference",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return store, folder


@pytest.mark.slow
def test_ship_writes_the_grid_and_where_it_was_measured(tiny_reference):
    store, folder = tiny_reference
    table = pd.read_parquet(folder / RUNS)
    assert len(table) == 8 and set(table["variant"]) == {"preln", "postln"}
    assert "curve_file" not in table  # the curves stay in the store that trained them
    environment = json.loads((folder / ENVIRONMENT).read_text())
    assert environment["arms"] == ["postln · gpt2", "preln · gpt2"]
    assert environment["incomplete_arms"] == {}
    assert "rezero · gpt2" in environment["absent_arms"]
    assert environment["shipped_from"] == f"python -m suite.reference ship --store {store}"
    assert set(environment["wall_seconds_by_arm"]) == {"preln · gpt2", "postln · gpt2"}
    again = ship(str(store), name="tiny", out=folder.parent / "again")  # the same cells, again
    assert pd.read_parquet(again / RUNS).equals(table)
    assert environment["device_name"] == sorted(set(table["device_name"]))
    assert environment["cell_seconds_by_arm"]["preln · gpt2"] > 0


@pytest.mark.slow
def test_the_authors_arms_ship_beside_the_controlled_ones(tmp_path):
    """DyT's recipe changes its training: its authors' arm is its own; Pre-LN's recipe changes
    nothing, so it has no authors' arm (its authors cells are the controlled ones)."""
    store, folder = tmp_path / "store", tmp_path / "tiny"
    result = run_suite(
        "run", "--preset", "tiny", "--variants", "dyt,preln", "--recipes", "controlled,authors",
        "--store", str(store), "--out", str(folder), command="suite.reference",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    environment = json.loads((folder / ENVIRONMENT).read_text())
    assert environment["arms"] == ["dyt · gpt2", "dyt · gpt2 · authors", "preln · gpt2"]
    assert "derf · gpt2 · authors" in environment["absent_arms"]
    assert not any(arm.startswith("preln") for arm in environment["absent_arms"])
    assert environment["regenerate"].endswith("--recipes controlled,authors")
    assert set(environment["wall_seconds_by_arm"]) == set(environment["arms"])
    table = pd.read_parquet(folder / RUNS)
    assert table.groupby(["variant", "recipe"]).size().to_dict() == {
        ("dyt", "authors"): 4, ("dyt", "controlled"): 4, ("preln", "controlled"): 4
    }  # fmt: skip
    assert calibration_cell(table, "dyt", "gpt2")["recipe"] == "controlled"
    refused = run_suite("run", "--recipes", "authors,paper", command="suite.reference")
    assert refused.returncode == 2
    assert refused.stderr.startswith("reference: --recipes: unknown paper; the recipes are")


@pytest.mark.slow
def test_calibration_passes_on_the_machine_that_made_the_reference(tiny_reference, tmp_path):
    _, folder = tiny_reference
    result = run_suite(
        "calibrate", "--reference", str(folder), "--store", str(tmp_path), "--variants",
        "preln,postln", command="suite.reference",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    outcome = json.loads((tmp_path / "calibration.json").read_text())
    assert outcome["passed"] and outcome["failed_variants"] == []
    for cell in outcome["cells"]:  # same machine, same code: the very same numbers
        assert abs(cell["val_loss_difference"]) < 1e-6 and cell["verdict_here"] == "converged"
    assert "reproduces the reference" in result.stdout
    again = run_suite(
        "calibrate", "--reference", str(folder), "--store", str(tmp_path), "--variants", "preln",
        command="suite.reference",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    [log] = (tmp_path / "logs").glob("preln-*.log")
    assert log.read_text().count("done: preln-") == 2  # trained afresh, not read back
    merged = json.loads((tmp_path / "calibration.json").read_text())
    assert sorted(cell["variant"] for cell in merged["cells"]) == ["postln", "preln"]


@pytest.mark.slow
def test_calibration_names_the_baseline_to_rerun_when_the_machine_differs(tiny_reference, tmp_path):
    """A reference whose Post-LN cell reads 0.2 nats higher than this machine trains it."""
    _, folder = tiny_reference
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    table = pd.read_parquet(moved / RUNS)
    cell = calibration_cell(table, "postln", "gpt2")
    table.loc[table["cell_id"] == cell["cell_id"], "val_loss"] += 0.2
    table.to_parquet(moved / RUNS, index=False)
    result = run_suite(
        "calibrate", "--reference", str(moved), "--store", str(tmp_path / "calibration"),
        "--variants", "preln,postln", command="suite.reference",
    )  # fmt: skip
    assert result.returncode == 1
    assert "does not reproduce the reference for postln" in result.stderr
    assert "python -m suite +variant=postln " in result.stderr
    outcome = json.loads((tmp_path / "calibration" / "calibration.json").read_text())
    assert outcome["failed_variants"] == ["postln · gpt2"]


@pytest.mark.slow
def test_calibration_refuses_a_reference_trained_on_other_text(tiny_reference, tmp_path):
    """A reference of other text (a store from before the stdlib corpus was pinned, trained
    under another Python): nothing trains, and the line says why."""
    _, folder = tiny_reference
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    table = pd.read_parquet(other / RUNS).assign(corpus_sha256="0" * 64, python_version="3.99.0")
    table.to_parquet(other / RUNS, index=False)
    result = run_suite("calibrate", "--reference", str(other), "--store", str(tmp_path / "c"),
                       "--variants", "preln", command="suite.reference")  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "the reference trained on other text" in line and "000000000000" in line
    assert not (tmp_path / "c" / "cells").exists()


@pytest.mark.slow
def test_calibration_refuses_a_variant_the_reference_lacks(tiny_reference, tmp_path):
    _, folder = tiny_reference
    result = run_suite(
        "calibrate", "--reference", str(folder), "--store", str(tmp_path), "--variants", "rezero",
        command="suite.reference",
    )  # fmt: skip
    assert result.returncode == 2
    assert "no rezero on gpt2; on gpt2 it has: postln, preln" in result.stderr
    assert not (tmp_path / "cells").exists()  # refused before anything trained


def _rows(**columns) -> pd.DataFrame:
    base = {"variant": "preln", "backbone": "gpt2", "borderline": False, "seed": 0,
            "val_loss": 2.3, "escape_step": 60.0}  # fmt: skip
    return pd.DataFrame([{**base, **row} for row in columns["rows"]])


def test_the_calibration_cell_is_the_one_farthest_from_a_boundary():
    rows = [
        # depth 6: LR 1e-3 has a borderline seed, 3e-3 a stalled one; 1e-2 is steady
        {"depth": 6, "lr": 1e-3, "seed": 0, "verdict": "converged", "borderline": True},
        {"depth": 6, "lr": 1e-3, "seed": 1, "verdict": "converged"},
        {"depth": 6, "lr": 3e-3, "seed": 0, "verdict": "converged"},
        {"depth": 6, "lr": 3e-3, "seed": 1, "verdict": "stalled"},
        {"depth": 6, "lr": 1e-2, "seed": 1, "verdict": "converged"},
        {"depth": 6, "lr": 1e-2, "seed": 0, "verdict": "converged"},
        {"depth": 24, "lr": 1e-3, "seed": 0, "verdict": "converged"},
    ]
    cell = calibration_cell(_rows(rows=rows), "preln", "gpt2")
    assert (cell["depth"], cell["lr"], cell["seed"]) == (6, 1e-2, 0)
    never = [{"depth": 6, "lr": lr, "verdict": "diverged"} for lr in (3e-3, 1e-3)]
    cell = calibration_cell(_rows(rows=never), "preln", "gpt2")
    assert cell["lr"] == 1e-3  # only its verdict can be compared


def test_a_calibration_checks_and_vouches_for_one_arm_recipe_included(tmp_path):
    """DyT's authors' arm is calibrated on its own cell, and a calibration of its controlled arm
    (or one written before calibrations named a recipe) says nothing about it."""
    from suite.analyze.compare import Side, calibration_note
    from suite.launch.reference import _merge_calibration

    rows = [{"variant": "dyt", "depth": 6, "lr": 1e-3, "verdict": "converged", "recipe": recipe,
             "cell_id": f"dyt-{recipe}"} for recipe in RECIPES]  # fmt: skip
    assert calibration_cell(_rows(rows=rows), "dyt", "gpt2", "authors")["cell_id"] == "dyt-authors"
    lacking = "no derf on gpt2 with recipe authors; on gpt2 with recipe authors it has: dyt$"
    with pytest.raises(ConfigError, match=lacking):
        calibration_cell(_rows(rows=rows), "derf", "gpt2", "authors")

    entry = {"variant": "dyt", "backbone": "gpt2", "device_name": "cpu", "torch_version": "t",
             "checked_at": "then"}  # fmt: skip
    calibration = {
        "reference": str(SHIPPED.resolve()),
        "reference_shipped_at": read_environment("reference")["shipped_at"],
        "cells": [{**entry, "within_tolerance": True}],  # no recipe: the controlled arm's
    }
    mine = Side("mine", pd.DataFrame({"device_name": ["cpu"], "torch_version": ["t"]}))

    def note(recipe: str) -> str:
        runs = pd.DataFrame({"variant_name": ["dyt"], "backbone": ["gpt2"], "recipe": [recipe]})
        return calibration_note(mine, Side("dyt", runs), calibration, "reference", "here")

    assert note("controlled").startswith("this machine reproduced the reference's dyt on gpt2 ")
    assert note("authors") == (
        "the calibration in here did not check dyt on gpt2 (authors recipe): python -m "
        "suite.reference calibrate --variants dyt --backbone gpt2 --recipe authors --store here"
    )
    calibration["cells"].append({**entry, "recipe": "authors", "within_tolerance": False})
    assert "did NOT reproduce the reference's dyt on gpt2 (authors recipe)" in note("authors")
    assert note("authors").endswith("+variant=dyt model.backbone=gpt2 recipe=authors store=results")
    assert "reproduced the reference's dyt on gpt2 within" in note("controlled")

    # A calibration of one arm replaces that arm's entry only.
    table = pd.DataFrame([{**entry, "recipe": "authors", "within_tolerance": True}])
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    _merge_calibration(str(tmp_path), "reference", table)
    merged = json.loads((tmp_path / "calibration.json").read_text())
    assert [(c.get("recipe"), c["within_tolerance"]) for c in merged["cells"]] == [
        (None, True), ("authors", True)
    ]  # fmt: skip
    assert merged["passed"]


def test_agreement_widens_to_the_cells_own_seed_spread_and_needs_both_values():
    reference = pd.Series({**CONVERGED_CELL, "val_loss_spread": 0.2, "escape_step_spread": 0.0})

    def within(**here) -> bool:
        run = {"verdict": "converged", "val_loss": 2.3, "escape_step": 60, **here}
        return agreement(reference, run)["within_tolerance"]

    assert within(val_loss=2.3 + 0.15)  # beyond 0.05, inside the seeds' own 0.2
    assert not within(val_loss=2.3 + 0.25)
    assert not within(escape_step=None)  # left the plateau there, not here
    assert not agreement(reference, None)["within_tolerance"]  # did not train
    stalled = reference.copy()
    stalled["verdict"], stalled["escape_step"] = "stalled", None
    assert agreement(stalled, {"verdict": "stalled", "val_loss": 3.0, "escape_step": None})[
        "within_tolerance"
    ]


@pytest.mark.parametrize(
    ("loss_moved", "escape_moved", "verdict_here", "within"),
    [
        (LOSS_TOLERANCE * 0.8, 0, "converged", True),
        (LOSS_TOLERANCE * 1.2, 0, "converged", False),
        (-LOSS_TOLERANCE * 1.2, 0, "converged", False),
        (0.0, ESCAPE_TOLERANCE - 5, "converged", True),
        (0.0, ESCAPE_TOLERANCE + 5, "converged", False),
        (0.0, 0, "stalled", False),
    ],
)
def test_agreement_holds_a_run_to_the_stated_tolerance(
    loss_moved, escape_moved, verdict_here, within
):
    reference = pd.Series(CONVERGED_CELL)
    here = {"verdict": verdict_here, "val_loss": 2.3 + loss_moved,
            "escape_step": 60 + escape_moved, "device_name": "cpu"}  # fmt: skip
    assert agreement(reference, here)["within_tolerance"] is within


# --- the shipped reference ------------------------------------------------------------------


def test_the_word_reference_reads_the_shipped_table():
    assert resolve_store("reference") == SHIPPED == REPO / "reference" / "quick"
    assert resolve_store("reference:other") == REPO / "reference" / "other"
    assert resolve_store("results/mine") == Path("results/mine")
    assert len(read_runs("reference")) == len(pd.read_parquet(SHIPPED / RUNS))


def test_the_shipped_reference_is_the_suites_own_grid_today():
    """Every shipped row is a finished cell of a built-in that the suite composes today with the
    same id (a setting or default changed since would make the reference another experiment),
    and its environment says what it holds."""
    table = pd.read_parquet(SHIPPED / RUNS)
    environment = read_environment("reference")
    assert set(table["status"]) == {"ok"} and set(table["sweep"]) == {"quick"}
    assert set(table["variant"]) <= set(built_ins())
    keys = ["variant", "backbone", "recipe"]
    arms = sorted({arm_key(*arm) for arm in table[keys].itertuples(index=False)})
    assert environment["arms"] == arms and environment["cells"] == len(table)
    everything = {
        arm_key(v, b, r)
        for v in built_ins() for b in environment["backbones"] for r in RECIPES if has_arm(v, r)
    }  # fmt: skip
    not_whole = set(environment["incomplete_arms"]) | set(environment["absent_arms"])
    assert not_whole == everything - set(arms) and not not_whole & set(arms)
    for (variant, backbone, recipe), shipped in table.groupby(keys):
        composed = {cell.cell_id() for cell in expected_cells(variant, backbone, recipe=recipe)}
        assert set(shipped["cell_id"]) == composed, variant  # whole grids only
    for column in ("device_name", "torch_version", "suite_version", "git_sha", "corpus_sha256"):
        assert environment[column] == sorted(set(table[column].astype(str)))


def _plugin_store(tmp_path, source_variant: str):
    """A store of a plugin 'mine' that trained exactly like ``source_variant`` did."""
    rows = read_runs("reference")
    mine = rows[rows["variant"] == source_variant].assign(variant="mine", variant_source="mine 1.0")
    tmp_path.mkdir(parents=True, exist_ok=True)
    mine.to_parquet(tmp_path / RUNS, index=False)
    return tmp_path


@pytest.mark.slow
def test_compare_takes_the_shipped_reference_as_the_baseline(tmp_path):
    """A plugin that trains like Pre-LN, compared with the reference's Post-LN and Pre-LN, on a
    store holding nothing but the plugin: no baseline re-run."""
    store = _plugin_store(tmp_path / "store", "preln")
    result = run_suite(
        "mine", "postln", "--store", str(store), "--against", "reference", "--calibration",
        str(tmp_path / "none"), command="suite.compare",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mine vs postln in reference" in result.stdout
    rate_24 = next(line for line in result.stdout.splitlines()
                   if line.split()[:3] == ["24", "converged", "rate"])  # fmt: skip
    assert rate_24.endswith("mine better")
    assert "no calibration in" in result.stdout
    same = run_suite("mine", "preln", "--store", str(store), "--against", "reference",
                     "--calibration", str(tmp_path / "none"), command="suite.compare")  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert "better" not in same.stdout.replace("no detectable difference", "")


@pytest.mark.slow
def test_compare_against_the_reference_says_what_the_calibration_found(tmp_path):
    store = _plugin_store(tmp_path / "store", "preln")
    shipped = read_runs("reference")
    device, torch = shipped["device_name"].iloc[0], shipped["torch_version"].iloc[0]

    def cell(variant: str, within: bool, **other) -> dict:
        return {
            "variant": variant,
            "backbone": "gpt2",
            "within_tolerance": within,
            "device_name": device,
            "torch_version": torch,
            "checked_at": "then",
            **other,
        }

    def note(baseline: str, **calibration) -> str:
        folder = tmp_path / "calibration"
        folder.mkdir(exist_ok=True)
        default = {
            "reference": str(SHIPPED.resolve()),
            "reference_shipped_at": read_environment("reference")["shipped_at"],
            "cells": [cell("postln", False), cell("preln", True)],
        }
        (folder / "calibration.json").write_text(json.dumps({**default, **calibration}))
        result = run_suite("mine", baseline, "--store", str(store), "--against", "reference",
                           "--calibration", str(folder), command="suite.compare")  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    assert "did NOT reproduce the reference's postln on gpt2" in note("postln")
    assert "reproduced the reference's preln on gpt2 within tolerance" in note("preln")
    assert "did not check rmsnorm on gpt2" in note("rmsnorm")
    # a calibration that does not apply to these runs vouches for nothing
    assert "calibrate where they ran" in note(
        "preln", cells=[cell("preln", True, torch_version="2.0")]
    )
    assert "calibrate where they ran" in note(
        "preln", cells=[cell("preln", True, device_name="AMD")]
    )
    assert "checked another reference" in note("preln", reference_shipped_at="2020-01-01")
    assert "checked another reference" in note("preln", reference="/elsewhere")
    # A ship that only kept Pre-LN's arm (and added others) leaves the calibration of it valid:
    # what matters is when the arm's own cells were shipped.
    made_at = arm_shipped_at(read_environment("reference"), "preln · gpt2")
    assert "reproduced the reference's preln" in note("preln", reference_shipped_at=made_at)
    before = made_at.replace(made_at[:4], str(int(made_at[:4]) - 1), 1)
    assert "checked another reference" in note("preln", reference_shipped_at=before)


@pytest.mark.slow
def test_compare_refuses_a_store_of_another_preset_against_the_reference(tiny_reference):
    store, _ = tiny_reference
    result = run_suite("preln", "postln", "--store", str(store), "--against", "reference",
                       command="suite.compare")  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "differs" in line and "compare runs of the same preset" in line


@pytest.mark.slow
def test_the_leaderboard_ranks_a_plugin_among_the_reference(tmp_path):
    store = _plugin_store(tmp_path, "rmsnorm")
    result = run_suite("--store", str(store), "--reference", command="suite.leaderboard")
    assert result.returncode == 0, result.stderr
    assert "from the shipped reference" in result.stdout
    ranked = {line.split()[1] for line in result.stdout.splitlines() if line.split()[:1] == ["24"]}
    assert {"mine", "preln", "postln"} <= ranked


def test_the_references_tokens_per_s_is_kept_only_from_the_stores_own_machine():
    """Tokens/s of a reference cell measured on a CPU the store's runs were not measured on
    would rank the CPUs, not the arms: left out cell by cell, the rest kept."""
    reference = read_runs("reference")
    mine = reference[reference["variant"] == "rmsnorm"].assign(variant="mine")
    here = str(mine["device_name"].iloc[0])
    runs, note = with_reference(mine, "reference", lambda rows: rows)
    added = runs[runs["variant"] != "mine"]
    same = added["device_name"] == here
    assert added.loc[same, "tokens_per_s"].notna().all()
    assert added.loc[~same, "tokens_per_s"].isna().all()
    mine = mine.assign(device_name="another CPU")
    elsewhere, note = with_reference(mine, "reference", lambda rows: rows)
    assert elsewhere.loc[elsewhere["variant"] != "mine", "tokens_per_s"].isna().all()
    assert "tokens/s measured on another machine than this store's is left out" in note


@pytest.mark.slow
def test_the_leaderboard_refuses_a_reference_that_trained_otherwise(tmp_path):
    """Runs of the quick preset with a longer budget are not the reference's experiment."""
    store = _plugin_store(tmp_path, "preln")
    runs = pd.read_parquet(store / RUNS).assign(steps=800)
    runs.to_parquet(store / RUNS, index=False)
    result = run_suite("--store", str(store), "--reference", command="suite.leaderboard")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("leaderboard: quick: steps differs: your store has ['800']")


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"seed": 0}, "your store trained at seeds [0], the reference at [0, 1]"),
        ({"verdict_rule": "v2 stall_margin=0.3"}, "verdict_rule differs"),
        ({"corpus_sha256": "0" * 64}, "they trained on different text"),
    ],
)
def test_the_reference_joins_only_runs_of_its_grid_rule_and_text(tmp_path, change, refusal):
    store = _plugin_store(tmp_path, "preln")
    runs = pd.read_parquet(store / RUNS).assign(**change)
    with pytest.raises(BaselineError, match=re.escape(refusal)):
        with_reference(runs)


def test_what_a_variant_sets_for_itself_is_no_mismatch(tmp_path):
    """nGPT trains without weight decay and an authors' recipe has its own warmup: arms, not a
    different experiment."""
    store = _plugin_store(tmp_path, "preln")
    runs = pd.read_parquet(store / RUNS).assign(weight_decay=0.0, warmup_steps=40)
    added, note = with_reference(runs)
    assert "postln" in note and len(added) > len(runs)


def test_the_stores_own_finished_runs_of_an_arm_win_over_the_reference():
    shipped = read_runs("reference")
    own = shipped[shipped["variant"] == "preln"].assign(val_loss=9.0)
    runs, note = with_reference(own)
    assert (runs.loc[runs["variant"] == "preln", "val_loss"] == 9.0).all()
    assert "preln" not in note.split(" from ")[0].split(", ")
    errored = own.assign(status="error")  # an arm whose runs all failed is no arm
    runs, note = with_reference(errored)
    assert len(runs[runs["variant"] == "preln"]) == len(own) * 2
    assert "preln" in note.split(" from ")[0].split(", ")


@pytest.mark.slow
def test_the_report_draws_the_reference_arms_beside_the_stores_own(tiny_reference, tmp_path):
    """A store holding only Pre-LN, reported with a reference holding Post-LN too."""
    store, folder = tiny_reference
    mine = tmp_path / "mine"
    for cell in (store / "cells").glob("preln-*"):
        shutil.copytree(cell, mine / "cells" / cell.name)
    out = tmp_path / "report.html"
    result = run_suite("--store", str(mine), "--reference", str(folder), "--out", str(out),
                       command="suite.report")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    html = out.read_text()
    assert "Baseline arms" in html and "postln from the shipped reference" in html
    postln = set(pd.read_parquet(folder / RUNS).query("variant == 'postln'")["cell_id"])
    assert all(cell in html for cell in postln)  # every reference run in the table of runs
    assert f"Not drawn: postln (from {folder}" in html
    refused = run_suite("--store", str(mine), "--reference", "verdict.stall_margin=0.2",
                        "--out", str(out), command="suite.report")  # fmt: skip
    assert refused.returncode == 2 and "--reference" in refused.stderr


@pytest.mark.slow
def test_the_reference_of_another_preset_adds_nothing(tiny_reference):
    store, _ = tiny_reference
    runs = read_runs(store)
    added, note = with_reference(runs)
    assert len(added) == len(runs)
    assert note.startswith("none (the reference is of the quick preset")


def test_the_wall_time_log_keeps_failed_sweeps_and_other_runs_arms(tmp_path, monkeypatch):
    """A sweep that fails still adds its time (resumed, it adds only the rest), and an arm that
    another run on the same store logged meanwhile is kept, not overwritten."""
    import suite.launch.reference as reference

    wall = tmp_path / "reference-wall.json"

    def failing_sweep(sweeps, command):
        wall.write_text(json.dumps({"rezero · gpt2": 12.0}))  # another run, meanwhile
        return 1

    monkeypatch.setattr(reference._Sweeps, "run", failing_sweep)
    with pytest.raises(SystemExit) as stopped:
        reference.run(str(tmp_path), ["preln"], ["gpt2"], preset="tiny")
    assert stopped.value.code == 1
    logged = json.loads(wall.read_text())
    assert logged["rezero · gpt2"] == 12.0 and logged["preln · gpt2"] >= 0


def test_two_runs_finishing_arms_at_once_both_log_their_wall_time(tmp_path, monkeypatch):
    """Two reference runs on one store (an arm each) end in the same instant: the log's
    read-modify-write is one at a time, so neither arm's time overwrites the other's."""
    import threading
    import time

    import suite.launch.reference as reference

    def slow_read(path):
        logged = read_json(path)
        time.sleep(0.3)  # the other run reads now, before this one writes
        return logged

    monkeypatch.setattr(reference, "read_json", slow_read)
    runs = [threading.Thread(target=reference._add_wall_time,
                             args=(str(tmp_path), arm, time.monotonic()))
            for arm in ("preln · gpt2", "postln · gpt2")]  # fmt: skip
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert set(read_json(tmp_path / "reference-wall.json")) == {"preln · gpt2", "postln · gpt2"}


# The reference run with its sweep replaced by a process that waits to be stopped.
_SIGTERMED_RUN = """
import subprocess, sys
import suite.launch.reference as reference

popen = subprocess.Popen
waits = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); " \\
        "print('sweeping', flush=True); time.sleep(120)"
reference.finished_record = lambda store, cell_id: None
reference.subprocess.Popen = lambda command: popen([sys.executable, "-c", waits])
reference.run(sys.argv[1], ["preln"], ["gpt2"], preset="tiny")
"""


def test_a_sigterm_stops_the_arms_sweep_and_still_logs_its_wall_time(tmp_path):
    """``kill PID`` of a reference run (a scheduler's or a shell's way to stop a job): the sweep
    is stopped too, not left running unwatched, and the arm's time so far is logged."""
    import signal
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-c", _SIGTERMED_RUN, str(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in run.stdout:  # the run prints its sweep's command first
            if line.strip() == "sweeping":
                break
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 143  # the sweep's own exit code, passed on
    finally:
        run.kill()
    logged = json.loads((tmp_path / "reference-wall.json").read_text())
    assert logged["preln · gpt2"] >= 0


def test_a_sigterm_as_an_arm_finishes_starts_no_further_arm(tmp_path, monkeypatch):
    """The SIGTERM comes as the sweep exits 0 (too late to pass on): the run still stops rather
    than start the next arm, and logs the finished arm's wall time."""
    import os
    import signal

    import suite.launch.reference as reference

    started = []

    class FinishesAsTheSigtermComes:
        def __init__(self, command):
            started.append(command)

        def send_signal(self, signum):
            pass  # already exited

        def wait(self, timeout=None):
            os.kill(os.getpid(), signal.SIGTERM)
            return 0

    monkeypatch.setattr(reference, "finished_record", lambda store, cell_id: None)
    monkeypatch.setattr(reference.subprocess, "Popen", FinishesAsTheSigtermComes)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        reference.run(str(tmp_path), ["preln", "postln"], ["gpt2"], preset="tiny")
    assert stopped.value.code == 128 + signal.SIGTERM and len(started) == 1
    assert set(read_json(tmp_path / "reference-wall.json")) == {"preln · gpt2"}
    assert signal.getsignal(signal.SIGTERM) == previous  # the run's handler is gone again


def test_an_arm_the_store_holds_whole_is_not_swept_again(tmp_path, monkeypatch):
    import suite.launch.reference as reference

    calls = []
    monkeypatch.setattr(reference, "finished_record", lambda store, cell_id: {"status": "ok"})
    code = 0
    monkeypatch.setattr(reference.subprocess, "call", lambda cmd, **_: calls.append(cmd) or code)
    kept = []  # what run asks ship: keep the arms shipped before (its default)
    monkeypatch.setattr(reference, "ship", lambda store, preset, out, keep: kept.append(keep))
    reference.run(str(tmp_path), ["preln", "postln"], ["gpt2"], preset="tiny")
    assert kept == [True]
    assert [command[1:] for command in calls] == [["-m", "suite.collect", "--store", str(tmp_path)]]
    assert not (tmp_path / "reference-wall.json").exists()
    code = 1  # a collect that failed: nothing ships from a stale table
    with pytest.raises(SystemExit) as stopped:
        reference.run(str(tmp_path), ["preln"], ["gpt2"], preset="tiny")
    assert stopped.value.code == 1


def _collected_store(store: Path, variant: str, preset: str, **columns) -> None:
    """A store whose collected table holds the variant's whole ``preset`` grid (by id)."""
    from suite.launch.reference import expected_cells
    from suite.verdict import rule_description

    environment = ("device_name", "cpu_count", "threads", "parallel_cells", "torch_version",
                   "python_version", "platform", "suite_version", "git_sha", "corpus",
                   "corpus_sha256")  # fmt: skip
    rows = [
        {"cell_id": cell.cell_id(), "status": "ok", "sweep": preset, "variant": variant,
         "backbone": "gpt2", "recipe": "controlled", "depth": cell.model.depth,
         "lr": cell.optim.lr, "seed": cell.seed, "wall_time_s": 1.0,
         "started_at": "2026-12-06T00:00:00+00:00", **dict.fromkeys(environment, "x"),
         "verdict_rule": rule_description(VerdictConfig()),
         "config": json.dumps({"sweep": preset, "seed": cell.seed}, sort_keys=True), **columns}
        for cell in expected_cells(variant, "gpt2", "tiny", str(store))
    ]  # fmt: skip
    store.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(store / RUNS, index=False)


def test_ship_takes_a_grid_cell_by_its_id_whichever_preset_trained_it(tmp_path):
    """A cell another preset trained first has the grid's id, and the grid's sweep resumes it
    instead of training it: ship takes it too (it used to list the arm as incomplete forever)."""
    _collected_store(tmp_path / "store", "preln", preset="claims")
    runs = pd.read_parquet(tmp_path / "store" / RUNS)
    llama = runs.iloc[:1].assign(cell_id="preln-L2-llama-x", backbone="llama")  # not in a grid
    pd.concat([runs, llama]).to_parquet(tmp_path / "store" / RUNS, index=False)
    folder = ship(str(tmp_path / "store"), name="tiny", out=tmp_path / "out")
    table = pd.read_parquet(folder / RUNS)
    assert len(table) == 4 and set(table["sweep"]) == {"tiny"}
    assert {json.loads(config)["sweep"] for config in table["config"]} == {"tiny"}
    environment = read_environment(str(folder))
    assert environment["arms"] == ["preln · gpt2"]
    assert not any("llama" in arm for arm in environment["absent_arms"])


def test_ship_refuses_a_store_judged_by_other_verdict_knobs(tmp_path):
    _collected_store(tmp_path / "store", "preln", preset="tiny", verdict_rule="v2 other")
    with pytest.raises(ConfigError, match="collected with other verdict knobs"):
        ship(str(tmp_path / "store"), name="tiny", out=tmp_path / "out")


def test_ship_extends_what_is_shipped_instead_of_replacing_it(tmp_path):
    """A store that trained one arm (a new built-in, the rest of a backbone, or a lost store's
    successor) adds it to the reference; the arms shipped before stay, each credited to the ship
    it came from, and the store's own whole arm replaces its earlier copy."""
    out = tmp_path / "out"
    for store, variant in (("a", "preln"), ("b", "postln"), ("c", "rezero")):
        _collected_store(tmp_path / store, variant, preset="tiny", val_loss=2.0)
        ship(str(tmp_path / store), name="tiny", out=out)
        if store == "a":
            first = read_environment(str(out))
    table, environment = pd.read_parquet(out / RUNS), read_environment(str(out))
    assert table.groupby("variant").size().to_dict() == {"postln": 4, "preln": 4, "rezero": 4}
    assert environment["arms"] == ["postln · gpt2", "preln · gpt2", "rezero · gpt2"]
    assert environment["kept_arms"]["preln · gpt2"] == {
        "shipped_at": first["shipped_at"],
        "shipped_from": first["shipped_from"],
    }  # fmt: skip: credited to store a, not to b, which only kept it
    assert environment["kept_arms"]["postln · gpt2"]["shipped_from"].endswith(str(tmp_path / "b"))
    assert set(environment["cell_seconds_by_arm"]) == set(environment["arms"])

    _collected_store(tmp_path / "d", "preln", preset="tiny", val_loss=3.0)
    runs = pd.read_parquet(tmp_path / "d" / RUNS)
    runs.iloc[:2].to_parquet(tmp_path / "d" / RUNS, index=False)  # half of Pre-LN's grid
    with pytest.raises(ConfigError, match="holds no finished cell"):
        ship(str(tmp_path / "d"), name="tiny", out=out)  # it would add nothing
    pd.concat([runs, runs.iloc[:1]]).to_parquet(tmp_path / "d" / RUNS, index=False)  # a duplicate
    ship(str(tmp_path / "d"), name="tiny", out=out)  # the store's whole arm wins over its copy
    table = pd.read_parquet(out / RUNS)
    assert sorted(table.loc[table["variant"] == "preln", "val_loss"]) == [3.0] * 4

    ship(str(tmp_path / "d"), name="tiny", out=out, keep_shipped=False)
    assert set(pd.read_parquet(out / RUNS)["variant"]) == {"preln"}
    assert read_environment(str(out))["kept_arms"] == {}


def test_reshipping_the_same_runs_keeps_their_date_a_retrain_gets_a_new_one(tmp_path):
    """A calibration holds for the runs it checked: shipping a store again (to add another arm)
    must not re-date the arms whose runs it ships unchanged, or every calibration reads stale."""
    out = tmp_path / "out"
    _collected_store(
        tmp_path / "a", "preln", preset="tiny", val_loss=2.0, verdict="converged", escape_step=60.0
    )
    ship(str(tmp_path / "a"), name="tiny", out=out)
    first = arm_shipped_at(read_environment(str(out)), "preln · gpt2")
    environment = read_environment(str(out))
    environment["arm_shipped_at"] = {"preln · gpt2": "2026-01-01T00:00:00+00:00"}
    (out / ENVIRONMENT).write_text(json.dumps(environment))  # as if shipped long ago
    ship(str(tmp_path / "a"), name="tiny", out=out)
    environment = read_environment(str(out))
    assert arm_shipped_at(environment, "preln · gpt2") == "2026-01-01T00:00:00+00:00"
    assert environment["shipped_at"] >= first

    _collected_store(tmp_path / "b", "postln", preset="tiny")
    ship(str(tmp_path / "b"), name="tiny", out=out)  # Pre-LN kept: still its first date
    environment = read_environment(str(out))
    assert arm_shipped_at(environment, "preln · gpt2") == "2026-01-01T00:00:00+00:00"
    assert environment["kept_arms"]["preln · gpt2"]["shipped_at"] == "2026-01-01T00:00:00+00:00"
    ship(str(tmp_path / "b"), name="tiny", out=out)
    assert arm_shipped_at(read_environment(str(out)), "preln · gpt2") == "2026-01-01T00:00:00+00:00"

    runs = pd.read_parquet(tmp_path / "a" / RUNS)
    for column, value in (("escape_step", 99.0), ("started_at", "2026-12-07T00:00:00+00:00")):
        runs.loc[0, column] = value  # re-collected with another escape; then trained again
        runs.to_parquet(tmp_path / "a" / RUNS, index=False)
        ship(str(tmp_path / "a"), name="tiny", out=out)
        environment = read_environment(str(out))
        assert arm_shipped_at(environment, "preln · gpt2") == environment["shipped_at"]
        dated = {**environment["arm_shipped_at"], "preln · gpt2": "2026-01-01T00:00:00+00:00"}
        (out / ENVIRONMENT).write_text(json.dumps({**environment, "arm_shipped_at": dated}))


def test_a_calibration_of_an_arm_shipped_unchanged_since_survives_the_next_calibrate(tmp_path):
    """Calibrating one arm keeps the other arms' entries while their runs are the ones they
    checked, and drops an entry whose arm was shipped anew after it."""
    from suite.launch.reference import _merge_calibration

    reference = tmp_path / "reference"
    reference.mkdir()
    environment = {"shipped_at": "2026-03-01", "arm_shipped_at": {"preln · gpt2": "2026-01-01",
                   "postln · gpt2": "2026-03-01", "rezero · gpt2": "2026-01-01"}}  # fmt: skip
    (reference / ENVIRONMENT).write_text(json.dumps(environment))

    def entry(variant: str, **other) -> dict:
        return {"variant": variant, "backbone": "gpt2", "within_tolerance": True, **other}

    earlier = {
        "reference": str(reference.resolve()),
        "reference_shipped_at": "2026-02-01",  # the ship they were checked against
        "cells": [entry("preln"), entry("postln"), entry("rezero", reference_shipped_at="2025")],
    }
    (tmp_path / "calibration.json").write_text(json.dumps(earlier))
    _merge_calibration(str(tmp_path), str(reference), pd.DataFrame([entry("rmsnorm")]))
    merged = json.loads((tmp_path / "calibration.json").read_text())
    assert [(c["variant"], c["reference_shipped_at"]) for c in merged["cells"]] == [
        ("preln", "2026-02-01"),
        ("rmsnorm", "2026-03-01"),
    ]  # fmt: skip: Post-LN shipped anew since; ReZero checked before its runs were shipped


def test_ship_keeps_no_arm_of_an_older_grid_rule_or_a_part_of_one(tmp_path):
    """Kept cells must still be today's whole grid judged by today's rule; the store's partial
    retrain of a kept arm is said, not hidden."""
    out = tmp_path / "out"
    _collected_store(tmp_path / "a", "preln", preset="tiny")
    _collected_store(tmp_path / "b", "rezero", preset="tiny")
    _collected_store(tmp_path / "c", "postln", preset="tiny")
    shipped = pd.concat(pd.read_parquet(tmp_path / s / RUNS) for s in "abc")
    stale = shipped["variant"] == "rezero"
    shipped.loc[stale, "cell_id"] = shipped.loc[stale, "cell_id"] + "-of-an-older-config"
    shipped.loc[shipped["variant"] == "postln", "verdict_rule"] = "v1 an older rule"
    duplicated = shipped[shipped["variant"] == "preln"]
    shipped = pd.concat([shipped[shipped["variant"] != "preln"], duplicated.iloc[[0, 0, 1, 2]]])
    out.mkdir()
    shipped.drop(columns="recipe").to_parquet(out / RUNS, index=False)  # an old table's columns
    (out / ENVIRONMENT).write_text(json.dumps({"shipped_at": "t0", "shipped_from": "s0"}))

    _collected_store(tmp_path / "new", "mixln", preset="tiny")
    runs = pd.read_parquet(tmp_path / "new" / RUNS)
    preln_part = pd.read_parquet(tmp_path / "a" / RUNS).iloc[:1]
    pd.concat([runs, preln_part]).to_parquet(tmp_path / "new" / RUNS, index=False)
    ship(str(tmp_path / "new"), name="tiny", out=out)
    environment = read_environment(str(out))
    assert environment["arms"] == ["mixln · gpt2"]  # 3 distinct Pre-LN cells are not its grid
    assert environment["incomplete_arms"] == {
        "postln · gpt2": "shipped before judged by another verdict rule (v1 an older rule); "
        "not shipped",
        "preln · gpt2": "1 of 4 cells finished; shipped before, not as today's whole grid; "
        "not shipped",
        "rezero · gpt2": "shipped before, not as today's whole grid; not shipped",
    }
    assert "deepnorm · gpt2" in environment["absent_arms"]

    ship(str(tmp_path / "a"), name="tiny", out=out)  # Pre-LN whole; Mix-LN kept
    ship(str(tmp_path / "new"), name="tiny", out=out)  # Mix-LN again, 1 of Pre-LN's 4 beside it
    environment = read_environment(str(out))
    assert environment["arms"] == ["mixln · gpt2", "preln · gpt2"]
    assert environment["kept_arms"]["preln · gpt2"]["store_holds"] == "1 of 4 cells finished"
    assert set(pd.read_parquet(out / RUNS)["recipe"]) == {"controlled"}


def test_ship_refuses_to_ship_over_a_damaged_reference(tmp_path):
    _collected_store(tmp_path / "store", "preln", preset="tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / RUNS).write_bytes(b"not a parquet file")
    with pytest.raises(ConfigError, match="cannot be read .*ship --replace ships the store alone"):
        ship(str(tmp_path / "store"), name="tiny", out=out)
    pd.DataFrame({"variant": ["preln"]}).to_parquet(out / RUNS, index=False)
    with pytest.raises(ConfigError, match="lacks the columns backbone, cell_id, verdict_rule"):
        ship(str(tmp_path / "store"), name="tiny", out=out)
    pd.read_parquet(tmp_path / "store" / RUNS).to_parquet(out / RUNS, index=False)
    with pytest.raises(ConfigError, match="has no readable environment.json beside it"):
        ship(str(tmp_path / "store"), name="tiny", out=out)
    ship(str(tmp_path / "store"), name="tiny", out=out, keep_shipped=False)
    assert read_environment(str(out))["arms"] == ["preln · gpt2"]
