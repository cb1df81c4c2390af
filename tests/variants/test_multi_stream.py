"""Variants that own the residual stream: Hyper-Connections (hc) and mHC (mhc), and the contract
hooks they rest on (expand/collapse the stream, a step after each optimizer step).

The formulas are checked against the papers by hand, and against the `hyper-connections`
package (lucidrains, pinned in pyproject's dev extras) by copying weights across, where the
package and the papers agree: HC's width/depth connections with its RMSNorm replaced by the
paper's LayerNorm on zero-mean streams (where the two norms coincide), and mHC's static mappings
(φ = 0: the package normalizes each stream separately where the paper flattens the n streams).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_cell
from torch import nn

import variants
from suite.config import ConfigError
from suite.run.model import GPT, ModelShape, VariantError
from suite.run.runner import run_cell
from variants.hyper_connections import HyperConnection
from variants.mhc import ManifoldHyperConnection, sinkhorn_knopp

WIDTH, HEADS, DEPTH = 16, 2, 3
SHAPE = ModelShape(vocab_size=50, width=WIDTH, heads=HEADS, depth=DEPTH, mlp_ratio=4.0, seq_len=8)


def build(name: str, **params) -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE, variants.get(name)(**params))


def copy_shared_weights(source: GPT, target: GPT) -> None:
    """Every parameter the two models have under the same name (embeddings, sublayers, norms)."""
    target_params = dict(target.named_parameters())
    with torch.no_grad():
        for name, value in source.named_parameters():
            if name in target_params and target_params[name].shape == value.shape:
                target_params[name].copy_(value)


TOKENS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))


def test_one_stream_hyper_connections_are_pre_ln():
    hc, preln = build("hc", streams=1), build("preln")
    copy_shared_weights(hc, preln)
    torch.testing.assert_close(hc(TOKENS), preln(TOKENS), rtol=1e-6, atol=1e-6)


def test_one_stream_mhc_is_pre_ln():
    """H_res = Sinkhorn of a 1×1 matrix = 1 and H_post = 2σ(0) = 1; H_pre = σ(b_pre) only scales
    the sublayer's input, which its LayerNorm removes (exactly as σ → 1)."""
    mhc, preln = build("mhc", streams=1), build("preln")
    with torch.no_grad():
        for module in mhc.modules():
            if isinstance(module, ManifoldHyperConnection):
                module.b_pre.fill_(30.0)
    copy_shared_weights(mhc, preln)
    torch.testing.assert_close(mhc(TOKENS), preln(TOKENS), rtol=1e-5, atol=1e-5)


def zero_mean_streams(batch: int = 2, seq: int = 3, streams: int = 4) -> torch.Tensor:
    x = torch.randn(batch, seq, streams, WIDTH, generator=torch.Generator().manual_seed(2))
    return x - x.mean(dim=-1, keepdim=True)


