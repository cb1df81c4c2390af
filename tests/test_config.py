"""Config composition for every variant, and every impossible config rejected before training."""

from __future__ import annotations

import pytest
from helpers import compose_cell, run_suite

import variants
from suite.config import ConfigError
from suite.launch.preflight import preflight


@pytest.mark.parametrize("name", variants.names())
def test_every_variant_composes_with_its_own_parameters(name):
    cell = compose_cell(f"+variant={name}")
    assert cell.variant == name
    assert cell.variant_params == variants.get(name)().params()
    assert cell.sweep == "quick"
    assert (cell.model.width, cell.model.heads, cell.train.steps, cell.train.threads) == (
        64,
        4,
        400,
        1,
    )
    assert cell.model.tie_embeddings is False  # the calibrated quick preset (docs/calibration.md)


def test_variant_parameter_override_from_the_command_line():
    assert compose_cell("+variant=preln", "variant.eps=1e-6").variant_params == {"eps": 1e-6}
    assert compose_cell("+variant=rezero", "variant.alpha_init=0.5").variant_params == {
        "alpha_init": 0.5
    }


def test_quick_sweep_expands_to_the_documented_grid():
    assert len(preflight(["+variant=preln"])) == 2 * 5 * 2
    assert len(preflight(["+variant=postln,preln,rmsnorm,rezero,deepnorm"])) == 5 * 20
    assert len(preflight(["+variant=preln", "model.depth=3"])) == 5 * 2  # command line beats preset
    assert len(preflight(["+variant=preln", "sweep=standard"])) == 4 * 8 * 2 * 3


def test_config_hash_ignores_where_results_go_but_not_what_is_trained():
    a = compose_cell("+variant=preln")
    assert a.config_hash() == compose_cell("+variant=preln", "store=/elsewhere").config_hash()
    assert a.config_hash() != compose_cell("+variant=preln", "optim.lr=0.5").config_hash()
    assert a.config_hash() != compose_cell("+variant=preln", "variant.eps=0.1").config_hash()


BAD = [
    (["model.depth=0"], "model.depth: must be at least 1"),
    (["model.depth=-3"], "model.depth: must be at least 1"),
    (["optim.lr=0"], "optim.lr: must be a positive number"),
    (["optim.lr=-1e-3"], "optim.lr: must be a positive number"),
    (["optim.lr=nan"], "optim.lr: must be a positive number"),
    (["model.heads=3"], "model.heads: must divide model.width=64"),
    (["model.width=abc"], "model.width"),
    (["data=text", "data.path=/no/such/file.txt"], "data.path: no such file"),
    (["data=tokens"], "data.path"),
    (["train.steps=-1"], "train.steps: must be ≥ 0"),
    (["train.dtype=float16"], "train.dtype: must be float32 or bfloat16"),
    (["optim.warmup_steps=10", "optim.warmup_fraction=0.1"], "optim.warmup_fraction"),
    (["verdict.blowup_factor=0.5"], "verdict.blowup_factor"),
    (["variant.eps=oops"], "variant.eps"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_impossible_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").split(":")[0]) as info:
        preflight(["+variant=preln", *overrides])
    assert message in str(info.value)


def test_a_bad_value_anywhere_in_the_sweep_fails_before_any_cell():
    with pytest.raises(ConfigError, match=r"model\.depth.*\n  in the cell: .*model\.depth=0"):
        preflight(["+variant=preln", "model.depth=6,0"])


def test_missing_variant_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="add \\+variant=<name>") as info:
        preflight([])
    assert ", ".join(variants.names()) in str(info.value)


def test_a_variant_registered_after_the_first_sweep_composes_too(monkeypatch):
    """The ConfigStore is filled once per set of variants, not once per call."""
    from dataclasses import dataclass

    from suite.launch.preflight import sweep_cells

    sweep_cells(["+variant=preln"])

    @dataclass
    class LateArrival(variants.get("preln")):
        eps: float = 1e-3

    monkeypatch.setitem(variants.registry._variants, "late-arrival", LateArrival)
    (_, cell), *_ = sweep_cells(["+variant=late-arrival"])
    assert cell.variant == "late-arrival" and cell.variant_params == {"eps": 1e-3}


def test_unknown_variant_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown variant 'nope'") as info:
        preflight(["+variant=preln,nope"])
    assert "registered variants: " + ", ".join(variants.names()) in str(info.value)


def test_cli_rejects_bad_input_before_training(store):
    result = run_suite("+variant=prelnn", f"store={store}", timeout=120)
    assert result.returncode == 2
    assert "unknown variant 'prelnn'" in result.stderr
    assert "registered variants: " + ", ".join(variants.names()) in result.stderr
    result = run_suite("+variant=preln", "model.heads=5", f"store={store}", timeout=120)
    assert result.returncode == 2
    assert "config error: model.heads: must divide model.width=64 (got 5)" in result.stderr
    assert not store.exists()  # nothing ran, nothing written
