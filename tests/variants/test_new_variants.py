"""LayerNorm Scaling (lns) and Dynamic erf (derf): each block against its paper's formula,
recomputed by hand; the init each paper prescribes; and that each trains, alone and packed.

Neither authors' code is pip-installable (LayerNorm-Scaling and Derf are repositories of scripts
and patches), so the formulas are checked against the papers: LNS (arXiv 2502.05795, §4) and
Derf (arXiv 2512.10938, Eq. 10). Derf's point-wise function is also checked by weight copy
against x-transformers' independent ``Derf`` (a dev dependency), and LNS against the suite's
Pre-LN, whose LayerNorm gain and bias absorb the 1/√ℓ.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from helpers import make_cell
from references import WIDTH, make_model, randomize, ref_attention, ref_layer_norm, ref_mlp

from suite.run.runner import run_cell, run_pack
from variants import LayerNorm, RMSNorm
from variants.derf import Derf
from variants.lns import LNSWiring

DEPTH = 4


def ref_erf(t: torch.Tensor) -> torch.Tensor:
    """erf element by element from Python's math library, independent of torch's kernel."""
    values = [math.erf(v) for v in t.detach().double().flatten().tolist()]
    return torch.tensor(values, dtype=t.dtype).view_as(t)


def ref_derf(t: torch.Tensor, norm: Derf) -> torch.Tensor:
    return norm.weight * ref_erf(norm.alpha * t + norm.shift) + norm.bias


# LayerNorm Scaling: h = x + F(LN(x)/√ℓ); y = h + G(LN(h)/√ℓ), ℓ the 1-based depth.


def assert_same_sublayer_weights(model, other) -> None:
    """Every block's attention and MLP weights equal, draw for draw: neither init touches them."""
    for a, b in zip(model.blocks, other.blocks, strict=True):
        for sublayer in ("attn", "mlp"):
            for (key, x), (_, y) in zip(
                getattr(a, sublayer).state_dict().items(),
                getattr(b, sublayer).state_dict().items(),
                strict=True,
            ):
                assert torch.equal(x, y), (sublayer, key)


def test_lns_block_matches_formula():
    model = make_model("lns", depth=DEPTH)
    randomize(model)
    x = torch.randn(2, 8, WIDTH)
    for ell, block in enumerate(model.blocks, start=1):
        w = block.wiring
        h = x + ref_attention(block.attn, ref_layer_norm(x, w.norm_attn) / math.sqrt(ell))
        y = h + ref_mlp(block.mlp, ref_layer_norm(h, w.norm_mlp) / math.sqrt(ell))
        torch.testing.assert_close(block(x), y, rtol=1e-4, atol=1e-5)


def test_lns_is_pre_ln_with_norm_gains_and_biases_divided_by_sqrt_depth():
    """Weight copy into the suite's Pre-LN: LN(x)/√ℓ is a LayerNorm with gain γ/√ℓ and bias
    β/√ℓ; the final norm is not scaled. The whole model's logits must agree."""
    lns, preln = make_model("lns", depth=DEPTH), make_model("preln", depth=DEPTH)
    randomize(lns)
    state = lns.state_dict()
    for ell in range(1, DEPTH + 1):
        for norm in ("norm_attn", "norm_mlp"):
            for p in ("weight", "bias"):
                state[f"blocks.{ell - 1}.wiring.{norm}.{p}"] = state[
                    f"blocks.{ell - 1}.wiring.{norm}.{p}"
                ] / math.sqrt(ell)
    preln.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lns(tokens), preln(tokens), rtol=1e-5, atol=1e-5)


def test_lns_with_one_block_is_pre_ln():
    lns, preln = make_model("lns", depth=1), make_model("preln", depth=1)
    randomize(lns)
    preln.load_state_dict(lns.state_dict())
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lns(tokens), preln(tokens), rtol=0, atol=0)


def test_lns_init_scales_by_depth_and_keeps_the_unscaled_gpt2_weights():
    """1/√ℓ per block, LayerNorms at gain 1 and bias 0, a final LayerNorm, and no init of its
    own: its sublayer weights are the common N(0, 0.02) draw, identical to Post-LN's (which
    has no init of its own either), not Pre-LN's 0.02/√(2N) residual projections."""
    lns, postln = make_model("lns", depth=DEPTH), make_model("postln", depth=DEPTH)
    assert [b.wiring.scale for b in lns.blocks] == [1 / math.sqrt(ell) for ell in range(1, 5)]
    assert all(isinstance(b.wiring, LNSWiring) for b in lns.blocks)
    assert isinstance(lns.final_norm, LayerNorm)
    for block in lns.blocks:
        for norm in (block.wiring.norm_attn, block.wiring.norm_mlp):
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert_same_sublayer_weights(lns, postln)
    assert make_model("lns", eps=1e-3).blocks[0].wiring.norm_mlp.eps == 1e-3


# Derf: γ·erf(α·x + s) + β in place of every LayerNorm of Pre-LN.