def test_hyper_connection_matches_the_reference_package_with_weights_copied():
    reference_module = pytest.importorskip("hyper_connections.hyper_connections")
    streams, index = 4, 5
    ours = HyperConnection(WIDTH, streams, index, dynamic=True, eps=1e-12)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in ours.parameters():  # far from the init, so every term counts
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        ours.norm.weight.fill_(1.0)
        ours.norm.bias.zero_()  # the package's RMSNorm has no bias; at gain 1 they agree
    reference = reference_module.HyperConnections(streams, dim=WIDTH, layer_index=index)
    with torch.no_grad():
        reference.static_alpha.copy_(torch.cat([ours.read[:, None], ours.mix], dim=1))
        reference.dynamic_alpha_fn.copy_(
            torch.cat([ours.read_weight[:, None], ours.mix_weight], dim=1)
        )
        reference.dynamic_alpha_scale.copy_(ours.alpha)
        reference.static_beta.copy_(ours.write)
        reference.dynamic_beta_fn.copy_(ours.write_weight)
        reference.dynamic_beta_scale.copy_(ours.beta)
    branch = nn.Linear(WIDTH, WIDTH)
    x = zero_mean_streams(streams=streams)
    expected_input, add_residual = reference(x.transpose(1, 2).flatten(0, 1))  # (b s) t d
    expected = add_residual(branch(expected_input)).unflatten(0, (2, streams)).transpose(1, 2)
    seen = []
    got = ours(x, lambda h: seen.append(h) or branch(h))
    torch.testing.assert_close(seen[0], expected_input, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mhc_static_mappings_match_the_reference_package_with_weights_copied():
    reference_module = pytest.importorskip(
        "hyper_connections.manifold_constrained_hyper_connections"
    )
    streams = 4
    ours = ManifoldHyperConnection(WIDTH, streams, 1e-5, 4.0, iterations=20)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ours.b_pre.copy_(torch.randn(streams, generator=generator))
        ours.b_post.copy_(torch.randn(streams, generator=generator))
        ours.b_res.copy_(torch.randn(streams, streams, generator=generator))
    reference = reference_module.ManifoldConstrainedHyperConnections(streams, dim=WIDTH)
    with torch.no_grad():
        # The package reads stream s into output t with weight M[s, t] (HC's A_rᵀ H), the paper
        # with H_res[t, s]: the same matrix, transposed.
        reference.static_alpha.copy_(torch.cat([ours.b_pre[:, None], ours.b_res.T], dim=1))
        reference.static_beta.copy_(ours.b_post)
    branch = nn.Linear(WIDTH, WIDTH)
    x = torch.randn(2, 3, streams, WIDTH, generator=generator)
    expected_input, add_residual = reference(x.transpose(1, 2).flatten(0, 1))
    expected = add_residual(branch(expected_input)).unflatten(0, (2, streams)).transpose(1, 2)
    torch.testing.assert_close(ours(x, branch), expected, rtol=1e-4, atol=1e-5)


def test_sinkhorn_knopp_gives_a_doubly_stochastic_matrix_in_fp32():
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    matrix = sinkhorn_knopp(logits, iterations=20)
    assert matrix.dtype == torch.float32 and (matrix > 0).all()
    torch.testing.assert_close(matrix.sum(-1), torch.ones(5, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(matrix.sum(-2), torch.ones(5, 4), rtol=0, atol=1e-3)


def plain_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The formula as written, left to autograd: the reference for the hand-written backward."""
    matrix = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iterations):
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
    return matrix


def test_sinkhorn_knopp_and_its_gradient_are_the_unrolled_iterations():
    logits = torch.randn(
        3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    logits = (3 * logits).requires_grad_()  # far from uniform: every iteration counts
    weights = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ours = torch.autograd.grad((sinkhorn_knopp(logits, 20) * weights).sum(), logits)[0]
    plain = torch.autograd.grad((plain_sinkhorn(logits, 20) * weights).sum(), logits)[0]
    torch.testing.assert_close(sinkhorn_knopp(logits, 20), plain_sinkhorn(logits, 20))
    torch.testing.assert_close(ours, plain, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp(x, 3), (logits[:1],))


def log_domain_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The same iterations on log m, left to autograd: exact where exp underflows."""
    for _ in range(iterations):
        logits = logits - logits.logsumexp(dim=-2, keepdim=True)
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    return logits.exp()


def test_sinkhorn_knopp_keeps_a_finite_gradient_for_logits_far_apart():
    """Logits 100 apart, as mHC's grew before a NaN in training: with the global max subtracted,
    column sums of 1e-31 made the fp32 backward (ours and autograd's over the loop) NaN; the log
    domain (its first iteration) keeps it finite and equal to float64's."""
    generator = torch.Generator().manual_seed(11)
    logits, weights = 40 * torch.randn(6, 4, 4, generator=generator), torch.randn(6, 4, 4)
    x, x64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours = torch.autograd.grad((sinkhorn_knopp(x, 20) * weights).sum(), x)[0]
    exact = torch.autograd.grad((plain_sinkhorn(x64, 20) * weights.double()).sum(), x64)[0]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("flush_denormal", [True, False])
def test_sinkhorn_knopp_is_exact_when_a_row_sits_far_below_the_others(flush_denormal):
    """A row whose logits sit 150 below the others' in every column, as mHC's reached at high LR:
    its exp underflows in fp32 (to zero with the denormals flushed, as training runs), so the
    linear-domain iterations divided by a zero or subnormal row sum; in the training runs that
    made the gradient NaN from a finite loss. The result is the doubly stochastic matrix all the
    same (Sinkhorn rescales that row), and it and its gradient equal float64's."""
    generator = torch.Generator().manual_seed(12)
    logits, weights = 3 * torch.randn(8, 4, 4, generator=generator), torch.randn(8, 4, 4)
    logits[:, 2] -= 150
    x, x64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
    flushed = torch.set_flush_denormal(flush_denormal)
    try:
        matrix = sinkhorn_knopp(x, 20)
        ours = torch.autograd.grad((matrix * weights).sum(), x)[0]
    finally:
        torch.set_flush_denormal(False)
    assert flushed  # x86: the setting took
    exact = log_domain_sinkhorn(x64, 20)
    gradient = torch.autograd.grad((exact * weights.double()).sum(), x64)[0]
    torch.testing.assert_close(matrix.double(), exact.detach(), rtol=0, atol=1e-5)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), gradient, rtol=0, atol=1e-5)


def test_the_stream_read_out_and_its_gradients_are_the_plain_products():
    from variants.streams import read_and_mix

    generator = torch.Generator().manual_seed(8)
    streams = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator)
    weights = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator)
    streams.requires_grad_(), weights.requires_grad_()
    read, mixed = read_and_mix(weights, streams)
    plain = (weights.unsqueeze(-1) * streams.unsqueeze(-2)).sum(dim=-3)  # Σ_s w[s, t] H_s
    torch.testing.assert_close(read, plain[..., 0, :])
    torch.testing.assert_close(mixed, plain[..., 1:, :])
    assert torch.autograd.gradcheck(lambda w, h: read_and_mix(w, h), (weights, streams))
    # one set of weights for every token (static HC), and streams that are n views of one copy
    static = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    copy = torch.randn(2, 3, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, h: read_and_mix(w, h.expand(2, 3, 4, 5)), (static, copy)
    )


