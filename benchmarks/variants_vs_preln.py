"""Each variant's training-step time relative to Pre-LN's, every variant timed in turn.

    python -m benchmarks.variants_vs_preln [--rounds 10] [--steps 3]

pytest-benchmark (``make bench``) times one benchmark after another, so a drift in the machine's
speed during the run lands on whichever variant was being timed then. Here every round times
``--steps`` full training steps (forward, backward, AdamW) of every variant in turn, at the
benchmark suite's shapes (batch 16 × sequence 64), and the medians over rounds are compared, so
drift hits all variants alike. Prints a markdown table of step time / Pre-LN's step time.
"""

from __future__ import annotations

import argparse

import torch

import variants
from benchmarks.peer import Shape, alternate, suite_model, training_step

SHAPES = [Shape(64, 4, 6, 64, 16), Shape(64, 4, 24, 64, 16), Shape(128, 4, 6, 64, 16),
          Shape(128, 4, 24, 64, 16)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="first N shapes only")
    args = parser.parse_args()
    shapes = SHAPES[: args.shapes]
    names = variants.names()
    ratios: dict[str, list[str]] = {name: [] for name in names}
    preln_ms = []
    for shape in shapes:
        torch.manual_seed(0)
        steps = {name: training_step(suite_model(shape, name), shape) for name in names}
        seconds = alternate(steps, args.rounds, args.steps)
        preln_ms.append(f"{1000 * seconds['preln']:.1f} ms")
        for name in names:
            ratios[name].append(f"{seconds[name] / seconds['preln']:.2f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = [f"w{s.width} L{s.depth}" for s in shapes]
    print("| variant | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(shapes))
    print("| preln step | " + " | ".join(preln_ms) + " |")
    for name in names:
        print(f"| {name} | " + " | ".join(ratios[name]) + " |")


if __name__ == "__main__":
    main()
