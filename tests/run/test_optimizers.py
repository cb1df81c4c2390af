"""The optimizer axis (optim=adamw|muon, suite/run/optimizers.py): which tensor each optimizer
trains, one LR for both, the CLI and the record, cell ids of AdamW runs unchanged, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, make_cell, run_suite

import variants
from suite.config import ConfigError, OptimConfig
from suite.launch.cell import validate
from suite.launch.preflight import sweep_cells
from suite.run.model import GPT, ModelShape
from suite.run.optimizers import Optimizers, hidden_matrices, make_optimizer, set_learning_rate

SUBLAYER_MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")


def model_of(variant: str, **shape) -> GPT:
    torch.manual_seed(0)
    options = {"bias": True, "tie_embeddings": False, "qk_norm": True, "value_residual": "learned"}
    return GPT(ModelShape(60, 32, 2, 3, 4.0, 16, **{**options, **shape}), variants.get(variant)())


def groups_by_optimizer(optimizer) -> dict[str, list[torch.Tensor]]:
    parts = optimizer.optimizers if isinstance(optimizer, Optimizers) else (optimizer,)
    return {
        type(part).__name__: [p for group in part.param_groups for p in group["params"]]
        for part in parts
    }


@pytest.mark.parametrize("variant", ["preln", "hc", "rezero", "layerscale", "mhc"])
def test_muon_trains_the_block_matrices_and_adamw_everything_else(variant):
    model = model_of(variant)
    by_optimizer = groups_by_optimizer(make_optimizer(model, OptimConfig(name="muon")))
    muon, adamw = by_optimizer["Muon"], by_optimizer["AdamW"]
    names = {id(p): name for name, p in model.named_parameters()}
    # Every parameter in exactly one group of one optimizer.
    everything = [id(p) for p in muon + adamw]
    assert len(everything) == len(set(everything)) and set(everything) == set(names)
    in_muon = {names[id(p)] for p in muon}
    expected = {f"blocks.{layer}.{matrix}" for layer in range(3) for matrix in SUBLAYER_MATRICES}
    assert in_muon == expected
    assert all(p.dim() == 2 for p in muon)
    in_adamw = {names[id(p)] for p in adamw}
    for name in ("token_embedding.weight", "position_embedding.weight", "head.weight"):
        assert name in in_adamw
    assert any(".bias" in name for name in in_adamw)  # linear biases
    assert any("q_norm" in name for name in in_adamw)  # norm gains
    assert any("value_residual" in name for name in in_adamw)  # a scalar per head
    wiring = {name for name in names.values() if ".wiring." in name}
    assert wiring and wiring <= in_adamw  # the variant's own: gains, α, γ, stream mixing


def test_hyper_connections_stream_matrices_stay_with_adamw():
    model = model_of("hc")
    by_optimizer = groups_by_optimizer(make_optimizer(model, OptimConfig(name="muon")))
    names = {id(p): name for name, p in model.named_parameters()}
    stream_matrices = [
        name
        for p, name in ((p, names[id(p)]) for p in by_optimizer["AdamW"])
        if ".wiring." in name and p.dim() == 2
    ]
    assert stream_matrices  # HC's static mixing matrices are 2-D, and not Muon's
    assert hidden_matrices(model) == [
        p for p in model.parameters() if names[id(p)].endswith(SUBLAYER_MATRICES)
    ]


def test_a_tied_head_is_the_token_embedding_and_trained_once_by_adamw():
    model = model_of("preln", tie_embeddings=True)
    by_optimizer = groups_by_optimizer(make_optimizer(model, OptimConfig(name="muon")))
    assert sum(p is model.token_embedding.weight for p in by_optimizer["AdamW"]) == 1
    assert not any(p is model.head.weight for p in by_optimizer["Muon"])


def test_adamw_keeps_its_weight_decay_on_matrices_only():
    model = model_of("preln")
    optimizer = make_optimizer(model, OptimConfig(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    for group in optimizer.param_groups:
        assert {p.dim() >= 2 for p in group["params"]} == {group["weight_decay"] == 0.1}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }


def test_one_learning_rate_drives_both_optimizers_at_adamws_update_rms():
    model = model_of("preln")
    optimizer = make_optimizer(model, OptimConfig(name="muon", lr=3e-3, weight_decay=0.05))
    set_learning_rate(optimizer, 1e-3)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}
    (group,) = muon.param_groups
    assert group["adjust_lr_fn"] == "match_rms_adamw"
    assert (group["momentum"], group["nesterov"], group["ns_steps"]) == (0.95, True, 5)
    assert group["weight_decay"] == 0.05  # the same decoupled λ as AdamW's matrices
    # The Moonlight rescaling: an orthogonal update × 0.2·√max(A, B) has RMS ≈ 0.2, about
    # AdamW's, so the same LR moves a Muon matrix about as far as an AdamW one.
    weight = model.blocks[0].mlp.fc.weight
    before = weight.detach().clone()
    model(torch.randint(0, 60, (4, 16))).sum().backward()
    optimizer.step()
    update_rms = ((weight.detach() - before * (1 - 1e-3 * 0.05)) / 1e-3).pow(2).mean().sqrt()
    assert 0.1 < update_rms.item() < 0.3


def test_muon_and_its_knobs_are_in_the_cell_id_and_adamw_ids_are_unchanged():
    def cell_ids(*overrides: str) -> list[str]:
        return [
            cell.cell_id() for _, cell in sweep_cells(["+variant=preln", "sweep=tiny", *overrides])
        ]

    default = cell_ids()
    assert cell_ids("optim=adamw") == default
    muon = cell_ids("optim=muon")
    assert not set(muon) & set(default)
    assert cell_ids("optim=muon", "optim.momentum=0.9") != muon
    # tests/data/store_v0_2_0 (test_old_stores) pins the AdamW ids against a store of 0.2.0.
    assert [c.optim.name for _, c in sweep_cells(["+variant=preln", "sweep=tiny"])] == ["adamw"] * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim=muon", "train.pack_lr=true"], r"^train\.pack_lr: packed runs .* not Muon"),
        (["optim.momentum=0.9"], r"^optim\.momentum: is a Muon setting; it needs optim=muon"),
        (["optim=muon", "optim.ns_steps=0"], r"^optim\.ns_steps: must be in \[1, 100\)"),
        (["optim.name=sgd"], r"^optim\.name: must be adamw or muon"),
    ],
)
def test_impossible_optimizer_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        sweep_cells(["+variant=preln", "sweep=tiny", *overrides])


def test_packed_muon_is_refused_by_validate():
    cell = make_cell(pack_lr=True)
    cell.optim.name = "muon"
    with pytest.raises(ConfigError, match=r"^train\.pack_lr: .*set train\.pack_lr=false"):
        validate(cell)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_every_preset_composes_with_the_optimizer_group(preset):
    cells = [cell for _, cell in sweep_cells(["+variant=preln", f"sweep={preset}"])]
    assert cells
    if preset != "optimizer":
        assert {cell.optim.name for cell in cells} == {"adamw"}


def test_optimizer_preset_crosses_norms_and_optimizers_as_its_header_says():
    header = (REPO / "conf" / "sweep" / "optimizer.yaml").read_text()
    names = "preln,rmsnorm,dyt,derf"
    cells = [cell for _, cell in sweep_cells([f"+variant={names}", "sweep=optimizer"])]
    assert len(cells) == 80 and "= 20 cells per variant, 80 for the four" in header
    assert {c.variant for c in cells} == set(names.split(","))
    assert {c.optim.name for c in cells} == {"adamw", "muon"}
    assert {c.model.depth for c in cells} == {6} and {c.seed for c in cells} == {0, 1}
    assert {c.sweep for c in cells} == {"optimizer"}
    # Every (variant, depth, lr, seed) under both optimizers: the comparison is paired.
    arms: dict[tuple, set[str]] = {}
    for c in cells:
        arms.setdefault((c.variant, c.model.depth, c.optim.lr, c.seed), set()).add(c.optim.name)
    assert all(names == {"adamw", "muon"} for names in arms.values())
    assert len(cells) == 2 * len(arms)


@pytest.mark.slow
def test_a_muon_cell_trains_from_the_command_line_and_says_so_in_its_record(tmp_path):
    store = tmp_path / "store"
    result = run_suite(
        "+variant=preln",
        "sweep=tiny",
        "optim=muon",
        "model.depth=2",
        "optim.lr=3e-2",
        "train.steps=30",
        "hydra/launcher=basic",
        f"store={store}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (record_file,) = (store / "cells").glob("*/record.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "ok" and record["optimizer"] == "muon"
    assert record["config"]["optim"]["name"] == "muon"
    assert record["steps_completed"] == 30 and record["final_loss"] < record["initial_loss"]
    assert "preln · muon" in result.stdout  # the summary names the arm