def plain_hyper_connection(module: HyperConnection, x: torch.Tensor, branch) -> torch.Tensor:
    """Zhu et al.'s dynamic HC as written: the reference for the GEMM-shaped forward."""
    normed = module.norm(x)
    read = module.read + module.alpha * torch.tanh(normed @ module.read_weight)
    mix = module.mix + module.alpha * torch.tanh(normed @ module.mix_weight)
    write = module.write + module.beta * torch.tanh(normed @ module.write_weight)
    h = (read.unsqueeze(-1) * x).sum(dim=-2)
    mixed = (mix.unsqueeze(-1) * x.unsqueeze(-2)).sum(dim=-3)
    return mixed + write.unsqueeze(-1) * branch(h).unsqueeze(-2)


def plain_manifold_hyper_connection(
    module: ManifoldHyperConnection, x: torch.Tensor, branch
) -> torch.Tensor:
    """Xie et al.'s mHC as written: the reference for the factored norm and GEMM-shaped mixing."""
    n = module.streams
    flat = module.norm(x.flatten(-2))
    pre = torch.sigmoid(module.alpha_pre * (flat @ module.phi_pre) + module.b_pre)
    post = 2 * torch.sigmoid(module.alpha_post * (flat @ module.phi_post) + module.b_post)
    res_logits = module.alpha_res * (flat @ module.phi_res).unflatten(-1, (n, n)) + module.b_res
    res = plain_sinkhorn(res_logits, module.iterations)
    h = (pre.unsqueeze(-1) * x).sum(dim=-2)
    mixed = (res.unsqueeze(-1) * x.unsqueeze(-3)).sum(dim=-2)
    return mixed + post.unsqueeze(-1) * branch(h).unsqueeze(-2)


