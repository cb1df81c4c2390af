"""One sweep cell, end to end: config → model + data → training loop → record.

A failure inside training (an exception, out of memory) becomes a record with status ``error`` and
its traceback; divergence is a verdict, never an exception.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import resource
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch

import variants
import variants.native
from suite.config import CellConfig, DataConfig
from suite.run.data import Corpus, load_corpus
from suite.run.environment import environment, resolve_device
from suite.run.model import GPT, ModelShape
from suite.run.packed import train_packed
from suite.run.parametrization import model_depth_scaling
from suite.run.trackers import Tracker, TrackerRows, open_tracker
from suite.run.train import TrainOutcome, train
from variants.registry import source as variant_source

log = logging.getLogger(__name__)

_corpus_cache: dict[str, Corpus] = {}


def corpus_for(cfg: DataConfig) -> Corpus:
    """Load a corpus once per process: a sweep's cells all read the same one."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in _corpus_cache:
        _corpus_cache[key] = load_corpus(cfg)
    return _corpus_cache[key]


def build_model(cell: CellConfig, vocab_size: int) -> GPT:
    """The cell's model: its shape is the schema's model section (every field the two share)
    with the corpus's vocabulary and the depth parametrization's branch multiplier."""
    m = cell.model
    shared = {spec.name for spec in dataclasses.fields(ModelShape)} & set(asdict(m))
    shape = ModelShape(
        vocab_size=vocab_size,
        branch_multiplier=model_depth_scaling(m).branch_multiplier,
        **{name: getattr(m, name) for name in shared},
    )
    variant = variants.get(cell.variant)(**cell.variant_params)
    recipe = variant.authors_recipe() if cell.recipe == "authors" else None
    return GPT(shape, variant, recipe)


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; it is the whole process's high-water mark.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def base_record(cell: CellConfig, device: torch.device) -> dict[str, Any]:
    m, o, t = cell.model, cell.optim, cell.train
    return {
        "cell_id": cell.cell_id(),
        "config_hash": cell.config_hash(),
        "sweep": cell.sweep,
        "variant": cell.variant,
        "variant_params": json.dumps(cell.variant_params, sort_keys=True),
        "variant_source": variant_source(variants.get(cell.variant)),
        "variant_revision": cell.variant_revision,
        "depth": m.depth,
        "width": m.width,
        "heads": m.heads,
        "mlp_ratio": m.mlp_ratio,
        "seq_len": m.seq_len,
        "optimizer": o.name,
        "backbone": m.backbone,
        "recipe": cell.recipe,
        "parametrization": m.parametrization,
        "base_depth": m.base_depth,
        "lr": o.lr,
        "warmup_steps": cell.warmup_steps(),
        "schedule": o.schedule,
        "grad_clip": o.grad_clip,
        "qk_norm": m.qk_norm,
        "value_residual": m.value_residual,
        "z_loss": o.z_loss,
        "skip_spikes": o.skip_spikes,
        "center_output_embedding": o.center_output_embedding,
        "mu_loss": o.mu_loss,
        "logit_softcap": m.logit_softcap,
        "weight_decay": o.weight_decay,
        "weight_decay_mode": o.weight_decay_mode,
        "no_decay": json.dumps(sorted(o.no_decay)),
        "seed": cell.seed,
        "steps": t.steps,
        "batch_size": t.batch_size,
        "dtype": t.dtype,
        "compile": t.compile,
        "packed": t.pack_lr,
        "diagnostics": (
            "off"
            if not cell.diagnostics.enabled
            else ("not measured: packed" if t.pack_lr else "measured")
        ),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "config": asdict(cell),
        "status": "ok",
        "error": None,
    }


def outcome_fields(outcome: TrainOutcome) -> dict[str, Any]:
    """The record columns of a training outcome: its fields, and its diagnostics merged in."""
    fields = {f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)}
    del fields["curve"]
    diagnostics = fields.pop("diagnostics")
    return {**fields, **diagnostics}


def _start(cell: CellConfig) -> tuple[torch.device, Corpus, dict[str, Any]]:
    """The device, the corpus and the record so far (everything known before training)."""
    if cell.train.threads:
        torch.set_num_threads(cell.train.threads)
    device = resolve_device(cell.train.device)
    record = base_record(cell, device)
    corpus = corpus_for(cell.data)  # a missing or unreadable corpus is a config error: raise
    record.update(
        corpus=corpus.name,
        corpus_sha256=corpus.sha256,
        corpus_tokens=corpus.num_tokens,
        vocab_size=corpus.vocab_size,
        unigram_entropy=corpus.unigram_entropy,
        val_unigram_entropy=corpus.val_unigram_entropy,
    )
    return device, corpus, record


@contextmanager
def _denormals_flushed() -> Iterator[None]:
    # Stalled or diverging models drive many activations and Adam moments into subnormal range,
    # where x86 float math runs ~10× slower: without flushing them, throughput would measure the
    # FPU's denormal handling rather than the variant. Restored after the cell (torch's default
    # is off), so a caller's own float math in the same process is untouched.
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _build(cell: CellConfig, corpus: Corpus, device: torch.device) -> GPT:
    torch.manual_seed(cell.seed)
    model = build_model(cell, corpus.vocab_size).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return model


