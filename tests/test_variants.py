"""Each variant's block equals its paper's formula, computed here independently from its weights,
and every built-in keeps the typed contract: its wirings are Wirings, its init sees an InitView."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
import torch
from helpers import REPO
from torch import Tensor

import variants
from suite.model import GPT, ModelShape
from variants import (
    BlockView,
    InitView,
    LayerNorm,
    RMSNorm,
    Sublayer,
    Wiring,
    gpt2_residual_std,
)
from variants.deepnorm import DeepNorm, deepnorm_alpha, deepnorm_beta
from variants.registry import BUILT_IN, source

WIDTH, HEADS, DEPTH = 16, 4, 3


def make_model(name: str, depth: int = DEPTH, **params) -> GPT:
    torch.manual_seed(0)
    shape = ModelShape(
        vocab_size=50, width=WIDTH, heads=HEADS, depth=depth, mlp_ratio=4.0, seq_len=8, bias=True
    )
    return GPT(shape, variants.get(name)(**params))


def randomize(module: torch.nn.Module) -> None:
    """Move every parameter (norm gains, biases, ReZero's α) off its init so nothing is trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


# Independent reference math: explicit softmax attention, explicit norms.
def ref_layer_norm(x, norm: LayerNorm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_rms_norm(x, norm: RMSNorm):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ref_attention(attn, x):
    batch, seq, width = x.shape
    head = width // attn.heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.split(width, -1)
    if attn.qkv_norms is not None:  # a variant's QKV-norm (HybridNorm): full width, RMSNorm
        q, k, v = (ref_rms_norm(t, norm) for t, norm in zip((q, k, v), attn.qkv_norms, strict=True))
    q, k, v = (t.view(batch, seq, attn.heads, head).transpose(1, 2) for t in (q, k, v))
    scale = 1 / math.sqrt(head)
    if attn.query_key_map is not None:  # nGPT: s_qk ⊙ q/‖q‖ per head, logits × √d_head
        s_qk = (attn.query_key_map.scale.stored * math.sqrt(width)).view(attn.heads, 1, head)
        q, k = (s_qk * t / torch.sqrt((t**2).sum(-1, keepdim=True)) for t in (q, k))
        scale = math.sqrt(head)
    scores = q @ k.transpose(-1, -2) * scale
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, width)
    return y @ attn.proj.weight.T + attn.proj.bias


def ref_mlp(mlp, x):
    hidden = x @ mlp.fc.weight.T + mlp.fc.bias
    if mlp.hidden_scale is not None:  # nGPT: s_u ⊙ √d (s_u stored at scaling 1)
        hidden = hidden * mlp.hidden_scale.scale.stored * math.sqrt(x.shape[-1])
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return gelu @ mlp.proj.weight.T + mlp.proj.bias


def reference_block(name: str, block, x, n_layers: int):
    F_, G_ = (lambda t: ref_attention(block.attn, t)), (lambda t: ref_mlp(block.mlp, t))
    w = block.wiring
    if name == "postln":
        h = ref_layer_norm(x + F_(x), w.norm_attn)
        return ref_layer_norm(h + G_(h), w.norm_mlp)
    if name == "preln":
        h = x + F_(ref_layer_norm(x, w.norm_attn))
        return h + G_(ref_layer_norm(h, w.norm_mlp))
    if name == "rmsnorm":
        h = x + F_(ref_rms_norm(x, w.norm_attn))
        return h + G_(ref_rms_norm(h, w.norm_mlp))
    if name == "rezero":
        h = x + w.alpha * F_(x)
        return h + w.alpha * G_(h)
    if name == "deepnorm":
        alpha = (2 * n_layers) ** 0.25
        h = ref_layer_norm(alpha * x + F_(x), w.norm_attn)
        return ref_layer_norm(alpha * h + G_(h), w.norm_mlp)
    if name in ("sandwich", "peri-ln"):
        h = x + ref_layer_norm(F_(ref_layer_norm(x, w.norm_attn_in)), w.norm_attn_out)
        return h + ref_layer_norm(G_(ref_layer_norm(h, w.norm_mlp_in)), w.norm_mlp_out)
    if name == "respost":
        h = x + ref_layer_norm(F_(x), w.norm_attn)
        return h + ref_layer_norm(G_(h), w.norm_mlp)
    if name == "layerscale":
        h = x + w.gamma_attn * F_(ref_layer_norm(x, w.norm_attn))
        return h + w.gamma_mlp * G_(ref_layer_norm(h, w.norm_mlp))
    if name == "admin":
        h = ref_layer_norm(w.omega_attn * x + F_(x), w.norm_attn)
        return ref_layer_norm(w.omega_mlp * h + G_(h), w.norm_mlp)
    if name == "dyt":

        def dyt(t, n):
            return n.weight * torch.tanh(n.alpha * t) + n.bias

        h = x + F_(dyt(x, w.norm_attn))
        return h + G_(dyt(h, w.norm_mlp))
    if name == "lns":  # ℓ itself is checked by position in tests/test_new_variants.py
        s = 1 / math.sqrt(w.depth)
        h = x + F_(ref_layer_norm(x, w.norm_attn) * s)
        return h + G_(ref_layer_norm(h, w.norm_mlp) * s)
    if name == "derf":

        def derf(t, n):
            return n.weight * torch.erf(n.alpha * t + n.shift) + n.bias

        h = x + F_(derf(x, w.norm_attn))
        return h + G_(derf(h, w.norm_mlp))
    if name == "mixln":  # Post-LN for the first ⌊N/4⌋ blocks, Pre-LN after
        post = type(w).__name__ == "PostLNWiring"
        return reference_block("postln" if post else "preln", block, x, n_layers)
    if name == "hybridnorm":  # not the star form: no block is Pre-Norm
        h = x + F_(x)
        u = ref_rms_norm(h, w.norm_mlp)
        return u + G_(u)
    if name == "ngpt":  # h ← Norm(h + |α| (Norm F(h) − h)), α = stored × 0.05·√d

        def unit(t):
            return t / torch.sqrt((t**2).sum(-1, keepdim=True))

        def move(t, update, step):
            alpha = (step.stored * 0.05 * math.sqrt(t.shape[-1])).abs()
            return unit(unit(t) + alpha * (unit(update) - unit(t)))

        h = move(x, F_(x), w.attn_step)
        return move(h, G_(h), w.mlp_step)
    if name == "attnres":  # sublayer l reads Σ_{i<l} softmax(wᵀ RMSNorm v_i) v_i of the slots

        def read(depth, values):
            keys = ref_rms_norm(values, depth.key_norm)
            return ((keys @ depth.query).softmax(-1).unsqueeze(-1) * values).sum(-2)

        a, m = w.slot_attn, w.slot_mlp
        out = x.clone()
        out[..., a, :] = F_(ref_layer_norm(read(w.depth_attn, x[..., :a, :]), w.norm_attn))
        out[..., m, :] = G_(ref_layer_norm(read(w.depth_mlp, out[..., :m, :]), w.norm_mlp))
        return out
    if name in ("hc", "mhc"):
        connect = ref_hyper_connection if name == "hc" else ref_manifold_hyper_connection
        h = connect(w.attn_connection, x, lambda t: F_(ref_layer_norm(t, w.norm_attn)))
        return connect(w.mlp_connection, h, lambda t: G_(ref_layer_norm(t, w.norm_mlp)))
    raise AssertionError(name)


def ref_hyper_connection(c, streams, branch):
    """HC (Zhu et al. 2025), dynamic: h = A_mᵀH; H' = A_rᵀH + Bᵀ T(h), streams (..., n, d)."""
    normed = ref_layer_norm(streams, c.norm)
    read = c.read + c.alpha * torch.tanh(normed @ c.read_weight)
    mix = c.mix + c.alpha * torch.tanh(normed @ c.mix_weight)
    write = c.write + c.beta * torch.tanh(normed @ c.write_weight)
    h = (read.unsqueeze(-1) * streams).sum(-2)
    mixed = (mix.unsqueeze(-1) * streams.unsqueeze(-2)).sum(-3)  # Σ_s A_r[s, t] H_s
    return mixed + write.unsqueeze(-1) * branch(h).unsqueeze(-2)


def ref_manifold_hyper_connection(c, streams, branch):
    """mHC (Xie et al. 2025): x' = H_res x + H_postᵀ T(H_pre x), mappings from RMSNorm(vec x)."""
    n = streams.shape[-2]
    flat = ref_rms_norm(streams.flatten(-2), c.norm)
    pre = torch.sigmoid(c.alpha_pre * flat @ c.phi_pre + c.b_pre)
    post = 2 * torch.sigmoid(c.alpha_post * flat @ c.phi_post + c.b_post)
    res = torch.exp(c.alpha_res * (flat @ c.phi_res).view(*flat.shape[:-1], n, n) + c.b_res)
    for _ in range(20):  # Sinkhorn-Knopp: columns, then rows
        res = res / res.sum(-2, keepdim=True)
        res = res / res.sum(-1, keepdim=True)
    h = (pre.unsqueeze(-1) * streams).sum(-2)
    mixed = (res.unsqueeze(-1) * streams.unsqueeze(-3)).sum(-2)  # Σ_j H_res[i, j] x_j
    return mixed + post.unsqueeze(-1) * branch(h).unsqueeze(-2)


BUILT_INS = [name for name in variants.names() if source(variants.get(name)) == BUILT_IN]


def test_the_readme_documents_exactly_the_built_ins():
    readme = (REPO / "README.md").read_text()
    table = readme.split("| name | block | final norm | init | reference |")[1].split("\n\n")[0]
    assert sorted(re.findall(r"^\| `([\w-]+)` \|", table, flags=re.MULTILINE)) == BUILT_INS


@pytest.mark.parametrize("name", BUILT_INS)
def test_block_matches_formula(name):
    model = make_model(name)
    randomize(model)
    x = model.expand_stream(torch.randn(2, 8, WIDTH))
    x = x + 0.3 * torch.randn_like(x)  # a multi-stream variant's streams differ after training
    for block in model.blocks:
        expected = reference_block(name, block, x, DEPTH)
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("name", BUILT_INS)
def test_every_wiring_of_a_built_in_is_a_typed_wiring_module(name):
    cls = variants.get(name)
    assert typing.get_type_hints(cls.wiring)["return"] is Wiring
    for block in make_model(name).blocks:
        wiring = block.wiring
        assert isinstance(wiring, Wiring) and isinstance(wiring, torch.nn.Module)
        assert typing.get_type_hints(type(wiring).forward) == WIRING_FORWARD, type(wiring)


class RecordsItsInitView(variants.get("preln")):
    seen: typing.ClassVar[list] = []

    def init_weights(self, model: InitView) -> None:
        self.seen.append(model)
        super().init_weights(model)


def make_model_of(variant: variants.Variant, **shape) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelShape(50, WIDTH, HEADS, 3, 4.0, 8, bias=True, **shape), variant)


def test_init_weights_gets_only_the_narrow_view():
    RecordsItsInitView.seen.clear()
    model = make_model_of(RecordsItsInitView(), tie_embeddings=False, qk_norm=True)
    (view,) = RecordsItsInitView.seen
    assert type(view) is InitView and not isinstance(view, torch.nn.Module)
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
