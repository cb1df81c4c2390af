"""Packed LR sweeps (train.pack_lr): members match their unpacked cells, a diverging member
is finished at once and never touches the others, and the CLI stores the same cells."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest
import torch
from helpers import make_cell, run_suite

import suite.runner
import variants
from suite.config import ConfigError
from suite.packed import train_packed
from suite.runner import build_model, corpus_for, run_cell, run_pack
from suite.train import TrainOutcome

DIVERGING_LR = 3.0  # blows the loss past 2× its initial value within two steps


PACKABLE = [
    name for name in variants.names() if not variants.get(name)().acts_after_optimizer_steps()
]


def pack_cells(variant: str, lrs: list[float], grad_clip: float = 0.0, z_loss: float = 0.0):
    cells = [make_cell(variant, lr=lr, steps=20) for lr in lrs]
    for cell in cells:
        cell.optim.grad_clip = grad_clip
        cell.optim.z_loss = z_loss
        cell.diagnostics.enabled = False
    return cells


def train_pack(cells) -> list[tuple[int, TrainOutcome]]:
    """(member, outcome) in the order the members finished."""
    corpus = corpus_for(cells[0].data)
    torch.manual_seed(cells[0].seed)
    model = build_model(cells[0], corpus.vocab_size)
    finished: list[tuple[int, TrainOutcome]] = []
    train_packed(model, corpus, cells, torch.device("cpu"), lambda m, o: finished.append((m, o)))
    return finished


@pytest.mark.parametrize(
    "variant, grad_clip, z_loss",
    # Every variant a packed run accepts; one that acts after each optimizer step (nGPT) is
    # refused before training (tests/test_ngpt.py).
    [(name, 0.0, 0.0) for name in PACKABLE] + [("postln", 1.0, 0.0), ("preln", 0.0, 1e-2)],
)
def test_members_match_their_unpacked_cells(variant, grad_clip, z_loss):
    cells = pack_cells(variant, [1e-3, 3e-3, DIVERGING_LR], grad_clip=grad_clip, z_loss=z_loss)
    records, curves = zip(*run_pack(cells), strict=True)
    for cell, record, curve in zip(cells, records, curves, strict=True):
        alone, alone_curve = run_cell(cell)
        assert record["verdict"] == alone["verdict"]
        assert record["diverged_step"] == alone["diverged_step"]
        assert record["cell_id"] == alone["cell_id"] and record["packed_members"] == 3
        losses = [row["loss"] for row in curve]
        assert losses == pytest.approx([row["loss"] for row in alone_curve], rel=1e-4)
        grads = [row["grad_norm"] for row in curve]
        # Looser: at a diverging step the gradient is huge and more sensitive than the loss.
        assert grads == pytest.approx([row["grad_norm"] for row in alone_curve], rel=1e-2)
        if alone["verdict"] != "diverged":
            assert record["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-4)
    assert records[-1]["verdict"] == "diverged"


def test_diverging_member_finishes_first_and_leaves_the_others_untouched():
    with_diverging = train_pack(pack_cells("preln", [1e-3, DIVERGING_LR, 3e-3]))
    without = dict(train_pack(pack_cells("preln", [1e-3, 3e-3])))
    first_done, first = with_diverging[0]
    assert first_done == 1 and first.verdict == "diverged"
    assert len(first.curve) == first.diverged_step + 1 < 20  # stopped at once
    finished = dict(with_diverging)
    for member, alone in ((0, without[0]), (2, without[1])):
        assert len(finished[member].curve) == 20
        assert [r["loss"] for r in finished[member].curve] == pytest.approx(
            [r["loss"] for r in alone.curve], rel=1e-6
        )


def test_a_failing_pack_records_every_unfinished_member_as_an_error(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(suite.runner, "train_packed", crash)
    results = run_pack(pack_cells("preln", [1e-3, 3e-3]))
    assert [record["status"] for record, _ in results] == ["error", "error"]
    assert "simulated" in results[0][0]["error"]


def test_a_pack_that_fails_after_training_keeps_each_members_curve(monkeypatch):
    import suite.packed

    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed (simulated)")

    monkeypatch.setattr(suite.packed, "evaluate_packed", fail)
    results = run_pack(pack_cells("preln", [1e-3, 3e-3]))
    for record, curve in results:
        assert record["status"] == "error"
        assert len(curve) == record["steps_completed"] == record["steps"]


def test_packing_does_not_change_a_cells_identity():
    plain = make_cell(lr=1e-3)
    packed = make_cell(lr=1e-3, pack_lr=True)
    assert plain.cell_id() == packed.cell_id()


def test_packing_a_compiled_model_is_refused_before_training():
    result = run_suite("+variant=preln", "sweep=tiny", "train.pack_lr=true", "train.compile=true")
    assert result.returncode == 2
    assert "train.pack_lr" in result.stderr and "train.compile" in result.stderr


def test_packed_sweep_stores_the_same_cells_as_the_unpacked_one(tiny_sweep, tmp_path):
    unpacked_store, _ = tiny_sweep
    store = tmp_path / "packed"
    args = ["+variant=postln,preln", "sweep=tiny", f"store={store}", "train.pack_lr=true"]
    result = run_suite(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pack 4/4 done:" in result.stdout  # one job per (variant, depth): LRs run together
    packed = pd.read_parquet(store / "runs.parquet").set_index("cell_id")
    unpacked = pd.read_parquet(unpacked_store / "runs.parquet").set_index("cell_id")
    assert sorted(packed.index) == sorted(unpacked.index)
    assert (packed["packed_members"] == 2).all()
    assert (packed["verdict"] == unpacked.loc[packed.index, "verdict"]).all()
    assert "Summary of this sweep (8 cells" in result.stdout

    from suite.report import build_sections

    sections = build_sections(packed.reset_index(), store, None, None)
    throughput = next(s for s in sections if s.title == "Throughput vs depth")
    assert "8 runs were packed" in throughput.caption

    again = run_suite(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 already in the store" in again.stdout and "done:" not in again.stdout


def test_preflight_counts_every_packed_model_copy_against_memory():
    from suite.preflight import check_fits_in_memory

    cell = make_cell(width=512, depth=8)
    one_copy_bytes = 16 * check_fits_in_memory(cell)  # fits: ~0.4 GB
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(ConfigError, match="packed learning rates"):
        check_fits_in_memory(cell, copies=math.ceil(memory / one_copy_bytes) + 1)


def test_the_command_lines_lr_axis_becomes_one_job_per_pack():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from suite.app import PACKED_LRS_ENV, pack_learning_rates, packed_learning_rates
    from suite.preflight import sweep_cells

    args = ["+variant=preln", "sweep=tiny", "optim.lr=1e-3,1e-2,1e-1", "train.pack_lr=true"]
    cells = [cell for _, cell in sweep_cells(args)]
    packed_args, jobs = pack_learning_rates(args, cells)
    packs = [cell for _, cell in sweep_cells(packed_args)]
    assert jobs == len(packs) == 2  # depth 2 and 4
    # The pack's learning rates reach the job through Hydra's env_set, not a user setting.
    (env,) = [
        o
        for o in OverridesParser.create().parse_overrides(packed_args)
        if o.key_or_group == f"hydra.job.env_set.{PACKED_LRS_ENV}"
    ]
    lrs = packed_learning_rates({PACKED_LRS_ENV: env.value()})
    assert lrs == [1e-3, 1e-2, 1e-1]
    members = {(c.model.depth, lr) for c in packs for lr in lrs}
    assert members == {(c.model.depth, c.optim.lr) for c in cells}
    assert packed_learning_rates({}) == []
