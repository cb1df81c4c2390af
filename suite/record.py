"""The schema of what the suite records: every column of a run's record (one row of
``runs.parquet``) and of its per-step curve, with its type, meaning and report format, stated once.

The collected table's column order, the report's run table and its number formats, and the
column reference (``python -m suite.record``) all derive from here; a test checks that every key
a real run records is declared here, documented and of its declared type. To add a metric: declare
it here, measure it (a ``TrainOutcome`` field set in suite/run/train.py, or a diagnostic returned by
suite/run/diagnostics.py), and, if wanted, draw it (suite/analyze/figures.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# What a column holds; "json" is a JSON string, "list" a list of floats (one per layer).
KINDS = ("str", "int", "float", "bool", "json", "list")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    doc: str
    fmt: str | None = None  # Python format spec in the report's tables
    in_report: bool = False  # a column of the report's table of runs
    optional: bool = False  # in the collected table only when some row has it


def _group(*columns: tuple) -> tuple[Column, ...]:
    return tuple(Column(*column) for column in columns)


# fmt: off
GROUPS: dict[str, tuple[Column, ...]] = {
    "identity": _group(
        ("cell_id", "str", "`<variant>-L<depth>-lr<lr>-s<seed>-<hash>`, the cell's folder name"),
        ("config_hash", "str", "sha256 of everything that can change the result (the settings "
         "marked as identity in suite/config.py; not the verdict's label knobs)"),
        ("sweep", "str", "the preset's name (`quick`, `standard`, `tiny`, ..., or `custom`)"),
        ("status", "str", "`ok`; `error` when the cell raised; `running` / `interrupted` for a "
         "cell started without a record; `unreadable` when its record cannot be read"),
        ("error", "str", "the traceback, for `error` cells"),
    ),
    "config": _group(
        ("variant", "str", "registry name", None, True),
        ("variant_params", "json", "the variant's own parameters, as JSON (e.g. "
         '`{"eps": 1e-05}`)'),
        ("variant_source", "str", "`built-in`, or the plugin's package name and version"),
        ("variant_revision", "int", "the variant's revision (bumped by a fix that changes what "
         "it trains; from 2 on part of the cell id)"),
        ("depth", "int", "number of blocks, N", None, True),
        ("width", "int", "residual stream width"),
        ("heads", "int", "attention heads"),
        ("mlp_ratio", "float", "MLP hidden width / width"),
        ("seq_len", "int", "tokens per sequence"),
        ("n_params", "int", "parameter count (a tied head counted once)"),
        ("optimizer", "str", "`adamw`, or `muon` (Muon for the blocks' hidden matrices, AdamW "
         "for the rest; suite/run/optimizers.py)", None, True),
        ("backbone", "str", "what F, G and the embeddings are: `gpt2` (learned positions, GELU "
         "MLP) or `llama` (RoPE, SwiGLU, no biases)", None, True),
        ("recipe", "str", "`controlled` (only the wiring differs), or `authors` (with the parts "
         "of the variant's published recipe that are not wiring)", None, True),
        ("parametrization", "str", "depth parametrization: `sp`, `depth_mup` or `completep` "
         "(suite/run/parametrization.py)", None, True),
        ("base_depth", "int", "N₀, the depth at which `depth_mup` and `completep` equal `sp`"),
        ("lr", "float", "peak learning rate (AdamW's; Muon's at AdamW's update RMS)", "g", True),
        ("warmup_steps", "int", "linear warmup steps (from optim.warmup_steps or "
         "optim.warmup_fraction)", None, True),
        ("schedule", "str", "`constant` or `cosine` after warmup"),
        ("grad_clip", "float", "max global gradient norm; 0 = off"),
        ("weight_decay", "float", "weight decay λ"),
        ("weight_decay_mode", "str", "`coupled` (θ·(1 − η_t λ), torch's AdamW) or "
         "`independent` (θ·(1 − η_t/η · λ): not scaled by the peak LR)"),
        ("no_decay", "str", "the parameter groups exempt from weight decay, as a JSON list"),
        ("qk_norm", "bool", "LayerNorm on queries and keys"),
        ("value_residual", "str", "`off`, or every block's attention values mixed with the "
         "first block's: `fixed` (λ = ½) or `learned` (λ per head)"),
        ("z_loss", "float", "coefficient of the auxiliary log²Z loss"),
        ("skip_spikes", "bool", "updates of spiking steps skipped (OLMo-core's SkipStepAdamW)"),
        ("center_output_embedding", "bool", "μ-centering of the output embedding after every "
         "optimizer step (arXiv 2601.02031)"),
        ("mu_loss", "float", "coefficient λ of the μ-loss λ·‖μ‖², μ the mean output "
         "embedding (arXiv 2601.02031); 0 = off"),
        ("logit_softcap", "float", "cap c of c·tanh(logits/c) on the output logits; 0 = off"),
        ("seed", "int", "seeds the init and the batch order", None, True),
        ("steps", "int", "steps asked for: the budget N every verdict is judged within"),
        ("batch_size", "int", "sequences per step"),
        ("dtype", "str", "`float32`, or `bfloat16` autocast"),
        ("compile", "bool", "whether `torch.compile` was on"),
        ("packed", "bool", "trained in a packed learning-rate run (`train.pack_lr=true`): a "
         "cell of its own, with `packed` in its id and `· packed` in its arm's label (packed "
         "and unpacked runs of one setting drift apart over a budget; they never pool)"),
    ),
    "data": _group(
        ("corpus", "str", "the data source's name"),
        ("corpus_sha256", "str", "sha256 of the corpus bytes: the data, exactly"),
        ("corpus_tokens", "int", "tokens in the corpus"),
        ("vocab_size", "int", "vocabulary size"),
        ("unigram_entropy", "float", "entropy of the training split's token frequencies, nats: "
         "the floor to beat"),
        ("val_unigram_entropy", "float", "the same for the validation split (the floor for "
         "`val_loss`)"),
    ),
    "outcome": _group(
        ("verdict", "str", "`converged`, `stalled` or `diverged` (empty for errors); "
         "`untrained` for zero-step runs; judged from the curve at collect time", None, True),
        ("escape_step", "int", "first step the smoothed loss was below `stall_threshold` "
         "(empty: never, censored at `steps`)", ".0f", True),
        ("relapsed", "bool", "escaped, then ended above the threshold", None, True),
        ("borderline", "bool", "a verdict near a boundary: final loss within "
         "`verdict.borderline_margin` of the threshold, or a late escape", None, True),
        ("stall_threshold", "float", "unigram entropy − `verdict.stall_margin`: the loss a run "
         "must get below"),
        ("verdict_rule", "str", "the rule version and label-knob values that judged this row"),
        ("judged_from", "str", "`curve` (the stored curve), or `record` when the curve is "
         "missing, unreadable or does not match the record (the training-time verdict is kept "
         "and the escape step is unknown)"),
        ("failure_mechanism", "str", "why a run that did not simply converge (stalled, "
         "diverged, relapsed or borderline) failed: the first signature in its curve "
         "(suite/mechanism.py: attention_logit_growth, output_logit_divergence, update_spike, "
         "vanishing_gradient_early/late, stream_collapse, saturation), else `still_descending`, "
         "`plateau` or `abrupt`; empty for a clean convergence; judged at collect time",
         None, True),
        ("mechanism_step", "int", "the step its signature started", ".0f", True),
        ("signatures", "str", "every signature found in the run's curve, comma-separated"),
        ("still_descending", "bool", "stalled, but the loss over the last quarter of the budget "
         "still falls significantly (slow, not stuck)", None, True),
        ("mechanism_rule", "str", "the version of the mechanism rules that labelled this row"),
        ("diverged_step", "int", "the step a diverged run stopped at", ".0f", True),
        ("skipped_steps", "int", "optim.skip_spikes: updates skipped as spikes"),
        ("divergence_reason", "str", "why it counts as diverged"),
        ("steps_completed", "int", "optimizer steps applied"),
        ("initial_loss", "float", "training loss at step 0 (≈ ln vocab)", ".3f", True),
        ("final_loss", "float", "mean training loss over the last `verdict.final_window` steps",
         ".3f", True),
        ("best_loss", "float", "lowest training loss of any step"),
        ("val_loss", "float", "held-out loss at the end (empty when diverged)", ".3f", True),
    ),
    "cost": _group(
        ("tokens_per_s", "float", "median over steady-state steps (first "
         "`train.timing_skip_steps` skipped; CUDA synchronized); a packed run counts every "
         "member's tokens", ",.0f", True),
        ("peak_memory_mb", "float", "CUDA peak allocated, or on CPU the process's peak RSS"),
        ("memory_kind", "str", "`cuda_max_allocated` or `process_max_rss`"),
        ("wall_time_s", "float", "training wall time", ".1f", True),
        ("parallel_cells", "int", "cells the launcher ran at once on this machine; 1 under a "
         "cluster launcher (SLURM, Ray), whose tasks are separate allocations: tasks that shared "
         "a node are not counted"),
        ("cells_per_device", "int", "at most this many cells trained at once on this cell's "
         "device: on a pinned GPU (suite/launch/devices.py) the smaller of "
         "`train.cells_per_gpu` and `parallel_cells`, otherwise `parallel_cells` (a packed run "
         "counts as one cell)"),
        ("shared_device", "bool", "`true` when the throughput was measured on a device shared "
         "with other cells (`cells_per_device` > 1)"),
        ("pinned_gpu", "str", "present when a local launcher pinned the cell's worker to a GPU "
         "(`hydra/launcher=gpus`, or joblib / submitit local with cells on CUDA): that GPU, as "
         "`CUDA_VISIBLE_DEVICES` names it", None, False, True),
        ("packed_members", "int", "learning rates trained together in one packed run "
         "(`train.pack_lr=true`), 1 otherwise"),
    ),
    "diagnostics": _group(  # suite/run/diagnostics.py; absent when diagnostics.enabled=false
        # and for packed runs (their members share one batched model: not measured)
        ("diagnostics", "str", "`measured`; `off` (diagnostics.enabled=false); or `not "
         "measured: packed` (a packed run's members share one batched model, which the "
         "diagnostics' hooks cannot read member by member): the columns below and the curve's "
         "sampled series are then absent"),
        ("init_grad_norm_by_layer", "list", "per layer, the gradient norm of the feed-forward "
         "weights at init on the probe batch (Xiong et al. 2020, Fig. 3)"),
        ("init_grad_norm_ratio", "float", "`init_grad_norm_by_layer`: last / first layer",
         ".3f"),
        ("init_act_rms_by_layer", "list", "RMS of the residual stream after each block, at init "
         "(of several streams or slots: over those holding a value)"),
        ("final_act_rms_by_layer", "list", "... and at the end"),
        ("init_attn_logit_max", "float", "max |q·k|/√d_head over heads and layers, at init"),
        ("max_attn_logit", "float", "... the largest sampled in the run", ".3g"),
        ("init_log_z", "float", "mean log Z of the output logits at init"),
        ("early_model_update", "float", "the model update after the first "
         "`diagnostics.early_steps` steps (DeepNet)"),
        ("loss_spikes", "int", "steps whose loss exceeded mean + 6σ of the previous 128 steps "
         "(OLMo-core's rule; from 32 steps of history on); the diverging step is not counted"),
        ("grad_spikes", "int", "the same for the gradient norm"),
        ("amax_gain_forward", "float", "multi-stream variants (hc, mhc): of the product of "
         "the streams' mixing matrices over depth at the end, on the probe batch, the largest "
         "absolute row sum (mHC paper's Amax gain; 1 when doubly stochastic)", ".3g"),
        ("amax_gain_backward", "float", "... and the largest absolute column sum", ".3g"),
        ("diagnostics_s", "float", "seconds spent measuring the diagnostics (not in "
         "`tokens_per_s`)"),
    ),
    "environment": _group(
        ("device", "str", "`cpu` or `cuda`"),
        ("device_name", "str", "the CPU model or GPU name the run was measured on"),
        ("threads", "int", "torch intra-op threads"),
        ("cpu_count", "int", "CPUs of the machine"),
        ("torch_version", "str", "torch version"),
        ("cuda_version", "str", "CUDA version torch was built with (empty for CPU builds)"),
        ("python_version", "str", "Python version"),
        ("platform", "str", "operating system"),
        ("hostname", "str", "machine name"),
        ("native_kernels", "str", "the C kernels of variants/native that ran in the cell "
         "as their builds (`hyper_connection-<key>`, `mhc_mappings-<key>`, `sinkhorn-<key>`, "
         "`depth_attention-<key>`: the key hashes the kernel's source, flags, compiler and "
         "machine), comma-separated, empty if none; HC's, mHC's and AttnRes's results differ "
         "at float rounding with and without them (no C compiler, or `SUITE_NATIVE=0`), but "
         "for `sinkhorn` (packed mHC runs), which changes no bit"),
        ("suite_version", "str", "the suite's version"),
        ("git_sha", "str", "the suite's commit (`-dirty` if modified; `unknown` when installed "
         "from a wheel)"),
        ("started_at", "str", "UTC start time"),
    ),
    "provenance": _group(
        ("config", "json", "the full cell config as JSON: enough to re-run the cell"),
        ("curve_file", "str", "the per-step curve of this record, in the cell's folder"),
        ("record_unreadable", "bool", "present when some record could not be read: `true` for "
         "a cell whose row is its last collected copy (or whose status is `unreadable`)",
         None, False, True),
        ("pid", "int", "present when some cell is running or was interrupted: the process "
         "that trains (or trained) it", None, False, True),
        ("pid_started", "int", "... and that process's start time (clock ticks since boot), "
         "which tells it from a later process given the same pid", None, False, True),
    ),
}

# The per-step curve (curve-<token>.parquet); diagnostics columns only when they are on.
CURVE: tuple[Column, ...] = _group(
    ("step", "int", "0-based step"),
    ("lr", "float", "the learning rate of this step"),
    ("loss", "float", "training cross-entropy of this step's batch, nats"),
    ("grad_norm", "float", "global gradient norm (before clipping)"),
    ("tokens_per_s", "float", "this step's tokens / its synchronized wall time"),
    ("skipped", "bool", "optim.skip_spikes: this step's update was skipped (a spike)"),
    ("grad_rms", "float", "‖g‖/√n_params"),
    ("loss_spike", "bool", "this step's loss is a spike (see `loss_spikes`)"),
    ("grad_spike", "bool", "this step's gradient norm is a spike"),
    ("model_update", "float", "sampled: ‖F(x;θ_t) − F(x;θ_0)‖ of the final hidden state, RMS "
     "over tokens, after step t's update"),
    ("attn_logit_max", "float", "sampled: max |q·k|/√d_head over heads and layers"),
    ("attn_logit_max_by_layer", "list", "sampled: the same per layer"),
    ("log_z", "float", "sampled: mean logsumexp of the output logits"),
    ("update_ratio", "float", "sampled: ‖θ_{t+1} − θ_t‖/‖θ_t‖"),
    ("grad_norm_by_layer", "list", "sampled, per block: the gradient norm of its parameters "
     "(this step's training gradient, before clipping)"),
    ("grad_norm_attn_by_layer", "list", "... of its attention's parameters"),
    ("grad_norm_mlp_by_layer", "list", "... of its MLP's parameters"),
    ("update_ratio_by_layer", "list", "sampled, per block: ‖θ_{t+1} − θ_t‖/‖θ_t‖ of its "
     "parameters"),
    ("update_ratio_attn_by_layer", "list", "... of its attention's parameters"),
    ("update_ratio_mlp_by_layer", "list", "... of its MLP's parameters"),
    ("act_rms_by_layer", "list", "sampled, per block: RMS of the residual stream after it"),
    ("saturation_by_layer", "list", "sampled, DyT and Derf: per block, the share of its "
     "squashing maps' inputs past the knee (slope below 0.1 of the slope at 0: |α·x| > 1.82 "
     "for tanh, |α·x + s| > 1.52 for erf)"),
    ("stream_amax_gain", "float", "sampled, multi-stream variants (hc, mhc): the Amax gain "
     "(forward) of the product of the mixing matrices over depth"),
    ("stream_share", "list", "sampled, multi-stream variants: each stream's RMS over the sum "
     "of the streams' RMS, entering the collapse to one stream (1/n each when used alike)"),
)
# fmt: on

# The per-block series sampled with the diagnostics (heatmaps of layer × step in the report).
PER_LAYER_SERIES: tuple[str, ...] = (
    "grad_norm_by_layer",
    "grad_norm_attn_by_layer",
    "grad_norm_mlp_by_layer",
    "update_ratio_by_layer",
    "update_ratio_attn_by_layer",
    "update_ratio_mlp_by_layer",
    "act_rms_by_layer",
)

COLUMNS: tuple[Column, ...] = tuple(column for group in GROUPS.values() for column in group)
RECORD_COLUMNS: tuple[str, ...] = tuple(column.name for column in COLUMNS)
OPTIONAL_COLUMNS: frozenset[str] = frozenset(column.name for column in COLUMNS if column.optional)
REPORT_COLUMNS: tuple[str, ...] = tuple(column.name for column in COLUMNS if column.in_report)
FORMATS: dict[str, str] = {column.name: column.fmt for column in COLUMNS if column.fmt}


INT64 = (-(2**63), 2**63 - 1)  # what a Parquet integer column holds
_KIND_OF = {column.name: column.kind for column in COLUMNS}


def fits_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` (as read from a record.json) is of a column's kind and storable: an
    integer within 64 bits, a list of numbers, a JSON object (or its text). Empty is allowed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if kind == "list":  # a non-finite entry is stored as null (JSON has no NaN)
        return isinstance(value, list) and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value
        )
    if kind == "json":
        return isinstance(value, dict | str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (INT64[0] <= value <= INT64[1])
        )
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def record_problems(record: dict[str, Any]) -> list[str]:
    """The declared columns whose value in ``record`` is not of their kind (empty: none)."""
    return [
        f"{name}: expected {_KIND_OF[name]}, got {value!r:.60}"
        for name, value in record.items()
        if name in _KIND_OF and not fits_kind(value, _KIND_OF[name])
    ]


def curve_row(
    step: int, lr: float, loss: float, grad_norm: float, tokens_per_s: float
) -> dict[str, Any]:
    """One step of a curve, as both training loops (suite.run.train, suite.run.packed) record it."""
    return {
        "step": step,
        "lr": lr,
        "loss": loss,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
    }


def describe() -> str:
    """The column reference, grouped: what ``python -m suite.record`` prints."""
    lines = []
    for group, columns in [*GROUPS.items(), ("curve (per step)", CURVE)]:
        lines.append(f"{group}:")
        lines += [f"  {c.name:26} {c.kind:6} {c.doc.replace('`', '')}" for c in columns]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