def _errored(record: dict[str, Any], cell_id: str, error: Exception) -> None:
    log.error("cell %s failed: %s", cell_id, error)
    record.update(status="error", error=traceback.format_exc(), verdict=None)


def run_cell(
    cell: CellConfig,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[list[dict[str, float]]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train one cell; returns its record and per-step curve. Never raises for training failures.

    ``on_start(record)`` is called before training with everything known so far, and
    ``on_progress(curve)`` every ``train.flush_every`` steps (the caller persists them)."""
    device, corpus, record = _start(cell)
    record["packed_members"] = 1
    if on_start is not None:
        on_start(record)
    outcome = TrainOutcome()
    tracker = open_tracker(cell)
    rows = [TrackerRows(tracker)] if tracker is not None else []
    variants.native.reset_used()
    with _denormals_flushed():
        try:
            model = _build(cell, corpus, device)
            record["n_params"] = model.num_parameters()
            train(model, corpus, cell, device, on_progress, outcome, observers=rows)
            record.update(outcome_fields(outcome))
        except Exception as error:  # recorded, so the sweep goes on and the summary lists it
            _errored(record, cell.cell_id(), error)
            record["steps_completed"] = len(outcome.curve)  # kept beside the traceback
        except BaseException:  # Ctrl-C, a termination signal: no record, a failed tracker run
            _abandon_tracker(tracker)
            raise
    record["peak_memory_mb"], record["memory_kind"] = _peak_memory_mb(device)
    record["native_kernels"] = variants.native.used_since_reset()
    _close_tracker(tracker, record)
    return record, outcome.curve


def _close_tracker(tracker: Tracker | None, record: dict[str, Any]) -> None:
    """Logs the record and ends the tracker run; a tracker that fails costs its own log line,
    never the cell's result (the record is written to the store all the same)."""
    if tracker is None:
        return
    failed = record.get("status") != "ok"
    try:
        tracker.log_record(record)
    except Exception as error:  # a tracker's own failure (disk, locked database, ...)
        log.warning("%s: the tracker could not log the record (%s)", record.get("cell_id"), error)
        failed = True
    try:
        tracker.close(failed)  # even without the record: the rows already logged are kept
    except Exception as error:
        log.warning("%s: the tracker could not close its run (%s)", record.get("cell_id"), error)


def _abandon_tracker(tracker: Tracker | None) -> None:
    """Ends the tracker run of a cell that was interrupted (no record), as failed rather than
    left running; quietly, since the interruption is what the caller must see."""
    if tracker is None:
        return
    try:
        tracker.close(failed=True)
    except Exception:
        log.debug("the tracker could not close its interrupted run", exc_info=True)


def run_pack(
    cells: Sequence[CellConfig],
    on_start: Callable[[int, dict[str, Any]], None] | None = None,
    on_progress: Callable[[int, list[dict[str, float]]], None] | None = None,
    on_done: Callable[[int, dict[str, Any], list[dict[str, float]]], None] | None = None,
) -> list[tuple[dict[str, Any], list[dict[str, float]]]]:
    """Train cells that differ only in their learning rate as one packed run (suite.run.packed).

    Like :func:`run_cell` for each member; ``on_done(member, record, curve)`` is called as soon
    as a member finishes (a diverged member finishes early), so its record can be kept at once.
    """
    results: list[tuple[dict[str, Any], list[dict[str, float]]] | None] = [None] * len(cells)
    started = [_start(cell) for cell in cells]
    device, corpus = started[0][0], started[0][1]
    records = [record for _, _, record in started]
    for member, record in enumerate(records):
        record["packed_members"] = len(cells)
        if on_start is not None:
            on_start(member, record)

    trackers = [open_tracker(cell) for cell in cells]

    def done(member: int, record: dict[str, Any], curve: list[dict[str, float]]) -> None:
        record["peak_memory_mb"], record["memory_kind"] = _peak_memory_mb(device)
        record["native_kernels"] = variants.native.used_since_reset()
        _close_tracker(trackers[member], record)
        results[member] = (record, curve)
        if on_done is not None:
            on_done(member, record, curve)

    def trained(member: int, outcome: TrainOutcome) -> None:
        records[member].update(outcome_fields(outcome))
        done(member, records[member], outcome.curve)

    outcomes = [TrainOutcome() for _ in cells]
    variants.native.reset_used()
    with _denormals_flushed():
        try:
            model = _build(cells[0], corpus, device)
            for record in records:
                record["n_params"] = model.num_parameters()
            rows = [[TrackerRows(t)] if t is not None else [] for t in trackers]
            train_packed(model, corpus, cells, device, trained, on_progress, outcomes, rows)
        except Exception as error:  # every member not finished yet is recorded as errored
            for member, cell in enumerate(cells):
                if results[member] is None:
                    _errored(records[member], cell.cell_id(), error)
                    records[member]["steps_completed"] = len(outcomes[member].curve)
                    done(member, records[member], outcomes[member].curve)
        except BaseException:  # Ctrl-C, a termination signal: no record, failed tracker runs
            for member, tracker in enumerate(trackers):
                if results[member] is None:
                    _abandon_tracker(tracker)
            raise
    return [result for result in results if result is not None]