def test_derf_block_matches_formula():
    model = make_model("derf", depth=DEPTH)
    randomize(model)  # α, s, γ, β all off their init
    x = torch.randn(2, 8, WIDTH)
    for block in model.blocks:
        w = block.wiring
        h = x + ref_attention(block.attn, ref_derf(x, w.norm_attn))
        y = h + ref_mlp(block.mlp, ref_derf(h, w.norm_mlp))
        torch.testing.assert_close(block(x), y, rtol=1e-4, atol=1e-5)
    h = torch.randn(2, 8, WIDTH)
    torch.testing.assert_close(model.final_norm(h), ref_derf(h, model.final_norm))


def test_derf_matches_x_transformers_derf_by_weight_copy():
    x_transformers = pytest.importorskip("x_transformers.x_transformers")
    ours, theirs = Derf(WIDTH), x_transformers.Derf(WIDTH)
    # Both default to the paper's init: α = 0.5, s = 0, γ = 1, β = 0.
    for a, b in ((ours.alpha, theirs.alpha), (ours.shift, theirs.s)):
        assert a.item() == b.item()
    assert torch.equal(ours.weight, theirs.gamma) and torch.equal(ours.bias, theirs.beta)
    randomize(ours)
    with torch.no_grad():
        theirs.alpha.copy_(ours.alpha)
        theirs.s.copy_(ours.shift)
        theirs.gamma.copy_(ours.weight)
        theirs.beta.copy_(ours.bias)
    x = 3 * torch.randn(2, 8, WIDTH)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_derf_init_replaces_every_norm_and_keeps_dyt_weights():
    """α = 0.5 and s = 0, learnable scalars; γ = 1, β = 0 per channel (the authors' code);
    2N + 1 of them (two per block and the final one); no LayerNorm anywhere; the sublayers'
    weights are DyT's (GPT-2 init with 0.02/√(2N) residual projections), draw for draw."""
    model, dyt = make_model("derf", depth=DEPTH), make_model("dyt", depth=DEPTH)
    assert not any(isinstance(m, LayerNorm | RMSNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, Derf)]
    assert len(norms) == 2 * DEPTH + 1 and model.final_norm is norms[-1]
    for norm in norms:
        assert norm.alpha.shape == () and norm.alpha.item() == 0.5
        assert norm.shift.shape == () and norm.shift.item() == 0.0
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
        assert all(p.requires_grad for p in norm.parameters())
    assert_same_sublayer_weights(model, dyt)
    shifted = make_model("derf", alpha_init=1.0, shift_init=0.25)
    assert shifted.final_norm.alpha.item() == 1.0 and shifted.final_norm.shift.item() == 0.25


def test_derf_scalars_receive_gradients():
    model = make_model("derf", depth=2)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    model(tokens).logsumexp(-1).mean().backward()
    for norm in (m for m in model.modules() if isinstance(m, Derf)):
        assert norm.alpha.grad is not None and norm.alpha.grad.abs() > 0
        assert norm.shift.grad is not None and norm.shift.grad.abs() > 0


# Both build and train through the suite's runner, alone and packed.


@pytest.mark.parametrize("name", ["lns", "derf"])
def test_trains_a_few_steps(name):
    record, curve = run_cell(make_cell(name, depth=3, steps=5))
    assert record["status"] == "ok", record["error"]
    assert record["verdict"] != "diverged"
    losses = [row["loss"] for row in curve]
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["lns", "derf"])
def test_trains_packed_like_alone(name):
    cells = [make_cell(name, lr=lr, depth=3, steps=5) for lr in (1e-3, 3e-3)]
    for cell in cells:
        cell.diagnostics.enabled = False
    for cell, (record, curve) in zip(cells, run_pack(cells), strict=True):
        alone, alone_curve = run_cell(cell)
        assert record["status"] == alone["status"] == "ok"
        assert [r["loss"] for r in curve] == pytest.approx(
            [r["loss"] for r in alone_curve], rel=1e-4
        )


@pytest.mark.slow
def test_every_new_variant_sweeps_through_the_command_line(tmp_path):
    """issue 17: each new built-in runs through the CLI like the others (a few steps each)."""
    from helpers import run_suite

    new = "admin,attnres,derf,hc,hybridnorm,lns,mhc,ngpt"
    result = run_suite(
        f"+variant={new}", "sweep=tiny", "model.depth=2", "train.steps=5", f"store={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "runs.parquet")
    assert sorted(runs["variant"].unique()) == new.split(",")
    assert (runs["status"] == "ok").all() and len(runs) == 16


def test_mixln_gives_the_first_quarter_of_the_blocks_post_ln_and_the_rest_pre_ln():
    model = make_model("mixln", depth=8)
    kinds = [type(block.wiring).__name__ for block in model.blocks]
    assert kinds == ["PostLNWiring"] * 2 + ["PreLNWiring"] * 6
    assert isinstance(model.final_norm, LayerNorm)
    half = make_model("mixln", depth=8, post_fraction=0.5)
    assert [type(b.wiring).__name__ for b in half.blocks].count("PostLNWiring") == 4
