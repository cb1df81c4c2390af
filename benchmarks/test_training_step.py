"""One full training step (forward, backward, AdamW) per variant × depth × width.

    pytest benchmarks --benchmark-enable --benchmark-json=.benchmarks/step.json
    python -m suite.report --benchmark .benchmarks/step.json

Grouped by shape so variants compare side by side; on CUDA the step synchronizes the device
and runs under bf16 autocast. In the test suite (``--benchmark-disable``) each runs once, so
the benchmarks cannot rot.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import variants
from suite.config import OptimConfig
from suite.run.environment import resolve_device
from suite.run.model import GPT, ModelShape
from suite.run.optimizers import make_optimizer

BATCH, SEQ, VOCAB = 16, 64, 256


@pytest.mark.parametrize("width", [64, 128])
@pytest.mark.parametrize("depth", [6, 24])
@pytest.mark.parametrize("variant", variants.names())
def test_training_step(benchmark, variant, depth, width):
    device = resolve_device("auto")
    torch.manual_seed(0)
    shape = ModelShape(VOCAB, width, 4, depth, 4.0, SEQ)
    model = GPT(shape, variants.get(variant)()).to(device)
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item()

    step()  # allocate optimizer state outside the timed rounds
    benchmark.group = f"width {width}, depth {depth}"
    benchmark.extra_info.update(
        variant=variant,
        depth=depth,
        width=width,
        tokens_per_step=BATCH * SEQ,
        threads=torch.get_num_threads(),
        device=device.type,
    )
    loss = benchmark(step)
    assert torch.isfinite(torch.tensor(loss))
