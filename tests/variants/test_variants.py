"""Each variant's block equals its paper's formula, computed here independently from its weights,
and every built-in keeps the typed contract: its wirings are Wirings, its init sees an ModelView."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
import torch
from helpers import REPO
from references import (
    DEPTH,
    HEADS,
    WIDTH,
    make_model,
    randomize,
    ref_attention,
    ref_layer_norm,
    ref_mlp,
    ref_rms_norm,
    reference_block,
)
from torch import Tensor

import variants
from suite.run.model import GPT, ModelShape
from variants import (
    BlockView,
    LayerNorm,
    ModelView,
    RMSNorm,
    Sublayer,
    Wiring,
    gpt2_residual_std,
)
from variants.deepnorm import DeepNorm, deepnorm_alpha, deepnorm_beta
from variants.registry import BUILT_IN, source

BUILT_INS = [name for name in variants.names() if source(variants.get(name)) == BUILT_IN]


def test_the_variants_page_documents_exactly_the_built_ins():
    page = (REPO / "docs" / "variants.md").read_text()
    table = page.split("| name | block | final norm | init | reference |")[1].split("\n\n")[0]
    assert sorted(re.findall(r"^\| `([\w-]+)` \|", table, flags=re.MULTILINE)) == BUILT_INS


@pytest.mark.parametrize("name", BUILT_INS)
def test_block_matches_formula(name):
    model = make_model(name)
    randomize(model)
    x = model.expand_stream(torch.randn(2, 8, WIDTH))
    slots = isinstance(x, tuple)  # AttnRes: compared as one (batch, seq, slots, width) tensor
    stacked = torch.stack(x, dim=-2) if slots else x
    stacked = stacked + 0.3 * torch.randn_like(stacked)  # streams differ after training
    x = stacked.unbind(-2) if slots else stacked
    for block in model.blocks:
        expected = reference_block(name, block, stacked, DEPTH)
        got = torch.stack(block(x), dim=-2) if slots else block(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_final_norm_placement():
    assert isinstance(make_model("preln").final_norm, LayerNorm)
    assert isinstance(make_model("rmsnorm").final_norm, RMSNorm)
    for name in ("postln", "rezero", "deepnorm"):
        assert isinstance(make_model(name).final_norm, torch.nn.Identity), name


def test_rezero_has_no_norm_anywhere_and_one_alpha_per_layer():
    model = make_model("rezero")
    assert not any(isinstance(m, LayerNorm | RMSNorm | torch.nn.LayerNorm) for m in model.modules())
    alphas = [block.wiring.alpha for block in model.blocks]
    assert len({id(a) for a in alphas}) == DEPTH
    assert all(a.shape == () and a.item() == 0.0 for a in alphas)


def test_rezero_block_is_identity_at_init():
    model = make_model("rezero")
    x = torch.randn(2, 8, WIDTH)
    for block in model.blocks:
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 6, 24])
def test_deepnorm_constants(depth):
    assert deepnorm_alpha(depth) == pytest.approx((2 * depth) ** 0.25)
    assert deepnorm_beta(depth) == pytest.approx((8 * depth) ** -0.25)
    model = make_model("deepnorm", depth=depth)
    assert all(b.wiring.alpha == pytest.approx((2 * depth) ** 0.25) for b in model.blocks)


def test_deepnorm_beta_scales_v_out_and_mlp_but_not_q_k():
    class DeepNormNoBeta(DeepNorm):
        def beta(self, n_layers: int) -> float:
            return 1.0

    depth = 6
    torch.manual_seed(0)
    shape = ModelShape(
        vocab_size=50, width=WIDTH, heads=HEADS, depth=depth, mlp_ratio=4.0, seq_len=8, bias=True
    )
    scaled = GPT(shape, DeepNorm())
    torch.manual_seed(0)
    unscaled = GPT(shape, DeepNormNoBeta())
    beta = (8 * depth) ** -0.25
    for a, b in zip(scaled.blocks, unscaled.blocks, strict=True):
        qa, ka, va = a.attn.qkv.weight.chunk(3)
        qb, kb, vb = b.attn.qkv.weight.chunk(3)
        torch.testing.assert_close(qa, qb)
        torch.testing.assert_close(ka, kb)
        torch.testing.assert_close(va, beta * vb)
        torch.testing.assert_close(a.attn.proj.weight, beta * b.attn.proj.weight)
        torch.testing.assert_close(a.mlp.fc.weight, beta * b.mlp.fc.weight)
        torch.testing.assert_close(a.mlp.proj.weight, beta * b.mlp.proj.weight)
    # The unscaled weights are Xavier-normal (gain 1), as in the DeepNet paper's pseudo-code.
    xavier_std = math.sqrt(2 / (WIDTH + 4 * WIDTH))
    fc = torch.cat([b.mlp.fc.weight.flatten() for b in unscaled.blocks])
    assert fc.std().item() == pytest.approx(xavier_std, rel=0.1)


def test_preln_residual_projection_init_is_scaled_by_depth():
    depth = 8
    model = make_model("preln", depth=depth)
    projections = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert projections.std().item() == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.05)
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert qkv.std().item() == pytest.approx(0.02, rel=0.05)


def test_rmsnorm_is_computed_in_fp32_and_returns_input_dtype():
    norm = RMSNorm(WIDTH)
    x = torch.randn(4, WIDTH, dtype=torch.bfloat16) * 100
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = ref_rms_norm(x.float(), norm).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)


def test_variant_parameters_reach_the_model():
    model = make_model("preln", eps=1e-3)
    assert model.blocks[0].wiring.norm_attn.eps == 1e-3
    assert model.final_norm.eps == 1e-3


def test_model_forward_shape_and_tied_head():
    model = make_model("preln")
    logits = model(torch.randint(0, 50, (2, 8)))
    assert logits.shape == (2, 8, 50)
    assert model.head.weight is model.token_embedding.weight
    assert torch.isfinite(logits).all()


def test_fused_sdpa_matches_explicit_attention():
    model = make_model("preln")
    randomize(model)
    x = torch.randn(3, 8, WIDTH)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn(x), ref_attention(attn, x), rtol=1e-4, atol=1e-5)


def test_peri_ln_normalizes_the_embedding_and_sandwich_does_not():
    assert isinstance(make_model("peri-ln").embedding_norm, LayerNorm)
    assert isinstance(make_model("sandwich").embedding_norm, torch.nn.Identity)
    assert isinstance(make_model("peri-ln").final_norm, LayerNorm)


def test_respost_is_the_identity_at_init():
    model = make_model("respost")
    x = torch.randn(2, 8, WIDTH)
    for block in model.blocks:
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
        assert block.wiring.norm_attn.weight.abs().sum() == 0
        assert block.wiring.norm_mlp.bias.abs().sum() == 0


@pytest.mark.parametrize(("depth", "epsilon"), [(6, 0.1), (18, 0.1), (24, 1e-5), (36, 1e-6)])
def test_layerscale_gamma_starts_at_cait_epsilon(depth, epsilon):
    model = make_model("layerscale", depth=depth)
    for block in model.blocks:
        assert torch.all(block.wiring.gamma_attn == epsilon)
        assert torch.all(block.wiring.gamma_mlp == epsilon)
    assert torch.all(make_model("layerscale", init_scale=0.5).blocks[0].wiring.gamma_mlp == 0.5)


def test_dyt_alpha_starts_at_half_and_replaces_every_norm():
    model = make_model("dyt")
    assert not any(isinstance(m, LayerNorm | RMSNorm) for m in model.modules())
    alphas = [m.alpha.item() for m in model.modules() if type(m).__name__ == "DyT"]
    assert len(alphas) == 2 * DEPTH + 1 and set(alphas) == {0.5}


def test_qk_norm_normalizes_queries_and_keys_before_the_dot_product():
    torch.manual_seed(0)
    shape = ModelShape(
        vocab_size=50,
        width=WIDTH,
        heads=HEADS,
        depth=2,
        mlp_ratio=4.0,
        seq_len=8,
        qk_norm=True,
        bias=True,
    )
    model = GPT(shape, variants.get("preln")())
    randomize(model)
    attn = model.blocks[0].attn
    x = torch.randn(2, 8, WIDTH)
    batch, seq, head = 2, 8, WIDTH // HEADS
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (t.view(batch, seq, HEADS, head).transpose(1, 2) for t in qkv.split(WIDTH, -1))
    q, k = ref_layer_norm(q, attn.q_norm), ref_layer_norm(k, attn.k_norm)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(head)).masked_fill(
        ~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf")
    )
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, WIDTH)
    expected = y @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)
    assert make_model("preln").blocks[0].attn.q_norm is None  # off by default


def test_admin_omega_follows_the_authors_profiling_recursion_on_two_layers():
    """ω_1 = 1, ω_{i+1} = sqrt(Var[ω_i x_i] + Var[F_i(x_i)]), each ω fixed as the profiling pass
    reaches it (Transformer-Clinic, init-type adaptive); recomputed here by hand."""
    model = make_model("admin", depth=2)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (4, 8), generator=generator)
    expected, omega = [], 1.0
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.position_embedding(torch.arange(8))
        for block in model.blocks:
            w = block.wiring
            sublayers = [(lambda t, b=block: ref_attention(b.attn, t), w.norm_attn)]
            sublayers += [(lambda t, b=block: ref_mlp(b.mlp, t), w.norm_mlp)]
            for branch_of, norm in sublayers:
                expected.append(omega)
                branch = branch_of(x)
                omega_next = math.sqrt(
                    (omega * x).var(correction=0).item() + branch.var(correction=0).item()
                )
                x = ref_layer_norm(omega * x + branch, norm)
                omega = omega_next
    got = [
        model.blocks[0].wiring.omega_attn,
        model.blocks[0].wiring.omega_mlp,
        model.blocks[1].wiring.omega_attn,
        model.blocks[1].wiring.omega_mlp,
    ]
    assert expected[0] == 1.0  # the first sublayer keeps its input whole: no eps-dominated LN
    for omega_param, value in zip(got, expected, strict=True):
        assert omega_param.shape == (WIDTH,)
        torch.testing.assert_close(omega_param, torch.full((WIDTH,), value), rtol=1e-4, atol=0)


# The typed contract.
WIRING_FORWARD = {"x": Tensor, "attn": Sublayer, "mlp": Sublayer, "return": Tensor}
SLOT_WIRING_FORWARD = {**WIRING_FORWARD, "x": tuple[Tensor, ...], "return": tuple[Tensor, ...]}


@pytest.mark.parametrize("name", BUILT_INS)
def test_every_wiring_of_a_built_in_is_a_typed_wiring_module(name):
    cls = variants.get(name)
    assert typing.get_type_hints(cls.wiring)["return"] is Wiring
    for block in make_model(name).blocks:
        wiring = block.wiring
        assert isinstance(wiring, Wiring) and isinstance(wiring, torch.nn.Module)
        hints = typing.get_type_hints(type(wiring).forward)
        assert hints in (WIRING_FORWARD, SLOT_WIRING_FORWARD), type(wiring)


class RecordsItsInitView(variants.get("preln")):
    seen: typing.ClassVar[list] = []

    def init_weights(self, model: ModelView) -> None:
        self.seen.append(model)
        super().init_weights(model)


def make_model_of(variant: variants.Variant, **shape) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelShape(50, WIDTH, HEADS, 3, 4.0, 8, bias=True, **shape), variant)


def test_init_weights_gets_only_the_narrow_view():
    RecordsItsInitView.seen.clear()
    model = make_model_of(RecordsItsInitView(), tie_embeddings=False, qk_norm=True)
    (view,) = RecordsItsInitView.seen
    assert type(view) is ModelView and not isinstance(view, torch.nn.Module)
    assert (view.vocab_size, view.seq_len, view.width, view.depth) == (50, 8, WIDTH, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.depth = 4
    for parts, block in zip(view.blocks, model.blocks, strict=True):
        assert type(parts) is BlockView
        assert parts.attn_qkv is block.attn.qkv and parts.attn_out is block.attn.proj
        assert parts.mlp_in is block.mlp.fc and parts.mlp_out is block.mlp.proj
        assert parts.wiring is block.wiring
    assert view.token_embedding is model.token_embedding and view.head is model.head
    assert view.position_embedding is model.position_embedding
    # What its blocks reach: the four linear maps and their wirings, nothing else (no
    # embedding, head, final norm or q/k norms).
    reachable = {
        id(p)
        for parts in view.blocks
        for module in (parts.attn_qkv, parts.attn_out, parts.mlp_in, parts.mlp_out, parts.wiring)
        for p in module.parameters()
    }
    outside = {name for name, p in model.named_parameters() if id(p) not in reachable}
    qk_norms = {
        f"blocks.{layer}.attn.{qk}_norm.{p}"
        for layer in range(3)
        for qk in "qk"
        for p in ("weight", "bias")
    }
    assert outside == {
        "token_embedding.weight",
        "position_embedding.weight",
        "final_norm.weight",
        "final_norm.bias",
        "head.weight",
        *qk_norms,
    }
    # The two ways to run it are the model's own.
    tokens = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(view.embed(tokens), model.embed(tokens), rtol=0, atol=0)
    torch.testing.assert_close(view.forward(tokens), model(tokens), rtol=0, atol=0)


def test_init_view_hands_a_variant_only_its_own_wirings():
    RecordsItsInitView.seen.clear()
    make_model_of(RecordsItsInitView())
    (view,) = RecordsItsInitView.seen
    assert view.wirings(variants.PreLNWiring) == [block.wiring for block in view.blocks]
    with pytest.raises(TypeError, match="block 0's wiring is a PreLNWiring, not a PostLNWiring"):
        view.wirings(variants.PostLNWiring)


@pytest.mark.parametrize("depth", [1, 6, 24])
def test_gpt2_residual_std_is_radford_et_al(depth):
    assert gpt2_residual_std(depth) == 0.02 / math.sqrt(2 * depth)


@pytest.mark.parametrize("name", ["rmsnorm", "sandwich", "peri-ln", "layerscale", "dyt"])
def test_variants_with_gpt2_init_share_pre_ln_weights_exactly(name):
    preln, other = make_model("preln", depth=4), make_model(name, depth=4)
    for a, b in zip(preln.blocks, other.blocks, strict=True):
        for sublayer in ("attn", "mlp"):
            for (key, x), (_, y) in zip(
                getattr(a, sublayer).state_dict().items(),
                getattr(b, sublayer).state_dict().items(),
                strict=True,
            ):
                assert torch.equal(x, y), (name, sublayer, key)
