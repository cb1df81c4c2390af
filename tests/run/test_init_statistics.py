"""Every built-in starts where its paper says it starts: the sample statistics of the built
model's parameters against the init each paper (or the reference code its docstring names)
states, not only its forward formula.

Each variant has an entry in ``INITS``; a built-in without one fails. An entry gives

- the std of every weight group of the blocks' linear maps and of the embeddings, each drawn
  from a zero-mean normal: checked by sample std (within 5%), sample mean and excess kurtosis
  (a normal's is 0; a uniform's −1.2, a ±2σ truncated normal's −0.8), pooled over the blocks;
- the exact value of every other parameter (norm gains and biases, residual scales, ...), by
  name pattern: every parameter must match one, and every pattern some parameter;
- checks of the whole built model, for what is not a parameter (DeepNorm's α, LNS's 1/√ℓ) or
  is set from data (Admin's profiled ω).

Linear biases start at 0 in every variant. Two shapes: width 256 and depth 6, and width 128 and
depth 20, so depth-dependent constants are checked at two depths; the smallest pooled sample
(the position embedding, 64 × 128 values) keeps the std within 5% by a wide margin.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

import variants
from suite.run.model import GPT, ModelShape
from variants.deepnorm import deepnorm_alpha, deepnorm_beta
from variants.layerscale import cait_epsilon
from variants.registry import BUILT_IN, source

GPT2_STD = 0.02
SHAPES = [(256, 6), (128, 20)]  # (width, depth)
HEADS, SEQ, VOCAB = 4, 64, 512
STD_REL = 0.05

BUILT_INS = [name for name in variants.names() if source(variants.get(name)) == BUILT_IN]

Stds = Callable[[int, int], dict[str, float]]  # (width, depth) -> std of each weight group
Value = float | Callable[[str, Tensor, int], Tensor]  # exact value, or (name, param, depth) -> it
ModelCheck = Callable[[GPT], None]

GROUPS = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


def gpt2(width: int, depth: int) -> dict[str, float]:
    """N(0, 0.02) everywhere (GPT-2; nanoGPT's base init)."""
    return dict.fromkeys(GROUPS, GPT2_STD)


def gpt2_scaled(width: int, depth: int) -> dict[str, float]:
    """GPT-2: N(0, 0.02), the two residual output projections N(0, 0.02/√(2N))."""
    residual = GPT2_STD / math.sqrt(2 * depth)
    return {**gpt2(width, depth), "attn_out": residual, "mlp_out": residual}


def deepnet(width: int, depth: int) -> dict[str, float]:
    """DeepNet's Figure 2: Xavier-normal, gain β = (8N)^-¼ on v, out and both MLP matrices,
    gain 1 on q and k; Xavier's std is gain·√(2 / (fan_in + fan_out))."""
    beta = deepnorm_beta(depth)
    square, mlp = math.sqrt(2 / (2 * width)), math.sqrt(2 / (width + 4 * width))
    return {
        "q": square,
        "k": square,
        "v": beta * square,
        "attn_out": beta * square,
        "mlp_in": beta * mlp,
        "mlp_out": beta * mlp,
    }


def block_of(name: str) -> int:
    return int(re.match(r"blocks\.(\d+)\.", name).group(1))


def channel_constant(name: str, p: Tensor, depth: int) -> Tensor:
    """The same value in every channel (the value itself is checked on the model)."""
    return torch.full_like(p, p.flatten()[0].item())


def one_hot_read(name: str, p: Tensor, depth: int) -> Tensor:
    """HC's width connection A_m = e_{k mod n}, k the sublayer's index (attention 2ℓ, MLP 2ℓ+1)."""
    k = 2 * block_of(name) + (0 if ".attn_connection." in name else 1)
    return torch.eye(p.numel())[k % p.numel()]


def identity(name: str, p: Tensor, depth: int) -> Tensor:
    return torch.eye(p.shape[0])


def layerscale_epsilon(name: str, p: Tensor, depth: int) -> Tensor:
    return torch.full_like(p, cait_epsilon(depth))


def scaled_identity(scale: float) -> Value:
    return lambda name, p, depth: scale * torch.eye(p.shape[0])


@dataclass(frozen=True)
class Init:
    stds: Stds
    params: dict[str, Value]
    """Every parameter outside the linear maps and embeddings, by fnmatch pattern, first match."""
    model_checks: tuple[ModelCheck, ...] = field(default_factory=tuple)


def norms(*prefixes: str, gain: float = 1.0, bias: float | None = 0.0) -> dict[str, Value]:
    """LayerNorm (gain and bias) or, with ``bias=None``, RMSNorm (gain) at ``prefixes``."""
    params: dict[str, Value] = {}
    for prefix in prefixes:
        params[f"{prefix}.weight"] = gain
        if bias is not None:
            params[f"{prefix}.bias"] = bias
    return params


BLOCK_NORMS = ("blocks.*.wiring.norm_attn", "blocks.*.wiring.norm_mlp")
SANDWICH_NORMS = tuple(
    f"blocks.*.wiring.norm_{s}_{io}" for s in ("attn", "mlp") for io in ("in", "out")
)


def deepnorm_alpha_is_set(model: GPT) -> None:
    """α = (2N)^¼ up-weights the residual (a constant, not a parameter)."""
    depth = len(model.blocks)
    assert [b.wiring.alpha for b in model.blocks] == [deepnorm_alpha(depth)] * depth


def lns_scales_are_inverse_sqrt_depth(model: GPT) -> None:
    """1/√ℓ, ℓ = 1 … N (a constant per block, not a parameter)."""
    got = [b.wiring.scale for b in model.blocks]
    assert got == pytest.approx([1 / math.sqrt(ell) for ell in range(1, len(got) + 1)], rel=1e-12)


@torch.no_grad()
def admin_omegas_follow_the_profiling_recursion(model: GPT) -> None:
    """ω_1 = 1 and ω_{i+1} = √(Var[ω_i x_i] + Var[F_i(x_i)]) (Transformer-Clinic's adaptive init),
    measured here on a fresh batch of random tokens, not the profiling batch the init used: the
    statistic holds of the model, not only of that batch."""
    tokens = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[Tensor, Tensor]] = []

    def recorded(sublayer: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            out = sublayer(x)
            seen.append((x, out))
            return out

        return run

    x = model.embed(tokens)
    omegas: list[Tensor] = []
    for block in model.blocks:
        x = block.wiring(x, recorded(block.attn), recorded(block.mlp))
        omegas += [block.wiring.omega_attn, block.wiring.omega_mlp]
    assert torch.all(omegas[0] == 1.0)
    for (x_i, branch), omega, omega_next in zip(seen, omegas, omegas[1:], strict=False):
        expected = math.sqrt((omega * x_i).var(correction=0).item() + branch.var().item())
        assert omega_next[0].item() == pytest.approx(expected, rel=0.1)


def unit_vectors(width: int, depth: int) -> dict[str, float]:
    """nGPT: every matrix and embedding made of unit vectors of length d, whose entries have
    mean square exactly 1/d (std 1/√d); exact unit norms are checked on the model."""
    return dict.fromkeys((*GROUPS, "token_embedding", "position_embedding"), 1 / math.sqrt(width))


def inverse_sqrt_size(name: str, p: Tensor, depth: int) -> Tensor:
    """nGPT's scaled parameters of size d, stored at their init scaling 1/√d."""
    return torch.full_like(p, 1 / math.sqrt(p.numel()))


@torch.no_grad()
def ngpt_starts_on_the_sphere_with_the_papers_scales(model: GPT) -> None:
    """Unit vectors along d (rows of the embeddings, head, W_qkv, W_in; columns of the output
    maps); effective α = 0.05, s_qk = 1, s_u = 1, s_z = 1 (NVIDIA's constants), s_z stored at
    1/√d."""
    d = model.shape.width
    ones = [model.token_embedding.weight.norm(dim=1), model.position_embedding.weight.norm(dim=1)]
    for block in model.blocks:
        ones += [block.attn.qkv.weight.norm(dim=1), block.mlp.fc.weight.norm(dim=1)]
        ones += [block.attn.proj.weight.norm(dim=0), block.mlp.proj.weight.norm(dim=0)]
        for step in (block.wiring.attn_step, block.wiring.mlp_step):
            torch.testing.assert_close(step(), torch.full((d,), 0.05))
        torch.testing.assert_close(block.attn.query_key_map.scale(), torch.ones(d))
        torch.testing.assert_close(block.mlp.hidden_scale.scale(), torch.ones(4 * d))
    for norms_ in ones:
        torch.testing.assert_close(norms_, torch.ones_like(norms_))
    assert torch.all(model.output_scale.scale.stored == 1 / math.sqrt(d))
    torch.testing.assert_close(model.output_scale.scale(), torch.ones(model.shape.vocab_size))


INITS: dict[str, Init] = {
    # Vaswani et al. 2017 state no init; the suite's common N(0, 0.02).
    "postln": Init(gpt2, norms(*BLOCK_NORMS)),
    # nanoGPT / GPT-2 (Radford et al. 2019).
    "preln": Init(gpt2_scaled, norms(*BLOCK_NORMS, "final_norm")),
    # LLaMA's pre-RMSNorm with Pre-LN's init; RMSNorm gains 1, no bias.
    "rmsnorm": Init(gpt2_scaled, norms(*BLOCK_NORMS, "final_norm", bias=None)),
    # ReZero: α = 0 per layer, so every block starts as the identity; no norms.
    "rezero": Init(gpt2, {"blocks.*.wiring.alpha": 0.0}),
    # DeepNet (Wang et al. 2022): Xavier with gain β on v/out/MLP; α = (2N)^¼.
    "deepnorm": Init(deepnet, norms(*BLOCK_NORMS), (deepnorm_alpha_is_set,)),
    # CogView's Sandwich-LN: Pre-LN's init, four LayerNorms per block at gain 1.
    "sandwich": Init(gpt2_scaled, norms(*SANDWICH_NORMS, "final_norm")),
    # Peri-LN: Sandwich plus a LayerNorm on the embedding.
    "peri-ln": Init(gpt2_scaled, norms(*SANDWICH_NORMS, "final_norm", "embedding_norm")),
    # Swin V2's res-post-norm: the branch norms' gain and bias start at 0 (_init_respostnorm).
    "respost": Init(gpt2, {**norms(*BLOCK_NORMS, gain=0.0), **norms("final_norm")}),
    # CaiT's LayerScale: γ per channel at ε(N) = 0.1 (N ≤ 18), 1e-5 (N ≤ 24), 1e-6.
    "layerscale": Init(
        gpt2_scaled,
        {
            "blocks.*.wiring.gamma_*": layerscale_epsilon,
            **norms(*BLOCK_NORMS, "final_norm"),
        },
    ),
    # DyT: α = 0.5 (a scalar per norm), γ = 1, β = 0.
    "dyt": Init(
        gpt2_scaled,
        {"*.alpha": 0.5, **norms(*BLOCK_NORMS, "final_norm")},
    ),
    # Admin: ω per channel, constant; its values checked against the profiling recursion.
    "admin": Init(
        gpt2,
        {"blocks.*.wiring.omega_*": channel_constant, **norms(*BLOCK_NORMS)},
        (admin_omegas_follow_the_profiling_recursion,),
    ),
    # LNS: the paper drops GPT-2's 1/√(2N) (footnote 1); 1/√ℓ is not a parameter.
    "lns": Init(gpt2, norms(*BLOCK_NORMS, "final_norm"), (lns_scales_are_inverse_sqrt_depth,)),
    "mixln": Init(gpt2, norms(*BLOCK_NORMS, "final_norm")),  # the paper's model, no own init
    # Derf: α = 0.5 and s = 0 (scalars), γ = 1, β = 0; DyT's recipe otherwise.
    "derf": Init(
        gpt2_scaled,
        {"*.alpha": 0.5, "*.shift": 0.0, **norms(*BLOCK_NORMS, "final_norm")},
    ),
    # Hyper-Connections: Pre-LN spread over n streams, A_m = e_{k mod n}, A_r = I, B = 1; the
    # dynamic weights W = 0 and their scales s_α = s_β = 0.01.
    "hc": Init(
        gpt2_scaled,
        {
            "blocks.*.wiring.*_connection.read": one_hot_read,
            "blocks.*.wiring.*_connection.mix": identity,
            "blocks.*.wiring.*_connection.write": 1.0,
            "blocks.*.wiring.*_connection.*_weight": 0.0,
            "blocks.*.wiring.*_connection.alpha": 0.01,
            "blocks.*.wiring.*_connection.beta": 0.01,
            **norms("blocks.*.wiring.*_connection.norm", *BLOCK_NORMS, "final_norm"),
        },
    ),
    # HybridNorm: QKV-norm in attention, no norm on its input, the FFN's residual after its
    # norm; RMSNorm gains 1 throughout (the authors' OLMo2 configs), Pre-LN's GPT-2 init.
    "hybridnorm": Init(
        gpt2_scaled,
        {
            "blocks.*.attn.qkv_norms.*.weight": 1.0,
            **norms("blocks.*.wiring.norm_mlp", "final_norm", bias=None),
        },
    ),
    # nGPT: the common Gaussian directions on the unit sphere; the scaled parameters (α, s_qk,
    # s_u, s_z) stored at their init scalings (1/√d, 1/√d, 1, 1/√d).
    "ngpt": Init(
        unit_vectors,
        {
            "blocks.*.wiring.*_step.stored": inverse_sqrt_size,
            "blocks.*.attn.query_key_map.scale.stored": inverse_sqrt_size,
            "blocks.*.mlp.hidden_scale.scale.stored": 1.0,
            "output_scale.scale.stored": channel_constant,
        },
        (ngpt_starts_on_the_sphere_with_the_papers_scales,),
    ),
    # Attention Residuals: pseudo-queries w = 0 (uniform weights over depth at init), key
    # RMSNorm gains 1, Pre-LN's sublayer norms and GPT-2 init.
    "attnres": Init(
        gpt2_scaled,
        {
            "*.query": 0.0,
            "*.key_norm.weight": 1.0,
            **norms(*BLOCK_NORMS, "final_norm"),
        },
    ),
    # mHC: gating scales α = 0.01 (the paper), φ = 0; the biases as the docstring chooses them
    # (b_pre = b_post = 0, b_res = 4·I, near-identity H_res after Sinkhorn).
    "mhc": Init(
        gpt2_scaled,
        {
            "blocks.*.wiring.*_connection.phi_*": 0.0,
            "blocks.*.wiring.*_connection.alpha_*": 0.01,
            "blocks.*.wiring.*_connection.b_pre": 0.0,
            "blocks.*.wiring.*_connection.b_post": 0.0,
            "blocks.*.wiring.*_connection.b_res": scaled_identity(4.0),
            **norms("blocks.*.wiring.*_connection.norm", bias=None),
            **norms(*BLOCK_NORMS, "final_norm"),
        },
    ),
}


def build(name: str, width: int, depth: int) -> GPT:
    torch.manual_seed(0)
    shape = ModelShape(VOCAB, width, HEADS, depth, mlp_ratio=4.0, seq_len=SEQ, bias=True)
    return GPT(shape, variants.get(name)())


def weight_groups(model: GPT) -> dict[str, Tensor]:
    """Each group pooled over the blocks, plus the two embeddings."""
    groups: dict[str, list[Tensor]] = {group: [] for group in GROUPS}
    for block in model.blocks:
        q, k, v = block.attn.qkv.weight.chunk(3)
        for group, weight in zip(
            GROUPS,
            (q, k, v, block.attn.proj.weight, block.mlp.fc.weight, block.mlp.proj.weight),
            strict=True,
        ):
            groups[group].append(weight.detach().flatten())
    pooled = {group: torch.cat(weights) for group, weights in groups.items()}
    pooled["token_embedding"] = model.token_embedding.weight.detach().flatten()
    pooled["position_embedding"] = model.position_embedding.weight.detach().flatten()
    return pooled


def linear_and_embedding_parameters(model: GPT) -> set[int]:
    ids = {id(model.token_embedding.weight), id(model.position_embedding.weight)}
    for block in model.blocks:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            ids |= {id(p) for p in linear.parameters()}
    return ids


def test_every_built_in_has_an_entry():
    assert set(INITS) == set(BUILT_INS), "a built-in needs its paper's init statistics in INITS"


CASES = [(name, width, depth) for name in BUILT_INS for width, depth in SHAPES]


@pytest.mark.parametrize(("name", "width", "depth"), CASES)
def test_init_matches_the_papers_statistics(name, width, depth):
    assert name in INITS, f"{name!r} has no entry in INITS: add its paper's init statistics"
    init = INITS[name]
    model = build(name, width, depth)

    expected_stds = {"token_embedding": 0.02, "position_embedding": 0.02, **init.stds(width, depth)}
    for group, sample in weight_groups(model).items():
        std = sample.std().item()
        assert std == pytest.approx(expected_stds[group], rel=STD_REL), (group, std)
        assert abs(sample.mean().item()) < 0.05 * std, group
        excess_kurtosis = ((sample - sample.mean()) ** 4).mean().item() / std**4 - 3
        assert abs(excess_kurtosis) < 0.25, (group, "not normal", excess_kurtosis)

    for block in model.blocks:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            assert torch.all(linear.bias == 0)

    covered = linear_and_embedding_parameters(model)
    used: set[str] = set()
    for param_name, param in model.named_parameters():
        if id(param) in covered:
            continue
        pattern = next((p for p in init.params if fnmatch.fnmatchcase(param_name, p)), None)
        assert pattern is not None, f"{param_name} has no expected init in INITS[{name!r}]"
        used.add(pattern)
        value = init.params[pattern]
        expected = (
            torch.full_like(param, value)
            if isinstance(value, float)
            else value(param_name, param, depth)
        )
        assert torch.equal(param.detach(), expected.to(param.dtype)), param_name
    assert used == set(init.params), f"patterns matching no parameter: {set(init.params) - used}"

    for check in init.model_checks:
        check(model)
