"""Diagnostics: each against a hand computation, the init-gradient finding, and no perturbation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_cell

from suite.config import ConfigError, DiagnosticsConfig
from suite.launch.cell import validate
from suite.record import PER_LAYER_SERIES
from suite.run.data import validation_batches
from suite.run.diagnostics import (
    Diagnostics,
    Probe,
    SpikeCounter,
    ffn_grad_norms,
    is_spike,
    stream_rms,
)
from suite.run.runner import build_model, corpus_for, run_cell
from variants.base import Saturates

CPU = torch.device("cpu")


def model_and_probe(
    variant: str = "preln", depth: int = 3, width: int = 32, heads: int = 2, bias: bool = False
):
    cell = make_cell(variant, depth=depth, width=width, heads=heads)
    cell.model.bias = bias
    corpus = corpus_for(cell.data)
    torch.manual_seed(0)
    model = build_model(cell, corpus.vocab_size)
    (batch,) = validation_batches(corpus, cell.model.seq_len, 4, 1, CPU)
    return model, batch


# --- the spike rule -------------------------------------------------------------------------


def test_spike_is_above_mean_plus_k_sigma_of_the_window():
    history = [1.0, 3.0] * 16  # mean 2, population σ 1
    assert not is_spike(history, 8.0, sigmas=6, min_history=32)  # exactly mean + 6σ
    assert is_spike(history, 8.001, sigmas=6, min_history=32)
    assert not is_spike(history[:-1], 100.0, sigmas=6, min_history=32)  # window not yet full
    assert not is_spike(history, math.nan, sigmas=6, min_history=32)


def test_spike_counter_counts_crafted_spikes_and_ignores_non_finite_history():
    counter = SpikeCounter(window=128, sigmas=6, min_history=32)
    series = [2.0 + 0.01 * math.sin(i) for i in range(200)]
    series[60] = 5.0  # a spike
    series[61] = math.inf  # never a spike, and kept out of the statistics
    series[150] = 3.0  # 1 above the usual level, whose σ is 0.007
    flags = [counter.observe(v) for v in series]
    assert flags[60] and not flags[61]
    # step 150's window (steps 22–149) still holds the 5.0, whose σ hides a rise to 3.0
    assert not flags[150]
    assert counter.count == 1
    later = SpikeCounter(window=64, sigmas=6, min_history=32)
    flags = [later.observe(v) for v in series]
    assert flags[60] and flags[150] and later.count == 2  # a shorter window has forgotten it


def test_spikes_are_counted_in_the_record_and_kept_apart_from_divergence():
    record, curve = run_cell(make_cell("postln", lr=10.0, steps=40))
    assert record["verdict"] == "diverged"
    assert "loss_spike" not in curve[-1]  # the diverging step is divergence, not a spike
    assert record["loss_spikes"] == sum(bool(r.get("loss_spike")) for r in curve)
    assert record["grad_spikes"] == sum(bool(r.get("grad_spike")) for r in curve)


# --- probe measurements against hand computations --------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_max_attention_logit_equals_an_explicit_q_dot_k(bias):
    model, (tokens, targets) = model_and_probe("preln", width=32, heads=4, bias=bias)
    if bias:
        with torch.no_grad():
            model.blocks[0].attn.qkv.bias.normal_()
    attn, norm = model.blocks[0].attn, model.blocks[0].wiring.norm_attn
    x = norm(model.token_embedding(tokens) + model.position_embedding.weight[: tokens.shape[1]])
    width, heads = 32, 4
    head_dim = width // heads
    w_q, w_k, _ = attn.qkv.weight.split(width)
    bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(3 * width)
    b_q, b_k, _ = bias.split(width)
    expected = 0.0
    x, w_q, w_k, b_q, b_k = (t.detach() for t in (x, w_q, w_k, b_q, b_k))
    for b in range(tokens.shape[0]):
        q = (x[b] @ w_q.T + b_q).view(-1, heads, head_dim)
        k = (x[b] @ w_k.T + b_k).view(-1, heads, head_dim)
        for h in range(heads):
            for i in range(tokens.shape[1]):
                for j in range(i + 1):  # causal: a query sees keys at or before it
                    logit = abs(float(q[i, h] @ k[j, h])) / math.sqrt(head_dim)
                    expected = max(expected, logit)
    assert attn.max_logit(x) == pytest.approx(expected, rel=1e-5)
    probe = Probe(model, tokens, targets)
    probe.logits()
    assert probe.attn_logit_max[0] == pytest.approx(expected, rel=1e-5)
    assert len(probe.attn_logit_max) == len(model.blocks)


def test_qk_norm_bounds_the_measured_logit():
    cell = make_cell("preln", width=32, heads=2)
    cell.model.qk_norm = True
    model = build_model(cell, 256)
    x = 50 * torch.randn(2, 16, 32)
    # with unit-gain LayerNormed q and k, |q·k| ≤ ‖q‖‖k‖ = d_head, so the logit is ≤ √d_head
    assert model.blocks[0].attn.max_logit(x) <= math.sqrt(16) + 1e-4


def test_activation_rms_log_z_and_model_update_by_hand():
    model, batch = model_and_probe("postln")
    diagnostics = Diagnostics(model, batch, DiagnosticsConfig())
    diagnostics.at_init()
    record = diagnostics.record
    # Post-LN ends every block in a unit-gain, zero-bias LayerNorm: RMS exactly 1 at init
    assert record["init_act_rms_by_layer"] == pytest.approx([1.0] * 3, abs=1e-3)
    with torch.no_grad():
        logits = model(batch[0])
    assert record["init_log_z"] == pytest.approx(torch.logsumexp(logits, -1).mean().item())
    # no update yet: the model update is zero
    before = diagnostics.snapshot()
    row = diagnostics.after_step(5.0, 1.0, before, diverged=False)
    assert row["model_update"] == 0.0 and row["update_ratio"] == 0.0
    # one hand-made update: ratio ‖Δθ‖/‖θ‖, and the final hidden state moves
    before = diagnostics.snapshot()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    row = diagnostics.after_step(5.0, 1.0, before, diverged=False)
    assert row["update_ratio"] == pytest.approx(0.01, rel=1e-4)
    assert row["model_update"] > 0
    assert row["grad_rms"] == pytest.approx(1.0 / math.sqrt(model.num_parameters()))


def test_init_gradient_norms_are_the_ffn_weight_gradients_on_the_probe_batch():
    model, batch = model_and_probe("preln")
    diagnostics = Diagnostics(model, batch, DiagnosticsConfig())
    diagnostics.at_init()
    assert all(p.grad is None for p in model.parameters())  # nothing left for training to see
    tokens, targets = batch
    F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
    assert diagnostics.record["init_grad_norm_by_layer"] == pytest.approx(ffn_grad_norms(model))


def test_post_ln_init_gradients_lean_toward_the_output_relative_to_pre_ln():
    """Xiong et al. 2020, Fig. 3: at init Post-LN's FFN gradient norm grows toward the output
    while Pre-LN's does not. Here (GPT-2 init) Post-LN is flat and Pre-LN falls toward the
    output, so the published direction shows as Post-LN's last/first ratio above Pre-LN's."""
    ratios = {}
    for variant in ("postln", "preln"):
        model, batch = model_and_probe(variant, depth=24, width=64, heads=4)
        diagnostics = Diagnostics(model, batch, DiagnosticsConfig())
        diagnostics.at_init()
        ratios[variant] = diagnostics.record["init_grad_norm_ratio"]
    assert ratios["postln"] > 1.1 * ratios["preln"], ratios


# --- in a run -------------------------------------------------------------------------------


def test_diagnostics_do_not_perturb_training():
    on = make_cell("postln", depth=3, steps=30, lr=3e-3)
    off = make_cell("postln", depth=3, steps=30, lr=3e-3)
    off.diagnostics.enabled = False
    record_on, curve_on = run_cell(on)
    record_off, curve_off = run_cell(off)
    assert [r["loss"] for r in curve_on] == [r["loss"] for r in curve_off]
    assert [r["grad_norm"] for r in curve_on] == [r["grad_norm"] for r in curve_off]
    assert record_on["val_loss"] == record_off["val_loss"]
    assert record_on["cell_id"] == record_off["cell_id"]  # not part of what defines the result
    assert "model_update" in curve_on[0] and "model_update" not in curve_off[0]
    assert "init_grad_norm_by_layer" not in record_off


def test_sampling_schedule_and_record_fields():
    record, curve = run_cell(make_cell("preln", depth=2, steps=45))
    sampled = [r["step"] for r in curve if "model_update" in r]
    assert sampled == [*range(10), 20, 40]  # every step for early_steps=10, then every 20
    assert all(len(r["attn_logit_max_by_layer"]) == 2 for r in curve if "model_update" in r)
    sampled_max = max(max(r["attn_logit_max_by_layer"]) for r in curve if "model_update" in r)
    assert record["max_attn_logit"] == max(sampled_max, record["init_attn_logit_max"])
    assert record["early_model_update"] == curve[9]["model_update"] > 0
    assert len(record["final_act_rms_by_layer"]) == 2
    assert 0 < record["diagnostics_s"] < record["wall_time_s"]


def test_zero_step_run_measures_init_only():
    record, curve = run_cell(make_cell("postln", depth=4, steps=0))
    assert record["status"] == "ok" and record["verdict"] == "untrained"
    assert curve == [] and record["steps_completed"] == 0
    assert len(record["init_grad_norm_by_layer"]) == 4
    assert math.isfinite(record["init_grad_norm_ratio"])


@pytest.mark.parametrize(
    ("key", "value"),
    [("every", 0), ("probe_batch", 0), ("spike_sigmas", -1.0), ("spike_min_history", 500)],
)
def test_impossible_diagnostics_config_names_the_key(key, value):
    cell = make_cell()
    setattr(cell.diagnostics, key, value)
    with pytest.raises(ConfigError, match=rf"^diagnostics\.{key}:"):
        validate(cell)


def test_stream_rms_counts_only_the_slots_holding_a_value():
    stream = torch.zeros(2, 3, 5, 4)  # AttnRes after its first block: 3 of 5 slots written
    stream[:, :, :3] = 2.0
    stream[0, 0, 2, 0] = 0.0  # a zero inside a written slot still counts
    filled = stream[:, :, :3]
    assert stream_rms(stream) == pytest.approx(filled.pow(2).mean().sqrt().item())
    assert stream_rms(stream) > 1.9  # the empty slots would have pulled it to ~1.5
    stream[1, 2, 1, 3] = float("nan")  # a diverged run's stream stays NaN, not finite
    assert math.isnan(stream_rms(stream))
    plain = torch.randn(2, 3, 4)
    assert stream_rms(plain) == pytest.approx(plain.pow(2).mean().sqrt().item())


def test_attnres_activation_rms_of_a_block_does_not_depend_on_the_blocks_after_it():
    """AttnRes holds 2N + 1 slots from the start; counted empty, they made block 1's RMS of a
    6-deep model √(13 / 7) ≈ 1.36× smaller than of a 3-deep one."""
    first_block = []
    for depth in (3, 6):
        model, batch = model_and_probe("attnres", depth=depth)
        diagnostics = Diagnostics(model, batch, DiagnosticsConfig())
        diagnostics.at_init()
        first_block.append(diagnostics.record["init_act_rms_by_layer"][0])
    assert first_block[1] == pytest.approx(first_block[0], rel=0.1)


# --- per-layer series over training ---------------------------------------------------------


def test_per_layer_series_are_sampled_with_one_entry_per_block():
    record, curve = run_cell(make_cell("preln", depth=3, steps=21))
    sampled = [r for r in curve if "model_update" in r]
    for name in PER_LAYER_SERIES:
        assert all(len(r[name]) == 3 for r in sampled), name
        assert name not in curve[10], name  # only at the sampled steps
    assert all("saturation_by_layer" not in r and "stream_amax_gain" not in r for r in curve)
    # A block's gradient is its attention's and its MLP's and its norms' together.
    for row in sampled:
        for block, attn, mlp in zip(
            row["grad_norm_by_layer"],
            row["grad_norm_attn_by_layer"],
            row["grad_norm_mlp_by_layer"],
            strict=True,
        ):
            assert math.hypot(attn, mlp) <= block * (1 + 1e-6)
            assert block > 0
    # Sampled after the last step (20), the residual-stream RMS is the one the record keeps.
    assert curve[20]["act_rms_by_layer"] == pytest.approx(record["final_act_rms_by_layer"])


def test_per_layer_gradient_norms_are_the_backward_pass_s_even_when_clipped():
    """The clip factor is undone: with a clip far below the gradient norm, the per-block norms
    still add up to the step's unclipped global norm (over the blocks' share of parameters)."""
    clipped = make_cell("preln", depth=2, steps=3, lr=1e-3)
    clipped.optim.grad_clip = 1e-3
    _, curve = run_cell(clipped)
    row = curve[0]
    assert row["grad_norm"] > 100 * clipped.optim.grad_clip
    blocks = math.sqrt(sum(g * g for g in row["grad_norm_by_layer"]))
    assert 0.05 * row["grad_norm"] < blocks <= row["grad_norm"] * (1 + 1e-5)
    unclipped = make_cell("preln", depth=2, steps=3, lr=1e-3)
    unclipped.optim.grad_clip = 0.0
    _, reference = run_cell(unclipped)
    # The first step's gradient is the same with or without clipping (clipping acts after it).
    assert row["grad_norm_by_layer"] == pytest.approx(reference[0]["grad_norm_by_layer"], rel=1e-4)


def test_update_ratio_by_layer_by_hand():
    """One block's update ratio, recomputed from the weights before and after the step."""
    cell = make_cell("preln", depth=2, steps=1, lr=1e-2)
    corpus = corpus_for(cell.data)
    torch.manual_seed(0)
    model = build_model(cell, corpus.vocab_size)
    (probe,) = validation_batches(corpus, cell.model.seq_len, 4, 1, CPU)
    diagnostics = Diagnostics(model, probe, cell.diagnostics)
    diagnostics.at_init()
    before = diagnostics.snapshot()
    block_before = [p.detach().clone() for p in model.blocks[1].parameters()]
    x, y = probe
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    row = diagnostics.after_step(loss.item(), 1.0, before, diverged=False)
    change = math.sqrt(
        sum(
            (p.detach() - b).pow(2).sum().item()
            for p, b in zip(model.blocks[1].parameters(), block_before, strict=True)
        )
    )
    weight = math.sqrt(sum(b.pow(2).sum().item() for b in block_before))
    assert row["update_ratio_by_layer"][1] == pytest.approx(change / weight, rel=1e-5)


