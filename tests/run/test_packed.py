"""Packed LR sweeps (train.pack_lr): members compute what their unpacked cells compute (to
round-off, over a short run), a diverging member is finished at once and never touches the
others, and packed cells are cells of their own: over a full budget round-off grows into
different runs, so a packed cell never stands in for an unpacked one."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest
import torch
from helpers import make_cell, run_suite

import suite.run.runner
import variants
from suite.config import ConfigError
from suite.run.packed import train_packed
from suite.run.runner import build_model, corpus_for, run_cell, run_pack
from suite.run.train import TrainOutcome

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

    monkeypatch.setattr(suite.run.runner, "train_packed", crash)
    results = run_pack(pack_cells("preln", [1e-3, 3e-3]))
    assert [record["status"] for record, _ in results] == ["error", "error"]
    assert "simulated" in results[0][0]["error"]


def test_a_pack_that_fails_after_training_keeps_each_members_curve(monkeypatch):
    import suite.run.packed

    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed (simulated)")

    monkeypatch.setattr(suite.run.packed, "evaluate_packed", fail)
    results = run_pack(pack_cells("preln", [1e-3, 3e-3]))
    for record, curve in results:
        assert record["status"] == "error"
        assert len(curve) == record["steps_completed"] == record["steps"]


def test_a_packed_cell_is_a_cell_of_its_own_and_says_so_in_its_id():
    plain = make_cell(lr=1e-3)
    packed = make_cell(lr=1e-3, pack_lr=True)
    assert plain.cell_id() != packed.cell_id()
    assert "-s0-packed-" in packed.cell_id() and "packed" not in plain.cell_id()
    from suite.store import cell_from_id

    assert cell_from_id(packed.cell_id()) == cell_from_id(plain.cell_id())  # variant, depth, ...


def test_packing_a_compiled_model_is_refused_before_training():
    result = run_suite("+variant=preln", "sweep=tiny", "train.pack_lr=true", "train.compile=true")
    assert result.returncode == 2
    assert "train.pack_lr" in result.stderr and "train.compile" in result.stderr


def test_a_packed_sweep_stores_packed_cells_beside_the_unpacked_ones(tiny_sweep, tmp_path):
    import shutil

    unpacked_store, _ = tiny_sweep
    store = tmp_path / "both"
    shutil.copytree(unpacked_store, store)
    args = ["+variant=postln,preln", "sweep=tiny", f"store={store}", "train.pack_lr=true"]
    result = run_suite(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pack 4/4 done:" in result.stdout  # one job per (variant, depth): LRs run together
    assert "already in the store" not in result.stdout  # the unpacked cells are not these
    runs = pd.read_parquet(store / "runs.parquet")
    packed = runs[runs["packed"]].set_index("cell_id")
    unpacked = runs[~runs["packed"]].set_index("cell_id")
    assert len(packed) == len(unpacked) == 8
    axes = ["variant", "depth", "lr", "seed"]
    assert sorted(map(tuple, packed[axes].values)) == sorted(map(tuple, unpacked[axes].values))
    assert all("-packed-" in cell_id for cell_id in packed.index)
    assert not any("packed" in cell_id for cell_id in unpacked.index)
    assert (packed["packed_members"] == 2).all()
    assert "Summary of this sweep (8 cells" in result.stdout
    # Two arms in every summary: never pooled into one row.
    from suite.analyze.summary import summarize, with_arm_labels

    arms = set(summarize(with_arm_labels(runs)).index.get_level_values("variant"))
    assert arms == {"postln", "preln", "postln · packed", "preln · packed"}

    from suite.analyze.report import build_sections

    sections = build_sections(packed.reset_index(), store, None, None)
    throughput = next(s for s in sections if s.title == "Throughput vs depth")
    assert "8 runs were packed" in throughput.caption


def test_a_packed_record_stored_under_an_unpacked_id_is_not_that_cell(tmp_path):
    """Suite 0.3 stored packed runs under the unpacked cells' ids: resume must not take such a
    record for the unpacked cell's result, and collect labels it packed from its config."""
    import json

    from suite.analyze.collect import collect

    store = tmp_path / "store"
    args = ["+variant=preln", "sweep=tiny", "model.depth=2", "train.steps=20", f"store={store}"]
    first = run_suite(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    for path in store.glob("cells/*/record.json"):  # as 0.3 wrote a packed run's record
        record = json.loads(path.read_text())
        record["config"]["train"]["pack_lr"] = True
        del record["packed"]
        path.write_text(json.dumps(record))
    assert set(collect(store, write=False)["packed"]) == {True}
    again = run_suite(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained differently; it is trained again" in again.stderr + again.stdout
    assert again.stdout.count("done:") == 2
    assert set(collect(store, write=False)["packed"]) == {False}


def test_preflight_counts_every_packed_model_copy_against_memory():
    from suite.launch.preflight import check_fits_in_memory

    cell = make_cell(width=512, depth=8)
    one_copy_bytes = check_fits_in_memory(cell, vocab_size=256).total  # fits: ~0.4 GB
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(ConfigError, match="packed learning rates"):
        check_fits_in_memory(cell, 256, copies=math.ceil(memory / one_copy_bytes) + 1)


def test_the_command_lines_lr_axis_becomes_one_job_per_pack():
    from suite.launch.cli import pack_learning_rates
    from suite.launch.preflight import sweep_cells

    args = ["+variant=preln", "sweep=tiny", "optim.lr=1e-3,1e-2,1e-1", "train.pack_lr=true"]
    cells = [cell for _, cell in sweep_cells(args)]
    packed_args, packs, jobs = pack_learning_rates(args, cells)
    leads = [cell for _, cell in sweep_cells(packed_args)]
    assert len(jobs) == len(leads) == 2  # depth 2 and 4
    # Each job composes its pack's first member; the plan maps it to the pack's LRs.
    assert sorted(packs) == sorted(lead.cell_id() for lead in leads)
    assert all(lrs == [1e-3, 1e-2, 1e-1] for lrs in packs.values())
    assert sorted(cell_id for job in jobs for cell_id in job) == sorted(c.cell_id() for c in cells)


def test_a_pack_whose_last_members_diverge_together_records_them_diverged():
    """Every member still training ends at one step: nothing left to re-stack (it crashed)."""
    cells = pack_cells("preln", [30.0, 100.0])
    results = run_pack(cells)
    assert [record["status"] for record, _ in results] == ["ok", "ok"]
    assert [record["verdict"] for record, _ in results] == ["diverged", "diverged"]
