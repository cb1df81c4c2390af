"""nGPT (Loshchilov et al. 2024, arXiv 2410.01131): the whole model against the paper's equations
recomputed by hand (the block alone is in tests/test_variants.py), weights back on the sphere after
every optimizer step of a real run, the paper's recipe (no weight decay), and the options the
variant contract gives it (q/k map, softmax scale, MLP pre-activation scale, logit scale).

The reference here is NVIDIA's model code (github.com/NVIDIA/ngpt, model.py), transcribed into
the suite's backbone: GELU where it has SwiGLU, learned positions where it has RoPE. The PyPI
``ngpt-pytorch`` package was not used: its modules (RoPE, SwiGLU, its own weight
parametrizations) cannot take the suite's weights by copy, so a comparison would test the
transcription, not the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import compose_cell, make_cell
from references import WIDTH, make_model, randomize, ref_attention, ref_mlp, reference_block

from suite.config import ConfigError
from suite.launch import cell as config
from suite.run.runner import build_model, corpus_for, run_cell
from suite.run.train import train


def unit(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return t / torch.sqrt((t**2).sum(dim, keepdim=True))


def test_the_whole_model_is_the_papers_equations():
    model = make_model("ngpt", depth=3).double()
    randomize(model)  # every scale off its init, weights off the sphere: nothing is trivial
    tokens = torch.randint(0, 50, (2, 8))
    h = unit(model.token_embedding.weight[tokens] + model.position_embedding.weight[:8])
    for block in model.blocks:
        h = reference_block("ngpt", block, h, 3)
    s_z = model.output_scale.scale.stored * math.sqrt(WIDTH)  # stored at 1/√d, used × √d
    expected = s_z * (h @ model.head.weight.T)  # no final norm: h is already a unit vector
    torch.testing.assert_close(model(tokens), expected, rtol=1e-10, atol=1e-12)


def test_attention_uses_sqrt_head_dim_as_softmax_scale_and_reports_that_logit():
    model = make_model("ngpt").double()
    randomize(model)
    attn = model.blocks[0].attn
    x = torch.randn(2, 8, WIDTH, dtype=torch.float64)
    torch.testing.assert_close(attn(x), ref_attention(attn, x))
    q, k, _ = attn.queries_keys_values(x)
    head_dim = WIDTH // attn.heads
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    logits = ((q @ k.transpose(-1, -2)) * math.sqrt(head_dim)).abs().masked_fill(~causal, 0)
    assert attn.max_logit(x) == pytest.approx(logits.max().item(), rel=1e-12)
    # The MLP's pre-activation is scaled by s_u·√d before the GELU.
    mlp = model.blocks[0].mlp
    torch.testing.assert_close(mlp(x), ref_mlp(mlp, x))


def test_weights_are_back_on_the_sphere_after_every_step_of_a_real_run():
    cell = make_cell("ngpt", lr=3e-2, depth=2, steps=6)
    cell.diagnostics.enabled = False
    corpus = corpus_for(cell.data)
    torch.manual_seed(0)
    model = build_model(cell, corpus.vocab_size)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    train(model, corpus, cell, torch.device("cpu"))
    assert not torch.allclose(model.blocks[0].attn.qkv.weight, before)  # the steps moved it
    norms = [model.token_embedding.weight.norm(dim=1), model.position_embedding.weight.norm(dim=1)]
    norms.append(model.head.weight.norm(dim=1))
    for block in model.blocks:
        norms += [block.attn.qkv.weight.norm(dim=1), block.mlp.fc.weight.norm(dim=1)]
        norms += [block.attn.proj.weight.norm(dim=0), block.mlp.proj.weight.norm(dim=0)]
    for n in norms:
        torch.testing.assert_close(n, torch.ones_like(n), rtol=0, atol=1e-5)


def test_trains_without_weight_decay_as_the_paper_does_and_the_record_says_so():
    cell = compose_cell(
        "+variant=ngpt",
        "optim.weight_decay=0.1",
        "model.depth=1",
        "train.steps=3",
        "data.max_bytes=300000",
    )
    assert cell.optim.weight_decay == 0.0
    assert compose_cell("+variant=preln", "optim.weight_decay=0.1").optim.weight_decay == 0.1
    cell.diagnostics.enabled = False
    record = run_cell(cell)[0]
    assert record["status"] == "ok" and record["weight_decay"] == 0.0


def test_packed_runs_refuse_it_naming_the_key():
    with pytest.raises(ConfigError, match="^train.pack_lr: variant 'ngpt'"):
        config.validate(make_cell("ngpt", pack_lr=True))


def test_a_depth_parametrization_is_refused_naming_why():
    with pytest.raises(ConfigError, match="^model.parametrization: .*Norm\\(F\\(h\\)\\)"):
        compose_cell("+variant=ngpt", "model.parametrization=completep")


def test_a_weight_decay_set_for_it_is_refused_not_silently_dropped():
    with pytest.raises(ConfigError, match="^optim.weight_decay: variant 'ngpt' trains without"):
        compose_cell("+variant=ngpt", "optim.weight_decay=0.3")
    assert compose_cell("+variant=ngpt", "optim.weight_decay=0").optim.weight_decay == 0.0


def test_packed_runs_refuse_a_variant_with_its_own_softmax_scale():
    """nGPT is refused for its after-step hook already; a plugin with only a softmax scale
    must be refused too, before training, not mid-run."""
    from dataclasses import dataclass

    import variants
    from variants import AttentionOptions, SublayerOptions

    @dataclass
    class ScaledSoftmax(variants.get("preln")):
        def sublayer_options(self) -> SublayerOptions:
            return SublayerOptions(attention=AttentionOptions(softmax_scale=math.sqrt))

    variants.registry._variants["scaled-softmax"] = ScaledSoftmax
    try:
        with pytest.raises(ConfigError, match="^train.pack_lr: .*softmax scale"):
            config.validate(make_cell("scaled-softmax", pack_lr=True))
    finally:
        del variants.registry._variants["scaled-softmax"]