@pytest.mark.parametrize(
    ("connection", "plain"),
    [
        (lambda: HyperConnection(WIDTH, 4, 1, dynamic=True, eps=1e-5), plain_hyper_connection),
        (
            lambda: ManifoldHyperConnection(WIDTH, 4, 1e-5, 4.0, iterations=20),
            plain_manifold_hyper_connection,
        ),
    ],
)
def test_the_fast_connections_equal_the_formula_with_every_gradient(connection, plain):
    torch.manual_seed(9)
    module, branch = connection(), nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():  # far from the init, so that every term counts
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    x = torch.randn(2, 3, 4, WIDTH, requires_grad=True)
    upstream = torch.randn(2, 3, 4, WIDTH)
    results = []
    for forward in (module, lambda h, b: plain(module, h, b)):
        out = forward(x, branch)
        inputs = [x, *module.parameters(), *branch.parameters()]
        results.append((out, torch.autograd.grad((out * upstream).sum(), inputs)))
    (ours, our_grads), (expected, expected_grads) = results
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(our_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_fast_kernels_vmap_over_a_batched_input_beside_an_unbatched_one():
    """Packed runs vmap the model over members; a plugin may batch one input and not another."""
    from variants.attnres import DepthAttention
    from variants.streams import read_and_mix

    streams, value = torch.randn(3, 4, WIDTH), torch.randn(2, 3, WIDTH)
    weights = torch.randn(2, 3, 4, 5)

    def read_out(w: torch.Tensor) -> torch.Tensor:
        return sum(part.square().sum() for part in read_and_mix(w, streams))

    attention = DepthAttention(WIDTH, 1e-5)
    with torch.no_grad():
        attention.query.normal_()
    slots = streams.unbind(-2)

    def read_over_depth(v: torch.Tensor) -> torch.Tensor:  # one slot batched, the others not
        return attention((slots[0], v, slots[2]), 3).square().sum()

    grads = torch.func.vmap(torch.func.grad(read_out))(weights)
    torch.testing.assert_close(grads[1], torch.func.grad(read_out)(weights[1]))
    grads = torch.func.vmap(torch.func.grad(read_over_depth))(value)
    torch.testing.assert_close(grads[1], torch.func.grad(read_over_depth)(value[1]))


@pytest.mark.parametrize("name", ["hc", "mhc", "attnres"])
def test_the_fast_kernels_keep_the_models_dtype(name):
    """A model cast to bfloat16 trains in bfloat16 (the factored norms' fp32 scale is cast
    back), and float64 stays float64 to the last digit (what the gradient checks rely on)."""
    model = build(name, **({"blocks": 2} if name == "attnres" else {})).to(torch.bfloat16)
    logits = model(TOKENS)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    from variants.attnres import DepthAttention

    attention = DepthAttention(WIDTH, 1e-5).double()
    with torch.no_grad():
        attention.query.normal_()
    values = torch.randn(2, 3, 5, WIDTH, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention, (values,))
    with pytest.raises(ValueError, match="iterations must be at least 1"):
        sinkhorn_knopp(torch.zeros(4, 4), iterations=0)


def test_mhc_init_is_pre_ln_spread_over_streams_with_h_res_near_identity():
    mhc = build("mhc")
    connection = mhc.blocks[0].wiring.attn_connection
    pre, post, res = connection.mappings(torch.randn(2, 3, 4, WIDTH))
    torch.testing.assert_close(pre, torch.full_like(pre, 0.5))
    torch.testing.assert_close(post, torch.ones_like(post))
    diagonal = torch.e**4 / (torch.e**4 + 3)
    torch.testing.assert_close(
        res[0, 0], torch.eye(4) * (diagonal - (1 - diagonal) / 3) + (1 - diagonal) / 3
    )
    assert connection.alpha_pre.item() == connection.alpha_res.item() == pytest.approx(0.01)


def test_hc_init_reads_stream_k_mod_n_and_keeps_every_stream():
    hc = build("hc", streams=4)
    for layer, block in enumerate(hc.blocks):
        for offset, connection in enumerate(
            (block.wiring.attn_connection, block.wiring.mlp_connection)
        ):
            assert connection.read.tolist() == torch.eye(4)[(2 * layer + offset) % 4].tolist()
            assert torch.equal(connection.mix, torch.eye(4))
            assert torch.equal(connection.write, torch.ones(4))
            assert connection.alpha.item() == connection.beta.item() == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("connection", "mixing"),
    [
        (lambda: HyperConnection(WIDTH, 4, 0, dynamic=True, eps=1e-5), "mix"),
        (lambda: ManifoldHyperConnection(WIDTH, 4, 1e-5, 4.0, iterations=20), "b_res"),
    ],
)
def test_the_residual_mixing_is_applied(connection, mixing):
    """The pitfall of public ports: the stream-mixing matrix computed but never used. (At init
    every stream holds the same vector, on which any doubly stochastic mix is a no-op, so this
    is checked on streams that differ.)"""
    module = connection()
    x = torch.randn(2, 3, 4, WIDTH, generator=torch.Generator().manual_seed(6))
    branch = nn.Linear(WIDTH, WIDTH)
    before = module(x, branch)
    with torch.no_grad():
        getattr(module, mixing).copy_(getattr(module, mixing).flip(0))
    assert not torch.allclose(module(x, branch), before)


@pytest.mark.parametrize("name", ["hc", "mhc"])
def test_multi_stream_variants_train(name):
    record, curve = run_cell(make_cell(name, steps=5))
    assert record["status"] == "ok", record["error"]
    assert len(curve) == 5


class CountsItsSteps(variants.get("preln")):
    """A plugin with a step after each optimizer step (as nGPT re-normalizes its weights)."""

    steps_seen = 0

    def after_optimizer_step(self, model: variants.ModelView) -> None:
        type(self).steps_seen += 1
        for block in model.blocks:
            block.mlp_in.weight.div_(block.mlp_in.weight.norm(dim=1, keepdim=True))


def test_the_step_after_each_optimizer_step_runs_every_step_and_packed_runs_refuse_it(
    monkeypatch,
):
    from suite.launch import cell as config

    monkeypatch.setitem(variants.registry._variants, "counts-steps", CountsItsSteps)
    CountsItsSteps.steps_seen = 0
    record, _ = run_cell(make_cell("counts-steps", steps=4))
    assert record["status"] == "ok" and CountsItsSteps.steps_seen == 4
    with pytest.raises(ConfigError, match="^train.pack_lr: variant 'counts-steps' acts"):
        config.validate(make_cell("counts-steps", pack_lr=True))


