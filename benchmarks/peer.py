"""The suite's training step against x-transformers' decoder at the same shape, alternating.

    python -m benchmarks.peer                      # both shapes of issue #7, Pre-LN and Post-LN
    python -m benchmarks.peer --rounds 30 --threads 2
    python -m benchmarks.peer --compile --variants preln  # torch.compile the suite's model

For each shape and norm placement it builds the suite's GPT and an x-transformers
``TransformerWrapper(Decoder)`` with the same width, heads, head dim, depth, sequence, batch,
vocabulary and tied embedding (parameter counts printed; they must agree within 1%), then times
rounds of ``--steps`` full training steps (forward, backward, AdamW), alternating the two models
round by round so drift in the machine's speed hits both alike. It reports median tokens/s, the
ratio, the achieved FLOP/s of the suite's step and that as a share of this machine's fp32 GEMM
rate measured at the same thread count. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import variants
from suite.config import OptimConfig
from suite.run.model import GPT, ModelShape
from suite.run.optimizers import make_optimizer

VOCAB = 256
SHAPES = [  # (width, heads, depth, seq_len, batch): the two shapes issue #7 names
    (128, 4, 8, 128, 16),
    (64, 4, 24, 128, 16),
]


@dataclass(frozen=True)
class Shape:
    width: int
    heads: int
    depth: int
    seq_len: int
    batch: int

    def label(self) -> str:
        return f"width {self.width}, depth {self.depth}, seq {self.seq_len}, batch {self.batch}"


def suite_model(shape: Shape, variant: str, **params: object) -> nn.Module:
    return GPT(
        ModelShape(VOCAB, shape.width, shape.heads, shape.depth, 4.0, shape.seq_len),
        variants.get(variant)(**params),
    )


def x_transformers_model(shape: Shape, pre_norm: bool) -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=shape.seq_len,
        tie_embedding=True,
        attn_layers=Decoder(
            dim=shape.width,
            depth=shape.depth,
            heads=shape.heads,
            attn_dim_head=shape.width // shape.heads,
            ff_mult=4,
            pre_norm=pre_norm,
            attn_flash=True,  # its fastest path: the same fused SDPA kernel the suite uses
        ),
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_step(model: nn.Module, shape: Shape) -> Callable[[], float]:
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3))
    tokens = torch.randint(0, VOCAB, (shape.batch, shape.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    # The variant's own step after the optimizer's, as in training (nGPT re-normalizes).
    after_optimizer_step = getattr(model, "after_optimizer_step", lambda: None)

    def step() -> float:
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_optimizer_step()
        return loss.item()

    return step


def step_flops(model: GPT, shape: Shape) -> float:
    """FLOPs of one training step: 6 · (matmul parameters) · tokens, plus attention's
    12 · depth · width · seq_len per token (PaLM, Chowdhery et al. 2022, App. B)."""
    matmul_params = n_params(model) - model.position_embedding.weight.numel()
    tokens = shape.batch * shape.seq_len
    return 6 * matmul_params * tokens + 12 * shape.depth * shape.width * shape.seq_len * tokens


def gemm_rate(size: int = 1024, repeats: int = 20) -> float:
    """This machine's fp32 matmul rate (FLOP/s) at the current thread count: best of a few
    timed square products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def alternate(
    steps: dict[str, Callable[[], float]], rounds: int, steps_per_round: int
) -> dict[str, float]:
    """Median seconds per step of each contender, timed in alternating rounds."""
    for step in steps.values():  # warm up: allocator, optimizer state, kernels
        for _ in range(3):
            step()
    per_step: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            per_step[name].append((time.perf_counter() - start) / steps_per_round)
    return {name: statistics.median(times) for name, times in per_step.items()}


def compare(
    shape: Shape, variant: str, rounds: int, steps_per_round: int, compile_suite: bool = False
) -> dict[str, float]:
    torch.manual_seed(0)
    ours = suite_model(shape, variant)
    theirs = x_transformers_model(shape, pre_norm=variant != "postln")
    suite_step = training_step(torch.compile(ours) if compile_suite else ours, shape)
    start = time.perf_counter()
    suite_step()  # with --compile: the compilation happens here
    first_step_s = time.perf_counter() - start
    seconds = alternate(
        {"suite": suite_step, "x-transformers": training_step(theirs, shape)},
        rounds,
        steps_per_round,
    )
    tokens = shape.batch * shape.seq_len
    return {
        "suite_params": n_params(ours),
        "peer_params": n_params(theirs),
        "suite_tokens_per_s": tokens / seconds["suite"],
        "peer_tokens_per_s": tokens / seconds["x-transformers"],
        "ratio": seconds["x-transformers"] / seconds["suite"],
        "suite_flops_per_s": step_flops(ours, shape) / seconds["suite"],
        "suite_first_step_s": first_step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--compile", action="store_true", help="torch.compile the suite's model")
    parser.add_argument("--variants", default="preln,postln")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gemm = gemm_rate()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fp32 GEMM (1024², best of 20): {gemm / 1e9:.1f} GFLOP/s; "
        f"suite model {'compiled' if args.compile else 'eager'}"
    )
    print(
        "| shape | variant | params suite / x-transformers | suite tok/s | x-transformers tok/s "
        "| ratio | suite GFLOP/s | % of GEMM | suite first step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in SHAPES:
        shape = Shape(*spec)
        for variant in args.variants.split(","):
            r = compare(shape, variant, args.rounds, args.steps, args.compile)
            print(
                f"| {shape.label()} | {variant} | {r['suite_params']:,} / {r['peer_params']:,} "
                f"| {r['suite_tokens_per_s']:,.0f} | {r['peer_tokens_per_s']:,.0f} "
                f"| {r['ratio']:.2f}× | {r['suite_flops_per_s'] / 1e9:.1f} "
                f"| {100 * r['suite_flops_per_s'] / gemm:.0f}% | {r['suite_first_step_s']:.1f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
