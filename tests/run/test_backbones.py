"""The llama backbone equals its reference, Hugging Face's LLaMA (transformers, pinned in the dev
extra), by weight copy in float64; every built-in trains on both backbones; the recipes and the
optimizer's decay settings do what they say."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_cell, run_suite

import variants
from suite.config import ConfigError
from suite.launch.preflight import preflight
from suite.run.model import GPT, ModelShape, RotaryEmbedding, swiglu_hidden
from suite.run.optimizers import decays, make_optimizer
from suite.run.runner import build_model, run_cell

llama = pytest.importorskip("transformers.models.llama.modeling_llama")

WIDTH, HEADS, SEQ = 32, 4, 12
TOLERANCE = 1e-10  # float64 round-off; a wrong copy is off by ~1e-2 or more


def reference_config():
    config = llama.LlamaConfig(
        hidden_size=WIDTH,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=swiglu_hidden(WIDTH, 4.0),
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        max_position_embeddings=SEQ,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    config._attn_implementation = "sdpa"  # eager runs its softmax in float32
    return config


class Float64RMSNorm(torch.nn.Module):
    """LlamaRMSNorm's formula, x·rsqrt(mean(x²) + eps)·g, without its cast to float32, so that a
    float64 comparison is limited by float64 round-off (the suite's RMSNorm keeps float64)."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def suite_and_reference(variant: str = "rmsnorm"):
    torch.manual_seed(0)
    shape = ModelShape(
        vocab_size=64, width=WIDTH, heads=HEADS, depth=1, mlp_ratio=4.0, seq_len=SEQ,
        backbone="llama", tie_embeddings=False,
    )  # fmt: skip
    model = GPT(shape, variants.get(variant)()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # gains off 1: nothing trivially equal
    block = model.blocks[0]
    config = reference_config()
    reference = llama.LlamaDecoderLayer(config, layer_idx=0).double()
    attn, mlp = reference.self_attn, reference.mlp
    q, k, v = block.attn.qkv.weight.detach().split(WIDTH)
    hidden = swiglu_hidden(WIDTH, 4.0)
    up, gate = block.mlp.fc.weight.detach().split(hidden)
    with torch.no_grad():
        attn.q_proj.weight.copy_(q)
        attn.k_proj.weight.copy_(k)
        attn.v_proj.weight.copy_(v)
        attn.o_proj.weight.copy_(block.attn.proj.weight)
        mlp.up_proj.weight.copy_(up)
        mlp.gate_proj.weight.copy_(gate)
        mlp.down_proj.weight.copy_(block.mlp.proj.weight)
        if variant == "rmsnorm":
            reference.input_layernorm.weight.copy_(block.wiring.norm_attn.weight)
            reference.post_attention_layernorm.weight.copy_(block.wiring.norm_mlp.weight)
    reference.input_layernorm = Float64RMSNorm(reference.input_layernorm)
    reference.post_attention_layernorm = Float64RMSNorm(reference.post_attention_layernorm)
    rotary = llama.LlamaRotaryEmbedding(config).double()
    return block, reference, rotary


def causal_mask(seq: int) -> torch.Tensor:
    mask = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    return mask[None, None]


def rope_table_float64(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's RoPE table (its default rope parameters: inv_freq = 1/θ^(2i/d), angles
    cat(freqs, freqs)) in float64: LlamaRotaryEmbedding computes it in float32 by design."""
    head_dim = WIDTH // HEADS
    inv_freq = 1.0 / 10_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)[None]
    return angles.cos(), angles.sin()


def run_reference(reference, rotary, x, table=None):
    table = table or rope_table_float64(x.shape[1])
    return reference(x, attention_mask=causal_mask(x.shape[1]), position_embeddings=table)


def test_the_llama_block_equals_hugging_faces_llama_decoder_layer_in_float64():
    block, reference, rotary = suite_and_reference()
    x = torch.randn(3, SEQ, WIDTH, dtype=torch.float64)
    expected = run_reference(reference, rotary, x)
    assert (block(x) - expected).abs().max().item() < TOLERANCE
    # F and G alone, as the backbone defines them for every variant.
    table = rope_table_float64(SEQ)
    f, _ = reference.self_attn(x, position_embeddings=table, attention_mask=causal_mask(SEQ))
    assert (block.attn(x) - f).abs().max().item() < TOLERANCE
    assert (block.mlp(x) - reference.mlp(x)).abs().max().item() < TOLERANCE
    # With Hugging Face's own (float32) RoPE table: equal to that table's round-off.
    own = rotary(x, torch.arange(SEQ)[None])
    assert (block(x) - run_reference(reference, rotary, x, own)).abs().max().item() < 1e-5


def test_a_wrong_copy_does_not_match():
    """Negative controls: gate and up swapped, and RoPE in Meta's interleaved layout."""
    block, reference, rotary = suite_and_reference()
    x = torch.randn(3, SEQ, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        up = reference.mlp.up_proj.weight.clone()
        reference.mlp.up_proj.weight.copy_(reference.mlp.gate_proj.weight)
        reference.mlp.gate_proj.weight.copy_(up)
    assert (block(x) - run_reference(reference, rotary, x)).abs().max().item() > 1e-3

    block, reference, rotary = suite_and_reference()
    rope = block.attn.rope
    interleave = torch.arange(WIDTH // HEADS).view(2, -1).t().reshape(-1)  # (0, h, 1, h+1, …)
    rope.cos, rope.sin = rope.cos[:, interleave], rope.sin[:, interleave]
    assert (block(x) - run_reference(reference, rotary, x)).abs().max().item() > 1e-3


def test_rope_rotates_by_relative_position():
    """q·k after RoPE depends on positions only through their difference (Su et al. 2021)."""
    rope = RotaryEmbedding(8, 32).double()
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    at = torch.stack([q] * 32)[None, None], torch.stack([k] * 32)[None, None]
    rq, rk = rope(at[0])[0, 0], rope(at[1])[0, 0]
    assert torch.dot(rq[10], rk[7]).item() == pytest.approx(torch.dot(rq[23], rk[20]).item())
    assert torch.dot(rq[0], rk[0]).item() == pytest.approx(torch.dot(q, k).item())


@pytest.mark.parametrize("width", [32, 64, 128, 256])
def test_the_swiglu_hidden_width_keeps_gpt2s_parameter_count(width):
    hidden = swiglu_hidden(width, 4.0)
    assert hidden % 8 == 0
    assert 1.0 <= 3 * hidden * width / (2 * 4 * width**2) < 1.04


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
@pytest.mark.parametrize("name", variants.names())
def test_every_built_in_trains_on_both_backbones(name, backbone):
    cell = make_cell(name, depth=2, steps=3, width=32, heads=2)
    cell.model.backbone = backbone
    cell.diagnostics.enabled = False
    record, curve = run_cell(cell)
    assert record["status"] == "ok", record["error"]
    assert record["backbone"] == backbone and len(curve) == 3
    assert all(math.isfinite(row["loss"]) for row in curve)


def test_the_llama_backbone_has_no_position_table_no_biases_and_swiglu():
    cell = make_cell("preln", depth=2, width=32, heads=2)
    cell.model.backbone = "llama"
    model = build_model(cell, vocab_size=64)
    assert model.position_embedding is None
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.endswith("bias") and ".attn." in name for name in names)
    assert model.blocks[0].mlp.fc.weight.shape == (2 * swiglu_hidden(32, 4.0), 32)
    assert type(model.blocks[0].wiring.norm_attn).__name__ == "LayerNorm"  # the variant's norm


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.backbone=mamba", "model.backbone"),
        ("recipe=paper", "recipe"),
        ("optim.weight_decay_mode=both", "optim.weight_decay_mode"),
        ("optim.no_decay=[weights]", "optim.no_decay"),
        ("model.bias=true", "model.bias"),
        ("model.heads=32", "model.heads"),  # head dimension 1: RoPE needs pairs
    ],
)
def test_bad_backbone_recipe_and_decay_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        preflight(["+variant=preln", "sweep=tiny", "model.backbone=llama", override])


def test_unknown_backbone_from_the_command_line_is_one_line(tmp_path):
    result = run_suite("+variant=preln", "sweep=tiny", "model.backbone=mamba", f"store={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.startswith("config error: model.backbone: must be gpt2 or llama")
    assert not (tmp_path / "cells").exists()


def test_default_cells_keep_their_ids_and_new_axes_tag_theirs():
    plain = make_cell("dyt")
    assert "llama" not in plain.cell_id() and "authors" not in plain.cell_id()
    cells = {cell.cell_id(): cell for _, cell in preflight(
        ["+variant=dyt,preln", "sweep=tiny", "model.depth=2", "optim.lr=1e-3",
         "model.backbone=gpt2,llama", "recipe=controlled,authors"]
    )}  # fmt: skip
    ids = sorted(cells)
    # DyT's recipe changes training: four arms. Pre-LN's does not: its authors arm is its
    # controlled cell, so the grid names each Pre-LN cell once per backbone.
    assert sum(i.startswith("dyt-") for i in ids) == 4
    assert sum(i.startswith("preln-") for i in ids) == 2
    assert any("-llama-authors-" in i for i in ids)


@pytest.mark.slow
def test_a_recipe_that_changes_nothing_is_the_controlled_cell_trained_once(tmp_path):
    result = run_suite(
        "+variant=preln",
        "sweep=tiny",
        "model.depth=2",
        "optim.lr=1e-3",
        "train.steps=10",
        "recipe=controlled,authors",
        f"store={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1
    assert "is an earlier job's cell too" in result.stdout
    assert "Summary of this sweep (1 cells" in result.stdout


def test_dyt_and_derf_authors_recipes_scale_the_embeddings_and_set_alpha():
    for name, attn_alpha, other_alpha in (("dyt", 0.8, 0.2), ("derf", 1.0, 1.0)):
        cell = make_cell(name, width=64, heads=4)
        cell.recipe = "authors"
        model = build_model(cell, vocab_size=64)
        assert model.embedding_scale.scale.item() == pytest.approx(8.0)  # √64
        assert model.embedding_scale.scale.requires_grad
        wiring = model.blocks[0].wiring
        assert wiring.norm_attn.alpha.item() == pytest.approx(attn_alpha)
        assert wiring.norm_mlp.alpha.item() == pytest.approx(other_alpha)
        assert model.final_norm.alpha.item() == pytest.approx(other_alpha)
        controlled = build_model(make_cell(name, width=64, heads=4), vocab_size=64)
        assert isinstance(controlled.embedding_scale, torch.nn.Identity)
        assert controlled.blocks[0].wiring.norm_attn.alpha.item() == pytest.approx(0.5)


def test_admins_authors_recipe_feeds_the_first_block_unit_variance():
    cell = make_cell("admin", width=64, heads=4)
    cell.recipe = "authors"
    model = build_model(cell, vocab_size=256)
    stream = model.embed(torch.randint(0, 256, (4, 32)))
    assert stream.var().item() == pytest.approx(1.0, rel=0.2)  # controlled: ~0.0008
    assert not model.embedding_scale.scale.requires_grad  # fairseq's √d is fixed
    assert (
        stream.var().item()
        > 100
        * build_model(make_cell("admin", width=64, heads=4), 256)
        .embed(torch.randint(0, 256, (4, 32)))
        .var()
        .item()
    )


def test_every_built_in_declares_its_recipe_with_a_source():
    for name in variants.names():
        cls = variants.get(name)
        assert "authors_recipe" in cls.__dict__, name  # its own, not inherited
        assert len(cls().authors_recipe().source) > 40, name


def test_no_decay_exempts_exactly_the_named_groups():
    cell = make_cell("preln", width=32, heads=2)
    cell.model.tie_embeddings = False
    model = build_model(cell, vocab_size=64)
    names = dict(model.named_parameters())

    def decayed(no_decay):
        flags = decays(model, no_decay)
        return {name for name, p in names.items() if flags[id(p)]}

    default = decayed(["gains", "biases"])
    assert default == {name for name, p in names.items() if p.dim() >= 2}  # as before 0.4
    olmo2 = decayed(["embeddings", "gains", "biases"])
    assert default - olmo2 == {"token_embedding.weight", "position_embedding.weight"}
    assert "head.weight" not in decayed(["head", "gains", "biases"])
    assert "blocks.0.wiring.norm_attn.weight" in decayed(["biases"])


@pytest.mark.parametrize("mode, expected", [("coupled", 1 - 0.01 * 0.1), ("independent", 1 - 0.1)])
def test_weight_decay_modes(mode, expected):
    """One step at lr 0.01, λ 0.1, zero gradients: coupled decays by η·λ, independent by λ."""
    cell = make_cell("preln", width=32, heads=2, lr=0.01)
    cell.optim.weight_decay_mode = mode
    model = build_model(cell, vocab_size=64)
    optimizer = make_optimizer(model, cell.optim)
    weight = model.blocks[0].attn.qkv.weight
    before = weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), before * expected)


def test_packed_members_decay_as_their_unpacked_cells_in_both_modes():
    from suite.run.runner import run_pack

    for mode in ("coupled", "independent"):
        cells = [make_cell("preln", lr=lr, steps=10) for lr in (1e-3, 3e-3)]
        for cell in cells:
            cell.optim.weight_decay, cell.optim.weight_decay_mode = 0.5, mode
            cell.optim.no_decay = ["embeddings", "gains", "biases"]
            cell.diagnostics.enabled = False
        packed = [curve for _, curve in run_pack(cells)]
        for cell, curve in zip(cells, packed, strict=True):
            _, alone = run_cell(cell)
            assert [r["loss"] for r in curve] == pytest.approx([r["loss"] for r in alone], rel=1e-4)


@pytest.mark.parametrize(
    "option",
    ["muon", "completep", "qk_norm", "z_loss", "value_residual", "packed", "independent_decay"],
)
def test_every_model_and_optimizer_option_trains_on_the_llama_backbone(option):
    from suite.run.runner import run_pack

    cells = [make_cell("preln", depth=2, steps=3, width=32, heads=2, lr=lr) for lr in (1e-3, 3e-3)]
    for cell in cells:
        cell.model.backbone = "llama"
        cell.diagnostics.enabled = False
        if option == "muon":
            cell.optim.name = "muon"
        elif option == "completep":
            cell.model.parametrization = "completep"
        elif option == "qk_norm":
            cell.model.qk_norm = True
        elif option == "z_loss":
            cell.optim.z_loss = 1e-4
        elif option == "value_residual":
            cell.model.value_residual = "learned"
        elif option == "independent_decay":
            cell.optim.weight_decay_mode = "independent"
        elif option == "packed":
            cell.train.pack_lr = True
    results = run_pack(cells) if option == "packed" else [run_cell(cells[0])]
    for record, curve in results:
        assert record["status"] == "ok", record["error"]
        assert len(curve) == 3 and record["backbone"] == "llama"


def test_deepnorm_initialises_swiglus_up_and_gate_as_two_matrices():
    """Xavier's std is per matrix: √(2/(d + h)) for each of up and gate, not of the fused map."""
    from variants.deepnorm import deepnorm_beta

    torch.manual_seed(0)
    shape = ModelShape(
        vocab_size=100, width=64, heads=4, depth=6, mlp_ratio=4.0, seq_len=32, backbone="llama"
    )
    model = GPT(shape, variants.get("deepnorm")())
    hidden = swiglu_hidden(64, 4.0)
    up, gate = model.blocks[0].mlp.fc.weight.detach().split(hidden)
    expected = math.sqrt(2 / (64 + hidden)) * deepnorm_beta(6)
    for part in (up, gate):
        assert part.std().item() == pytest.approx(expected, rel=0.05)


def test_admins_authors_recipe_adds_the_positions_after_the_scale():
    cell = make_cell("admin", width=64, heads=4)
    cell.recipe = "authors"
    model = build_model(cell, vocab_size=256)
    tokens = torch.randint(0, 256, (2, 16))
    expected = 8.0 * model.token_embedding(tokens) + model.position_embedding(torch.arange(16))
    torch.testing.assert_close(model.embed(tokens), expected)


def test_decay_settings_that_train_alike_are_one_cell():
    from helpers import compose_cell

    base = ["+variant=preln", "sweep=tiny"]
    assert (
        compose_cell(*base, "optim.no_decay=[biases,gains]").cell_id()
        == compose_cell(*base).cell_id()
    )
    without = [*base, "optim.weight_decay=0"]
    assert (
        compose_cell(*without, "optim.weight_decay_mode=independent").cell_id()
        == compose_cell(*without).cell_id()
    )
    assert (
        compose_cell(*base, "optim.weight_decay_mode=independent").cell_id()
        != compose_cell(*base).cell_id()
    )


def test_weight_decay_settings_are_arms_of_their_own():
    import pandas as pd

    from suite.analyze.summary import with_arm_labels

    runs = pd.DataFrame(
        {
            "variant": ["preln"] * 3,
            "weight_decay_mode": ["coupled", "independent", "coupled"],
            "no_decay": ['["biases", "gains"]', '["biases", "gains"]', '["embeddings"]'],
        }
    )
    labels = list(with_arm_labels(runs)["variant"])
    assert labels[0] == "preln" and len(set(labels)) == 3