@pytest.mark.parametrize("variant", ["dyt", "derf"])
def test_saturation_share_counts_inputs_past_the_knee(variant):
    """The share per block is the fraction of its two maps' inputs past the knee: all of them
    once α is huge, none once α is tiny."""
    model, batch = model_and_probe(variant, depth=2)
    probe = Probe(model, *batch)
    shares = {}
    for alpha in (1e-6, 1e6):
        for module in model.modules():
            if isinstance(module, Saturates):
                module.alpha.data.fill_(alpha)
                if hasattr(module, "shift"):
                    module.shift.data.fill_(0.0)
        probe.logits()
        shares[alpha] = probe.saturation_by_layer()
    assert shares[1e-6] == [0.0, 0.0]
    assert all(share > 0.99 for share in shares[1e6])  # only exact zeros stay below the knee


def test_saturation_is_recorded_for_dyt_and_stream_gain_for_hc():
    _, dyt = run_cell(make_cell("dyt", depth=2, steps=12))
    assert all(0 <= s <= 1 for s in dyt[0]["saturation_by_layer"])
    _, hc = run_cell(make_cell("hc", depth=2, steps=12))
    assert hc[0]["stream_amax_gain"] >= 1.0 - 1e-6 and "saturation_by_layer" not in hc[0]
    shares = hc[0]["stream_share"]
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)  # hc's default: 4 streams
    assert all(0 < share < 1 for share in shares)


def test_stream_shares_by_hand():
    from suite.run.diagnostics import stream_shares

    streams = torch.zeros(2, 3, 2, 4)
    streams[:, :, 0] = 3.0
    streams[:, :, 1] = 1.0
    assert stream_shares(streams) == pytest.approx([0.75, 0.25])


def test_the_record_says_whether_diagnostics_were_measured():
    """Packed runs do not measure them and say so, rather than leaving the columns silently
    empty."""
    from suite.run.runner import run_pack

    cells = [make_cell("preln", depth=2, steps=3, lr=lr) for lr in (1e-3, 1e-2)]
    for cell in cells:
        cell.train.pack_lr = True
    packed = [record for record, _ in run_pack(cells)]
    assert {r["diagnostics"] for r in packed} == {"not measured: packed"}
    assert all("init_grad_norm_by_layer" not in r for r in packed)
    off = make_cell("preln", depth=2, steps=3)
    off.diagnostics.enabled = False
    assert run_cell(off)[0]["diagnostics"] == "off"
    assert run_cell(make_cell("preln", depth=2, steps=3))[0]["diagnostics"] == "measured"