class CollapsesToTheWrongShape(variants.get("preln")):
    def collapse_stream(self, width: int, n_layers: int) -> nn.Module:
        return nn.Linear(width, width + 1)


def test_a_stream_that_does_not_collapse_to_the_model_width_is_refused_at_build():
    with pytest.raises(VariantError, match="collapse_stream gives"):
        GPT(SHAPE, CollapsesToTheWrongShape())


def test_amax_gain_is_one_for_mhc_and_grows_for_an_amplifying_hc():
    from suite.run.diagnostics import Probe, amax_gains

    mhc, hc = build("mhc"), build("hc")
    record = {}
    for name, model in (("mhc", mhc), ("hc", hc)):
        with torch.no_grad():
            if name == "hc":  # what HC may learn and mHC cannot: a mixing that amplifies
                for module in model.modules():
                    if isinstance(module, HyperConnection):
                        module.mix.mul_(1.5)
        probe = Probe(model, TOKENS, TOKENS)
        probe.logits()
        assert len(probe.stream_mixings) == 2 * DEPTH
        record[name] = amax_gains(probe.stream_mixings)
    assert record["mhc"] == pytest.approx((1.0, 1.0), abs=1e-3)
    assert min(record["hc"]) > 1.5 ** (2 * DEPTH) * 0.9


def test_a_multi_stream_run_records_its_amax_gain_and_a_single_stream_run_does_not():
    mhc, _ = run_cell(make_cell("mhc", steps=3))
    preln, _ = run_cell(make_cell("preln", steps=3))
    assert mhc["amax_gain_forward"] == pytest.approx(1.0, abs=1e-3)
    assert mhc["amax_gain_backward"] == pytest.approx(1.0, abs=1e-2)
    assert "amax_gain_forward" not in preln


def test_hybridnorm_star_makes_only_block_zero_pre_norm_and_every_attention_qkv_normed():
    """HybridNorm* (the authors' {0: {attn_norm: True, ffn_residual: False}}): block 0 is
    h = x + F(Norm x), y = h + G(Norm h); later blocks as HybridNorm."""
    from references import WIDTH, make_model, randomize, ref_attention, ref_mlp, ref_rms_norm

    model = make_model("hybridnorm", star=True)  # with biases, as the reference math has them
    randomize(model)
    x = torch.randn(2, 8, WIDTH, generator=torch.Generator().manual_seed(7))
    first, second = model.blocks[0], model.blocks[1]
    assert all(block.attn.qkv_norms is not None for block in model.blocks)
    w = first.wiring
    h = x + ref_attention(first.attn, ref_rms_norm(x, w.norm_attn))
    expected = h + ref_mlp(first.mlp, ref_rms_norm(h, w.norm_mlp))
    torch.testing.assert_close(first(x), expected, rtol=1e-4, atol=1e-5)
    assert second.wiring.norm_attn is None
    h = x + ref_attention(second.attn, x)
    u = ref_rms_norm(h, second.wiring.norm_mlp)
    torch.testing.assert_close(second(x), u + ref_mlp(second.mlp, u), rtol=1e-4, atol=1e-5)


class WrittenForSuite02(variants.get("preln")):
    def init_weights(self, model, n_layers):  # noqa: ANN001, ANN201  (the 0.2 signature)
        pass


def test_a_plugin_with_the_0_2_init_signature_is_told_how_to_migrate():
    with pytest.raises(VariantError, match="since suite 0.3 it takes one, model: ModelView"):
        GPT(SHAPE, WrittenForSuite02())


def test_value_residual_mixes_every_later_blocks_values_with_the_first_blocks():
    """ResFormer: v ← ½v + ½v₁ in blocks 1…N−1; block 0 keeps its own."""
    import dataclasses

    import torch.nn.functional as F

    shape = dataclasses.replace(SHAPE, value_residual="fixed")
    torch.manual_seed(0)
    model = GPT(shape, variants.get("preln")())
    inputs, outputs = {}, {}
    for index, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(lambda m, a, i=index: inputs.__setitem__(i, a[0]))
        block.attn.register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, out))
    model(TOKENS)
    with torch.no_grad():
        first = model.blocks[0].attn
        mixing, first.value_residual = first.value_residual, None
        _, _, v1 = first.queries_keys_values(inputs[0])
        first.value_residual = mixing
        for index in (0, 1, 2):
            attn = model.blocks[index].attn
            mixing, attn.value_residual = attn.value_residual, None
            q, k, v = attn.queries_keys_values(inputs[index])
            attn.value_residual = mixing
            v = v if index == 0 else 0.5 * v + 0.5 * v1
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            expected = attn.proj(y.transpose(1, 2).reshape(inputs[index].shape))
            torch.testing.assert_close(outputs[index], expected, rtol=1e-5, atol=1e-6)
    assert model.first_values.values is None  # nothing held past the forward pass


