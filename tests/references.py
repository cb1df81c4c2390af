"""Reference formulas the variant tests check blocks against: each variant's paper formula
computed here independently of the suite's code, from the block's own weights (explicit softmax
attention, explicit norms), plus the tiny model they run on."""

from __future__ import annotations

import math

import torch

import variants
from suite.run.model import GPT, ModelShape
from variants import (
    LayerNorm,
    RMSNorm,
)

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

        a, m = w.block_attn, w.block_mlp  # the full form: one slot per sublayer
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
