"""The depth parametrization axis (model.parametrization=sp|depth_mup|completep,
suite/run/parametrization.py): the factors against the formulas, the branch multiplier in the
model, the per-group LR and ε in the optimizers (packed ones included), exactly SP at N = N₀,
and the variants that refuse it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import REPO, make_cell

import variants
from suite.config import ConfigError, OptimConfig
from suite.launch.cell import validate
from suite.launch.preflight import sweep_cells
from suite.run.model import GPT, ModelShape
from suite.run.optimizers import hidden_parameters, make_optimizer, set_learning_rate
from suite.run.parametrization import SP, depth_scaling
from suite.run.runner import build_model, corpus_for, run_cell, run_pack
from suite.run.train import train


@pytest.mark.parametrize(("parametrization", "alpha"), [("depth_mup", 0.5), ("completep", 1.0)])
@pytest.mark.parametrize(("depth", "base_depth"), [(16, 4), (32, 4), (2, 4), (24, 6)])
def test_the_factors_are_the_papers_formulas(parametrization, alpha, depth, base_depth):
    m = depth / base_depth
    scaling = depth_scaling(parametrization, depth, base_depth)
    assert scaling.branch_multiplier == pytest.approx(m**-alpha, rel=1e-15)
    assert scaling.hidden_lr == pytest.approx(m ** (alpha - 1), rel=1e-15)
    assert scaling.hidden_eps == pytest.approx(m**-alpha, rel=1e-15)


def test_the_factors_at_a_few_depths_by_hand():
    assert depth_scaling("depth_mup", 16, 4) == depth_scaling("depth_mup", 16, 4)
    mup = depth_scaling("depth_mup", 16, 4)  # m = 4
    assert (mup.branch_multiplier, mup.hidden_lr, mup.hidden_eps) == (0.5, 0.5, 0.5)
    complete = depth_scaling("completep", 32, 4)  # m = 8
    assert (complete.branch_multiplier, complete.hidden_lr, complete.hidden_eps) == (
        0.125,
        1.0,
        0.125,
    )


@pytest.mark.parametrize("parametrization", ["sp", "depth_mup", "completep"])
def test_every_factor_is_exactly_one_at_the_base_depth_and_under_sp(parametrization):
    assert depth_scaling(parametrization, 4, 4) == SP
    assert depth_scaling("sp", 32, 4) == SP


def test_the_branch_multiplier_scales_each_sublayer_before_the_wiring_sees_it():
    torch.manual_seed(0)
    model = GPT(ModelShape(50, 32, 2, 2, 4.0, 8, branch_multiplier=0.25), variants.get("preln")())
    block = model.blocks[0]
    x = torch.randn(2, 8, 32)
    h = x + 0.25 * block.attn(block.wiring.norm_attn(x))
    expected = h + 0.25 * block.mlp(block.wiring.norm_mlp(h))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["postln", "rezero", "hc", "mixln"])
def test_the_multiplier_reaches_any_wiring_through_its_sublayers(variant):
    """Post-LN, ReZero, Hyper-Connections and Mix-LN combine F and G their own way; each is
    handed m·F and m·G."""
    probe = torch.randn(2, 8, 32)

    def handed_to_the_wiring(m: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        shape = ModelShape(50, 32, 2, 2, 4.0, 8, branch_multiplier=m)
        model = GPT(shape, variants.get(variant)())
        block, handed = model.blocks[0], {}
        forward = block.wiring.forward

        def spy(x, attn, mlp):
            handed["attn"], handed["mlp"] = attn(probe), mlp(probe)
            return forward(x, attn, mlp)

        block.wiring.forward = spy
        block(model.expand_stream(torch.randn(2, 8, 32)))
        return handed

    plain, scaled = handed_to_the_wiring(1.0), handed_to_the_wiring(0.5)
    for sublayer in ("attn", "mlp"):
        torch.testing.assert_close(scaled[sublayer], 0.5 * plain[sublayer], rtol=0, atol=0)


def optimizer_for(parametrization: str, depth: int, name: str = "adamw"):
    torch.manual_seed(0)
    model = GPT(ModelShape(50, 32, 2, depth, 4.0, 8, tie_embeddings=False), variants.get("hc")())
    optim = OptimConfig(name=name, eps=1e-8)
    return model, make_optimizer(model, optim, depth_scaling(parametrization, depth, 4))


@pytest.mark.parametrize(
    ("parametrization", "depth", "lr_factor", "eps_factor"),
    [("depth_mup", 16, 0.5, 0.5), ("completep", 16, 1.0, 0.25), ("completep", 2, 1.0, 2.0)],
)
def test_hidden_groups_get_the_lr_and_eps_factors_and_the_rest_none(
    parametrization, depth, lr_factor, eps_factor
):
    model, optimizer = optimizer_for(parametrization, depth)
    set_learning_rate(optimizer, 1e-3)
    hidden = {id(p) for p in hidden_parameters(model)}
    outer = {id(p) for name, p in model.named_parameters() if not name.startswith("blocks.")}
    assert hidden and outer and not hidden & outer
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids <= hidden:
            assert group["lr"] == pytest.approx(1e-3 * lr_factor, rel=1e-15)
            assert group["eps"] == pytest.approx(1e-8 * eps_factor, rel=1e-15)
        else:
            assert ids <= outer
            assert (group["lr"], group["eps"]) == (1e-3, 1e-8)


def test_muon_matrices_get_the_same_lr_factor():
    _, optimizer = optimizer_for("depth_mup", 16, name="muon")
    set_learning_rate(optimizer, 1e-3)
    muon, _ = optimizer.optimizers
    assert [group["lr"] for group in muon.param_groups] == [pytest.approx(5e-4, rel=1e-15)]


def small_cell(parametrization: str, depth: int, optimizer: str = "adamw", variant: str = "preln"):
    cell = make_cell(variant, lr=1e-2, depth=depth, steps=6)
    cell.model.parametrization = parametrization
    cell.optim.name = optimizer
    cell.diagnostics.enabled = False
    return cell


def trained(cell) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses and final parameters of ``cell``, trained as run_cell trains it (one thread,
    denormals flushed: ~100× faster here than without)."""
    corpus = corpus_for(cell.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(cell.train.threads)
    torch.set_flush_denormal(True)
    try:
        torch.manual_seed(cell.seed)
        model = build_model(cell, corpus.vocab_size)
        outcome = train(model, corpus, cell, torch.device("cpu"))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    return [row["loss"] for row in outcome.curve], dict(model.state_dict())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("parametrization", ["depth_mup", "completep"])
def test_at_the_base_depth_every_parametrization_trains_exactly_sp(parametrization, optimizer):
    sp_losses, sp_state = trained(small_cell("sp", 4, optimizer))
    losses, state = trained(small_cell(parametrization, 4, optimizer))
    assert losses == sp_losses  # the initial loss and every step's, bit for bit
    for name, tensor in sp_state.items():
        assert torch.equal(state[name], tensor), name
    # ... and a different model at another depth (the check above is not vacuous).
    assert (
        trained(small_cell(parametrization, 8, optimizer))[0]
        != trained(small_cell("sp", 8, optimizer))[0]
    )


def test_a_parametrization_is_in_the_cell_id_and_sp_ids_are_unchanged():
    def ids(*overrides: str) -> list[str]:
        args = ["+variant=preln", "sweep=tiny", *overrides]
        return [cell.cell_id() for _, cell in sweep_cells(args)]

    default = ids()
    assert ids("model.parametrization=sp") == default
    complete = ids("model.parametrization=completep")
    assert not set(complete) & set(default)
    assert ids("model.parametrization=completep", "model.base_depth=2") != complete


REFUSING = [n for n in variants.names() if variants.get(n).depth_parametrization_conflict]


def test_the_variants_that_refuse_a_parametrization_are_the_known_ones():
    # By depth: DeepNorm, Admin, LNS, LayerScale; by a norm or softmax that undoes a multiplier:
    # Sandwich, Peri-LN, ResPost, nGPT, AttnRes.
    assert set(REFUSING) == {
        "deepnorm", "admin", "lns", "layerscale", "sandwich", "peri-ln", "respost", "ngpt",
        "attnres",
    }  # fmt: skip


@pytest.mark.parametrize("variant", REFUSING)
@pytest.mark.parametrize("parametrization", ["depth_mup", "completep"])
def test_variants_that_scale_their_branches_by_depth_refuse_a_parametrization(
    variant, parametrization
):
    cell = small_cell(parametrization, 8, variant=variant)
    reason = variants.get(variant).depth_parametrization_conflict
    assert reason
    with pytest.raises(ConfigError, match=r"^model\.parametrization: variant .* cannot") as error:
        validate(cell)
    assert reason in str(error.value) and "model.parametrization=sp" in str(error.value)
    validate(small_cell("sp", 8, variant=variant))  # fine without one


ACCEPTING = [n for n in variants.names() if not variants.get(n).depth_parametrization_conflict]


@pytest.mark.parametrize("variant", ACCEPTING)
def test_every_other_variant_takes_any_parametrization(variant):
    validate(small_cell("completep", 8, variant=variant))


@pytest.mark.parametrize("variant", ACCEPTING)
def test_no_variant_that_accepts_a_multiplier_silently_undoes_it(variant):
    """A wiring that ends a branch in a norm (Sandwich, ResPost: LN(m·F) = LN(F)) would make
    every parametrization train SP under another name: such a variant must refuse instead."""
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))

    def logits(m: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(ModelShape(50, 32, 2, 2, 4.0, 8, branch_multiplier=m), variants.get(variant)())
        # Off the init (ReZero's gate starts at 0) and far above any norm's ε: a norm at the
        # branch's end then undoes m to within float error, which the margin below tells apart.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        return model(tokens)

    plain = logits(1.0)
    assert (plain - logits(0.125)).abs().max() > 1e-2 * plain.abs().max()


def test_sp_ignores_the_base_depth_so_it_sweeps_beside_a_parametrization_at_another_one():
    cells = [
        cell
        for _, cell in sweep_cells(
            ["+variant=preln", "sweep=tiny", "model.parametrization=sp,completep",
             "model.base_depth=8"]
        )
    ]  # fmt: skip
    sp = [c for c in cells if c.model.parametrization == "sp"]
    plain = [c for _, c in sweep_cells(["+variant=preln", "sweep=tiny"])]
    assert sorted(c.cell_id() for c in sp) == sorted(c.cell_id() for c in plain)
    assert {c.model.base_depth for c in cells if c.model.parametrization == "completep"} == {8}


def test_a_packed_member_under_depth_mup_matches_its_unpacked_cell():
    cells = [small_cell("depth_mup", 8) for _ in range(2)]
    for cell, lr in zip(cells, (3e-3, 1e-2), strict=True):
        cell.optim.lr, cell.train.steps = lr, 12
    packed = run_pack(cells)
    for cell, (record, curve) in zip(cells, packed, strict=True):
        alone, alone_curve = run_cell(cell)
        assert record["cell_id"] == alone["cell_id"]
        assert [r["loss"] for r in curve] == pytest.approx(
            [r["loss"] for r in alone_curve], rel=1e-4
        )
        assert record["parametrization"] == "depth_mup" and record["base_depth"] == 4


def test_transfer_preset_expands_to_its_documented_grid():
    header = (REPO / "conf" / "sweep" / "transfer.yaml").read_text()
    cells = [c for _, c in sweep_cells(["+variant=preln,rmsnorm", "sweep=transfer"])]
    assert len(cells) == 112 and "= 56 cells per variant, 112 for the two" in header
    assert {c.model.parametrization for c in cells} == {"sp", "completep"}
    assert [c.model.depth for c in cells] == sorted((c.model.depth for c in cells), reverse=True)
    assert {c.model.depth for c in cells} == {4, 8, 16, 32}
    lrs = sorted({c.optim.lr for c in cells})
    assert len(lrs) == 7 and math.isclose(lrs[-1] / lrs[0], 1000)
    assert {c.model.base_depth for c in cells} == {4} and {c.sweep for c in cells} == {"transfer"}