def test_learned_value_residual_has_one_trained_mix_per_head_and_off_changes_nothing():
    import dataclasses

    learned = dataclasses.replace(SHAPE, value_residual="learned")
    torch.manual_seed(0)
    model = GPT(learned, variants.get("preln")())
    mixes = [block.attn.value_residual.mix for block in model.blocks]
    assert mixes[0] is None and all(mix.shape == (HEADS, 1, 1) for mix in mixes[1:])
    model(TOKENS).logsumexp(-1).mean().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in mixes[1:])
    plain, off = (
        build("preln"),
        GPT(dataclasses.replace(SHAPE, value_residual="off"), variants.get("preln")()),
    )
    torch.manual_seed(0)
    off = GPT(dataclasses.replace(SHAPE, value_residual="off"), variants.get("preln")())
    assert torch.equal(plain(TOKENS), off(TOKENS))


def test_packed_runs_keep_the_value_residual_of_each_member():
    """The first block's values are held across blocks in Python: under vmap too (packed)."""
    import dataclasses

    from suite.run.runner import run_pack

    cells = [make_cell("preln", lr=lr, steps=10) for lr in (1e-3, 1e-2)]
    cells = [
        dataclasses.replace(c, model=dataclasses.replace(c.model, value_residual="learned"))
        for c in cells
    ]
    for (record, curve), cell in zip(run_pack(cells), cells, strict=True):
        alone, alone_curve = run_cell(cell)
        assert record["status"] == alone["status"] == "ok"
        for packed_row, row in zip(curve, alone_curve, strict=True):
            assert packed_row["loss"] == pytest.approx(row["loss"], rel=1e-4)


def test_packed_block_attention_residuals_train_each_member_as_it_would_alone():
    """AttnRes's slots travel between blocks as a tuple and its depth attention is one autograd
    Function: under vmap (packed runs) each member still trains as it does alone."""
    import dataclasses

    from suite.run.runner import run_pack

    cells = [
        dataclasses.replace(
            make_cell("attnres", lr=lr, steps=10, depth=3), variant_params={"blocks": 2}
        )
        for lr in (1e-3, 1e-2)
    ]
    for (record, curve), cell in zip(run_pack(cells), cells, strict=True):
        alone, alone_curve = run_cell(cell)
        assert record["status"] == alone["status"] == "ok"
        for packed_row, row in zip(curve, alone_curve, strict=True):
            assert packed_row["loss"] == pytest.approx(row["loss"], rel=1e-4)


def unit_weights(self, values: tuple, slots: int | None = None) -> torch.Tensor:
    """DepthAttention with every α = 1: the plain sum of the slots read."""
    return sum(values[:slots])


def test_attention_residuals_with_unit_weights_over_depth_is_pre_ln(monkeypatch):
    """Replace AttnRes's softmax weights by ones and every sublayer reads the plain sum of what
    came before, which is Pre-LN's stream: with Pre-LN's weights copied across, the logits agree."""
    from variants.attnres import DepthAttention

    preln, attnres = build("preln"), build("attnres")
    missing, unexpected = attnres.load_state_dict(preln.state_dict(), strict=False)
    assert not unexpected and all(".query" in k or ".key_norm." in k for k in missing)
    tokens = torch.randint(0, 50, (2, 8))
    monkeypatch.setattr(DepthAttention, "forward", unit_weights)
    torch.testing.assert_close(attnres(tokens), preln(tokens))


@pytest.mark.parametrize("blocks", [2, 3, 5])
def test_block_attention_residuals_with_unit_weights_is_pre_ln_too(monkeypatch, blocks):
    """Summed within a block and read over block sums, unit weights still give every sublayer
    the embedding plus all earlier outputs: Pre-LN's stream, whatever the blocks."""
    from variants.attnres import DepthAttention

    preln, attnres = build("preln"), build("attnres", blocks=blocks)
    attnres.load_state_dict(preln.state_dict(), strict=False)
    tokens = torch.randint(0, 50, (2, 8))
    monkeypatch.setattr(DepthAttention, "forward", unit_weights)
    torch.testing.assert_close(attnres(tokens), preln(tokens))


