"""Variant plugins: the example package installed and swept, a plugin built only on the exported
API, broken plugins named, duplicates rejected with both sources."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pandas as pd
import pytest
from helpers import REPO, fake_distribution, run_suite

import variants
from variants import Variant

EXAMPLE = REPO / "examples" / "b2t"


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def example_plugin():
    """The README's walk-through: pip install -e examples/b2t (offline: no build isolation)."""
    pip("install", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE))
    yield
    pip("uninstall", "-y", "stability-suite-b2t")


def python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_example_plugin_is_listed_swept_and_recorded(example_plugin, tmp_path):
    listing = python("-m", "variants")
    assert listing.returncode == 0, listing.stderr
    line = next(row for row in listing.stdout.splitlines() if row.startswith("b2t"))
    assert "stability-suite-b2t 0.1.0" in line and "skips to the last LN" in line
    assert "preln" in listing.stdout and "built-in" in listing.stdout

    # Through the joblib launcher: its workers unpickle the task and look the plugin up again.
    result = run_suite(
        "+variant=b2t",
        "sweep=tiny",
        "variant.eps=1e-6",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"store={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "runs.parquet")
    assert len(runs) == 4 and (runs["status"] == "ok").all()
    assert (runs["variant"] == "b2t").all()
    assert (runs["variant_source"] == "stability-suite-b2t 0.1.0").all()
    assert json.loads(runs["variant_params"].iloc[0]) == {"eps": 1e-6}
    # A parameter that one variant of the sweep lacks is a config error, before any training.
    result = run_suite(
        "+variant=mixln,b2t",
        "sweep=tiny",
        "variant.post_fraction=0.5",
        f"store={tmp_path / 'other'}",
    )
    assert result.returncode == 2
    assert "config error: variant.post_fraction: Key 'post_fraction' is not in struct" in (
        result.stderr
    )
    assert "in the cell: " in result.stderr and "+variant=b2t" in result.stderr


BROKEN_IMPORT = """
    import this_module_does_not_exist  # noqa
"""
SHAPE_CHANGING = """
    from dataclasses import dataclass
    import torch
    from torch import nn
    from variants import Variant, register

    class Widen(nn.Module):
        def forward(self, x, attn, mlp):
            return torch.cat([x, attn(x)], dim=-1)

    @register("widen")
    @dataclass
    class Widening(Variant):
        formula = "y = [x, F(x)]"

        def wiring(self, width, n_layers, layer):
            return Widen()
"""
DUPLICATE = """
    from dataclasses import dataclass
    from variants import PreLNWiring, Variant, register

    @register("preln")
    @dataclass
    class MyPreLN(Variant):
        def wiring(self, width, n_layers, layer):
            return PreLNWiring(width, 1e-5)
"""
# A plugin written against nothing but `variants`' exported API: a wiring of its own beside the
# suite's Pre-LN one, the suite's norms, and an init through the ModelView.
EXPORTED_API_ONLY = """
    from dataclasses import dataclass

    from torch import Tensor, nn

    from variants import (
        ModelView,
        LayerNorm,
        PreLNWiring,
        RMSNorm,
        Sublayer,
        Variant,
        Wiring,
        gpt2_residual_std,
        register,
        scale_residual_projections,
    )

    class HalvedBranches(nn.Module):
        def __init__(self, width: int, eps: float) -> None:
            super().__init__()
            self.norm_attn = RMSNorm(width, eps)
            self.norm_mlp = RMSNorm(width, eps)

        def forward(self, x: Tensor, attn: Sublayer, mlp: Sublayer) -> Tensor:
            h = x + 0.5 * attn(self.norm_attn(x))
            return h + 0.5 * mlp(self.norm_mlp(h))

    @register("exported-api")
    @dataclass
    class ExportedAPI(Variant):
        formula = "Pre-LN and halved RMS-normed branches, alternating; MLP output zero at init"
        eps: float = 1e-5

        def wiring(self, width: int, n_layers: int, layer: int) -> Wiring:
            if layer % 2 == 0:
                return PreLNWiring(width, self.eps)
            return HalvedBranches(width, self.eps)

        def final_norm(self, width: int) -> nn.Module:
            return LayerNorm(width, self.eps)

        def init_weights(self, model: ModelView) -> None:
            scale_residual_projections(model, gpt2_residual_std(model.depth))
            for block in model.blocks:
                nn.init.zeros_(block.mlp_out.weight)
"""


@pytest.fixture
def broken_site(tmp_path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "broken-plugin", BROKEN_IMPORT)
    fake_distribution(site, "widen-plugin", SHAPE_CHANGING)
    fake_distribution(site, "duplicate-plugin", DUPLICATE)
    return {"PYTHONPATH": str(site)}


def test_a_plugin_on_the_exported_api_alone_builds_and_sweeps(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "exported-api-plugin", EXPORTED_API_ONLY)
    env = {"PYTHONPATH": str(site)}
    check = python(
        "-c",
        "import torch, variants\n"
        "from suite.run.model import GPT, ModelShape\n"
        "torch.manual_seed(0)\n"
        "model = GPT(ModelShape(64, 32, 2, 4, 4.0, 8), variants.get('exported-api')())\n"
        "print([type(b.wiring).__name__ for b in model.blocks])\n"
        "print(all(torch.all(b.mlp.proj.weight == 0).item() for b in model.blocks))\n"
        "print(torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]).std().item())",
        env=env,
    )
    assert check.returncode == 0, check.stderr
    wirings, mlp_out_zero, attn_out_std = check.stdout.splitlines()[:3]
    assert wirings == "['PreLNWiring', 'HalvedBranches', 'PreLNWiring', 'HalvedBranches']"
    assert mlp_out_zero == "True"
    assert float(attn_out_std) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    result = run_suite(
        "+variant=exported-api",
        "sweep=tiny",
        "model.depth=2",
        "train.steps=10",
        f"store={tmp_path / 'store'}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "store" / "runs.parquet")
    assert (runs["variant_source"] == "exported-api-plugin 0.1").all()
    assert (runs["status"] == "ok").all()


def test_the_example_plugin_imports_only_the_exported_api():
    path = EXAMPLE / "stability_suite_b2t" / "__init__.py"
    imported = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert {m for m in imported if m.split(".")[0] == "variants"} == {"variants"}
    # Imported from the source tree, not installed (the slow test installs it), in a subprocess
    # so that this process's registry does not gain it: its block against the formula.
    check = python(
        "-c",
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from stability_suite_b2t import B2T\n"
        "from suite.run.model import GPT, ModelShape\n"
        "model = GPT(ModelShape(64, 16, 2, 2, 4.0, 8), B2T())\n"
        "block, x = model.blocks[0], torch.randn(1, 8, 16)\n"
        "def ln(t, n): return F.layer_norm(t, (16,), n.weight, n.bias, n.eps)\n"
        "h = ln(x + block.attn(x), block.wiring.norm_attn)\n"
        "y = ln(h + block.mlp(h) + x, block.wiring.norm_mlp)\n"
        "torch.testing.assert_close(block(x), y)\n"
        "print(type(model.final_norm).__name__)",
        env={"PYTHONPATH": str(EXAMPLE)},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "Identity"


def test_broken_plugins_are_named_and_the_built_ins_still_run(broken_site, tmp_path):
    listing = python("-m", "variants", env=broken_site)
    assert listing.returncode == 0, listing.stderr
    assert "broken_plugin  FAILED TO LOAD: ModuleNotFoundError" in listing.stdout
    assert (
        "duplicate_plugin  FAILED TO LOAD: ValueError: variant 'preln' is registered twice: "
        "by variants.preln.PreLN (built-in) and by duplicate_plugin.MyPreLN "
        "(duplicate-plugin 0.1)" in listing.stdout
    )
    assert "widen" in listing.stdout and "preln" in listing.stdout

    result = run_suite(
        "+variant=preln",
        "sweep=tiny",
        "model.depth=2",
        "optim.lr=1e-3",
        "train.steps=10",
        f"store={tmp_path / 'store'}",
        env=broken_site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "variant plugin 'broken_plugin' (package broken-plugin) failed to load" in (
        result.stdout + result.stderr
    )
    assert len(list((tmp_path / "store" / "cells").iterdir())) == 1


def test_shape_changing_plugin_fails_before_training(broken_site, tmp_path):
    result = run_suite(
        "+variant=widen", "sweep=tiny", f"store={tmp_path / 'store'}", env=broken_site
    )
    assert result.returncode == 2
    assert (
        "variant: variant 'widen': block 0 maps the residual stream (1, 8, 32) to "
        "(1, 8, 64); a block must keep its shape"
    ) in result.stderr
    assert not (tmp_path / "store").exists()


def test_duplicate_name_names_both_sources():
    @dataclass
    class AnotherPreLN(Variant):
        formula = "copy"

    with pytest.raises(ValueError, match="variant 'preln' is registered twice") as info:
        variants.register("preln")(AnotherPreLN)
    message = str(info.value)
    assert "variants.preln.PreLN (built-in)" in message
    assert "AnotherPreLN" in message and "test_plugins" in message
    assert variants.get("preln").__module__ == "variants.preln"  # the built-in still wins


def test_non_finite_block_is_caught_at_build_time():
    from suite.run.model import GPT, ModelShape, VariantError

    class NaNWiring(Variant):
        formula = "y = NaN"

        def wiring(self, width, n_layers, layer):
            class Poison(__import__("torch").nn.Module):
                def forward(self, x, attn, mlp):
                    return x * float("nan")

            return Poison()

    NaNWiring.name = "poison"
    with pytest.raises(VariantError, match="'poison': block 0 returns non-finite values"):
        GPT(ModelShape(256, 16, 2, 2, 4.0, 8), NaNWiring())


def test_a_slot_stream_must_keep_its_slots_and_stay_finite_too():
    """A variant's stream may be a tuple of slots (AttnRes's): a block that drops a slot, or
    writes a non-finite one, is caught at build time like a tensor stream's, and so is a stream
    of slots not shaped like the embeddings (diagnostics read the slots as one stream) or of
    anything but tensors."""
    import torch

    from suite.run.model import GPT, ModelShape, VariantError

    class TwoSlots(torch.nn.Module):
        def forward(self, x):
            return (x, torch.zeros_like(x))

    class FirstSlot(torch.nn.Module):
        def forward(self, slots):
            return slots[0]

    def slot_variant(name, forward, expand=TwoSlots):
        class Wiring(torch.nn.Module):
            def forward(self, x, attn, mlp):
                return forward(x)

        class Slotted(Variant):
            formula = name

            def wiring(self, width, n_layers, layer):
                return Wiring()

            def expand_stream(self, width, n_layers):
                return expand()

            def collapse_stream(self, width, n_layers):
                return FirstSlot()

        Slotted.name = name
        return Slotted()

    kept = GPT(ModelShape(256, 16, 2, 2, 4.0, 8), slot_variant("kept", lambda x: x))
    assert kept(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)
    dropped = slot_variant("dropped", lambda x: x[:1])
    with pytest.raises(VariantError, match=r"\(\(1, 8, 16\), \(1, 8, 16\)\) to \(\(1, 8, 16\),\)"):
        GPT(ModelShape(256, 16, 2, 2, 4.0, 8), dropped)
    poisoned = slot_variant("poisoned", lambda x: (x[0], x[1] * float("nan")))
    with pytest.raises(VariantError, match="'poisoned': block 0 returns non-finite values"):
        GPT(ModelShape(256, 16, 2, 2, 4.0, 8), poisoned)

    class SlotAndMean(torch.nn.Module):
        def forward(self, x):
            return (x, x.mean(-1))

    class AsList(torch.nn.Module):
        def forward(self, x):
            return [x, x]

    for expand, got in ((SlotAndMean, r"\(\(1, 8, 16\), \(1, 8\)\)"), (AsList, "list")):
        odd = slot_variant("odd", lambda x: x, expand)
        with pytest.raises(VariantError, match=rf"'odd': expand_stream gives {got}, not a tensor"):
            GPT(ModelShape(256, 16, 2, 2, 4.0, 8), odd)


def test_a_wiring_that_is_not_a_module_is_refused_at_build_time():
    from suite.run.model import GPT, ModelShape, VariantError

    class PlainFunction:  # has forward, but its parameters could never train
        def forward(self, x, attn, mlp):
            return x + attn(x) + mlp(x)

        __call__ = forward

    class Plain(Variant):
        formula = "y = x + F(x) + G(x)"

        def wiring(self, width, n_layers, layer):
            return PlainFunction()

    Plain.name = "plain"
    with pytest.raises(VariantError, match="the wiring of block 0 is a PlainFunction, not"):
        GPT(ModelShape(256, 16, 2, 2, 4.0, 8), Plain())


def test_a_plugin_field_named_like_an_old_hook_is_not_refused():
    from dataclasses import dataclass

    from suite.run.model import GPT, ModelShape
    from variants import PreLNWiring, Variant

    @dataclass
    class WithScale(Variant):
        name = "with-scale"
        output_scale: float = 1.0

        def wiring(self, width: int, n_layers: int, layer: int) -> PreLNWiring:
            return PreLNWiring(width, 1e-5)

    GPT(ModelShape(vocab_size=10, width=8, heads=2, depth=1, mlp_ratio=2, seq_len=4), WithScale())
