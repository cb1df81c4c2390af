"""Each variant's training-step time relative to Pre-LN's, every variant timed in turn.

    python -m benchmarks.variants_vs_preln [--rounds 10] [--steps 3] [--variants ngpt,attnres]
                                           [--compile] [--threads 1]

pytest-benchmark (``make bench``) times one benchmark after another, so a drift in the machine's
speed during the run lands on whichever variant was being timed then. Here every round times
``--steps`` full training steps (forward, backward, AdamW) of every variant in turn, at the
benchmark suite's shapes (batch 16 × sequence 64), and the medians over rounds are compared, so
drift hits all variants alike. Prints a markdown table of step time / Pre-LN's step time, and
the activation memory one forward pass keeps for backward at the last shape (the bytes of every
tensor autograd saves, counted once per storage: a property of the model, not of the machine).
``--compile`` times every model, Pre-LN too, under ``torch.compile`` (compiled in the warm-up).
"""

from __future__ import annotations

import argparse
import ast

import torch

import variants
from benchmarks.peer import Shape, alternate, suite_model, training_step

SHAPES = [Shape(64, 4, 6, 64, 16), Shape(64, 4, 24, 64, 16), Shape(128, 4, 6, 64, 16),
          Shape(128, 4, 24, 64, 16)]  # fmt: skip


def saved_activation_mib(model: torch.nn.Module, shape) -> float:
    """MiB of the tensors autograd saves for backward in one forward pass (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, 256, (shape.batch, shape.seq_len))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens).float().logsumexp(-1).mean()
    return sum(n for ptr, n in storages.items() if ptr not in parameters) / 2**20


def model_of(shape, spec: str) -> torch.nn.Module:
    """``name`` or ``name:key=value[:key=value]`` (values read as Python literals)."""
    name, *settings = spec.split(":")
    params = {key: ast.literal_eval(value) for key, value in (s.split("=", 1) for s in settings)}
    return suite_model(shape, name, **params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="first N shapes only")
    parser.add_argument(
        "--variants",
        help="only these variants (and preln, the reference), e.g. ngpt,attnres; a variant's "
        "own parameters after colons: attnres:blocks=8",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--threads", type=int, help="torch's intra-op threads (default: torch's; a sweep's "
        "cells run at 1, train.threads)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[: args.shapes]
    names = variants.names()
    if args.variants:
        chosen = args.variants.split(",")
        names = ["preln", *[name for name in chosen if name != "preln"]]
    ratios: dict[str, list[str]] = {name: [] for name in names}
    preln_ms = []
    for shape in shapes:
        torch.manual_seed(0)
        models = {name: model_of(shape, name) for name in names}
        if args.compile:
            models = {name: torch.compile(model) for name, model in models.items()}
        steps = {name: training_step(model, shape) for name, model in models.items()}
        seconds = alternate(steps, args.rounds, args.steps)
        preln_ms.append(f"{1000 * seconds['preln']:.1f} ms")
        for name in names:
            ratios[name].append(f"{seconds[name] / seconds['preln']:.2f}")
    last = shapes[-1]
    memory = {}
    for name in names:
        torch.manual_seed(0)
        memory[name] = saved_activation_mib(model_of(last, name), last)
    compiled = ", every model compiled" if args.compile else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{compiled}")
    header = [f"w{s.width} L{s.depth}" for s in shapes]
    memory_header = f"activations w{last.width} L{last.depth}"
    print("| variant | " + " | ".join(header) + f" | {memory_header} |")
    print("|---|" + "---|" * (len(shapes) + 1))
    print("| preln step | " + " | ".join(preln_ms) + f" | {memory['preln']:.1f} MiB |")
    for name in names:
        relative = f"{memory[name] / memory['preln']:.2f}"
        print(f"| {name} | " + " | ".join(ratios[name]) + f" | {relative} |")


if __name__ == "__main__":
    main()