def test_block_attention_residuals_with_one_sublayer_per_block_is_full_attention_residuals():
    full = build("attnres")
    with torch.no_grad():
        for parameter in full.parameters():
            parameter.normal_(std=0.3)  # queries away from 0: the softmax is not uniform
    tokens = torch.randint(0, 50, (2, 8))
    for blocks in (2 * DEPTH, 2 * DEPTH + 3):  # as many blocks as sublayers, or more
        block = build("attnres", blocks=blocks)
        block.load_state_dict(full.state_dict())  # strict: the same parameters, no others
        torch.testing.assert_close(block(tokens), full(tokens), rtol=0, atol=0)
    fewer = build("attnres", blocks=2)
    fewer.load_state_dict(full.state_dict())
    assert not torch.allclose(fewer(tokens), full(tokens))  # blocks of 3 sublayers differ


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_slot_write_leaves_the_other_slots_as_they_were(accumulate):
    """A write makes one new slot and hands the others on as the same tensors: no copy of the
    stream per sublayer (what made Block AttnRes slow on a CPU)."""
    from variants.attnres import put

    stream = tuple(torch.randn(2, 3, 5) for _ in range(4))
    value = torch.randn(2, 3, 5)
    written = put(stream, 2, value, accumulate)
    assert len(written) == 4 and all(written[i] is stream[i] for i in (0, 1, 3))
    torch.testing.assert_close(written[2], value + (stream[2] if accumulate else 0))


@pytest.mark.parametrize("blocks", [0, 2])
def test_attention_residuals_equal_the_formula_as_written_with_every_gradient(monkeypatch, blocks):
    """The hand-written depth attention and slot write against the formula as written: RMSNorm
    materialized before the query, the softmax-weighted sum, a block's first sublayer writing
    its slot and the later ones adding to it, by concatenation."""
    import variants.attnres as attnres

    model = build("attnres", blocks=blocks)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)  # the softmax is not uniform
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(10))

    def loss_and_gradients():
        loss = model(tokens).logsumexp(-1).mean()
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    ours, our_grads = loss_and_gradients()

    def attend(self, values, slots=None):
        values = torch.stack(values[:slots], dim=-2)
        weights = (self.key_norm(values) @ self.query).softmax(dim=-1)
        return (weights.unsqueeze(-1) * values).sum(dim=-2)

    def write(slots, slot, first, value):
        x = torch.stack(slots, dim=-2)
        value = value if first else x[..., slot, :] + value
        return torch.cat([x[..., :slot, :], value.unsqueeze(-2), x[..., slot + 1 :, :]], -2).unbind(
            -2
        )

    def wiring(self, x, attn, mlp):
        for block, first, depth_attn, norm, sublayer in (
            (self.block_attn, self.first_attn, self.depth_attn, self.norm_attn, attn),
            (self.block_mlp, self.first_mlp, self.depth_mlp, self.norm_mlp, mlp),
        ):
            h = depth_attn(x, block if first else block + 1)
            x = write(x, block, first, sublayer(norm(h)))
        return x

    monkeypatch.setattr(attnres.DepthAttention, "forward", attend)
    monkeypatch.setattr(attnres.AttnResWiring, "forward", wiring)
    plain, plain_grads = loss_and_gradients()
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(our_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_depth_attention_reads_the_first_slots_with_exact_gradients():
    """The read of the first k slots against the formula, and gradcheck in float64 for the
    stream (slots not read get nothing), the query and the key norm's gain; batched by vmap."""
    from variants.attnres import DepthAttention

    attention = DepthAttention(WIDTH, 1e-5).double()
    with torch.no_grad():
        attention.query.normal_()
        attention.key_norm.weight.normal_()
    stream = torch.randn(2, 3, 5, WIDTH, dtype=torch.float64, requires_grad=True)
    for slots in (1, 3, 5):
        values = stream[..., :slots, :]
        weights = (attention.key_norm(values) @ attention.query).softmax(dim=-1)
        expected = (weights.unsqueeze(-1) * values).sum(dim=-2)
        torch.testing.assert_close(attention(stream, slots), expected)
        assert torch.autograd.gradcheck(lambda s, k=slots: attention(s, k), (stream,))
    parameters = (attention.query, attention.key_norm.weight)
    assert torch.autograd.gradcheck(lambda *_: attention(stream.detach(), 3), parameters)
    members = torch.randn(4, 2, 3, 5, WIDTH)
    attention = attention.float()

    def read_square(s: torch.Tensor) -> torch.Tensor:
        return attention(s, 3).square().sum()

    grads = torch.func.vmap(torch.func.grad(read_square))(members)
    torch.testing.assert_close(grads[1], torch.func.grad(read_square)(members[1]))
    assert torch.all(grads[..., 3:, :] == 0)
    for slots in (0, 6):
        with pytest.raises(ValueError, match=f"reads 1 to 5 slots, not {slots}"):
            attention(members[0], slots)


def test_depth_attention_refuses_a_second_derivative_and_keeps_half_precision_finite():
    """Its backward treats the weights as constants: a second derivative would be silently
    wrong, so it raises. In float16, s³ at the embedding's init (s ≈ 50) would overflow."""
    from variants.attnres import DepthAttention

    attention = DepthAttention(WIDTH, 1e-5)
    stream = torch.randn(2, 3, 5, WIDTH, requires_grad=True)
    (grad,) = torch.autograd.grad(attention(stream, 3).square().sum(), stream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        grad.sum().backward()
    small = (0.02 * torch.randn(2, 3, 5, WIDTH)).half().requires_grad_()
    attention.half()(small, 4).float().square().sum().backward()
    assert torch.isfinite(small.grad).all()


@pytest.mark.parametrize("kernel", ["depth_attention", "read_and_mix", "sinkhorn_knopp"])
def test_the_hand_written_kernels_compile_whole_under_no_grad_and_with_grad(kernel):
    """Evaluation runs under no_grad: there torch.compile (2.13) broke the graph at AttnRes's
    depth-attention Function (HC's and mHC's traced whole), and recompiled around the break for
    every new model of a compiled sweep."""
    from variants.attnres import DepthAttention
    from variants.streams import read_and_mix

    streams = torch.randn(2, 3, 4, WIDTH, requires_grad=True)
    weights = torch.randn(2, 3, 4, 5, requires_grad=True)
    attention = DepthAttention(WIDTH, 1e-5)
    call = {
        "depth_attention": lambda: attention(streams.unbind(-2), 3),
        "read_and_mix": lambda: read_and_mix(weights, streams)[1],
        "sinkhorn_knopp": lambda: sinkhorn_knopp(weights[..., :4], 5),
    }[kernel]
    compiled = torch.compile(call, backend="eager", fullgraph=True)  # raises at a graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(), call())
    compiled().sum().backward()


def test_depth_attention_sums_many_bfloat16_slots_without_rounding_after_each():
    """A bfloat16 model's read over 49 slots (full AttnRes at depth 24) is summed in fp32 and
    rounded once: within 0.003 of float64 (rounding after every slot gave 0.0057, once 0.0018)."""
    from variants.attnres import DepthAttention

    values = torch.randn(
        4, 8, 49, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    exact = DepthAttention(WIDTH, 1e-5).double()(values)  # w = 0: the uniform mean
    read = DepthAttention(WIDTH, 1e-5).bfloat16()(values.bfloat16())
    assert read.dtype == torch.bfloat16
    assert (read.double() - exact).abs().max() < 0.003


def test_block_attention_residuals_read_the_papers_values():
    """Depth 3 (6 sublayers) in 2 blocks of 3: the slots are [b₀, b₁, b₂]; sublayer 1 reads
    [b₀], 2 and 3 read [b₀, b₁ partial]; 4 reads [b₀, b₁]; 5 and 6 read [b₀, b₁, b₂ partial]."""
    from variants.attnres import block_of

    reads = [block_of(sublayer, 6, 2) for sublayer in range(1, 7)]
    assert reads == [(1, True), (1, False), (1, False), (2, True), (2, False), (2, False)]
    assert [block_of(sublayer, 7, 2) for sublayer in (6, 7)] == [(2, False), (2, False)]
    model = build("attnres", blocks=2)
    x = model.expand_stream(torch.randn(2, 8, WIDTH))
    assert [s.shape for s in x] == [(2, 8, WIDTH)] * 3  # b₀ and a slot per block, not sublayer
    with pytest.raises(ValueError, match="variant.blocks"):
        build("attnres", blocks=-1)


def test_attention_residuals_start_from_the_uniform_mean_and_fill_one_slot_per_sublayer():
    model = build("attnres")
    x = model.expand_stream(torch.randn(2, 8, WIDTH))
    assert [s.shape for s in x] == [(2, 8, WIDTH)] * 7 and all(torch.all(s == 0) for s in x[1:])
    wiring = model.blocks[0].wiring
    values = torch.randn(2, 8, 3, WIDTH)
    torch.testing.assert_close(wiring.depth_attn(values), values.mean(-2))  # w = 0 at init
    y = model.blocks[0](x)
    assert y[0] is x[0] and all(torch.all(s == 0) for s in y[3:])
    assert y[1].abs().sum() > 0 and y[2].abs().sum() > 0


class OneArgumentStreams(variants.get("preln")):
    def expand_stream(self, width: int) -> nn.Module:  # early 0.3's signature
        return nn.Identity()


def test_a_plugin_with_the_early_one_argument_stream_hook_is_told_what_changed():
    hint = r"expand_stream takes 1 arguments; .*\(width, n_layers\)"
    with pytest.raises(VariantError, match=hint):
        GPT(SHAPE, OneArgumentStreams())
