"""mHC's Sinkhorn-Knopp by its C kernel (variants/native) against the PyTorch loop beside it.

    python -m benchmarks.sinkhorn [--tokens 1024] [--rounds 15] [--calls 40]

Forward and backward of ``variants.mhc.sinkhorn_knopp`` (n = 4, 20 iterations, float32, one
thread) for one sublayer's tokens at the benchmark shape (batch 16 × sequence 64), plain and as
a packed run of 4 members under vmap, the kernel and the loop timed in alternating rounds.
Prints a markdown table of median milliseconds a call, with the machine named; both give the
same bits (tests/variants/test_native.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import variants.native
from suite.provenance import cpu_model
from variants.mhc import sinkhorn_knopp


def use_kernel(on: bool) -> None:
    os.environ["SUITE_NATIVE"] = "1" if on else "0"
    reload_setting()


def reload_setting() -> None:
    """Makes the next Sinkhorn call read ``SUITE_NATIVE`` again (the library is cached)."""
    variants.native.library.cache_clear()


def forward_backward(logits: torch.Tensor, packed: bool) -> Callable[[], None]:
    weights = torch.randn_like(logits)

    normalize = torch.func.vmap(lambda x: sinkhorn_knopp(x, 20)) if packed else sinkhorn_knopp

    def call() -> None:
        x = logits.clone().requires_grad_()
        (normalize(x) * weights).sum().backward()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40, help="calls per timed round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before = os.environ.get("SUITE_NATIVE")
    try:
        measure(args)
    finally:  # the caller's setting back
        if before is None:
            os.environ.pop("SUITE_NATIVE", None)
        else:
            os.environ["SUITE_NATIVE"] = before
        reload_setting()


def measure(args: argparse.Namespace) -> None:
    use_kernel(True)
    if variants.native.library("sinkhorn") is None:
        raise SystemExit("the kernel did not build here (see the warning): nothing to compare")
    cases = {
        "plain": forward_backward(4 * torch.randn(args.tokens, 4, 4), packed=False),
        "packed, 4 members": forward_backward(4 * torch.randn(4, args.tokens, 4, 4), packed=True),
    }
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for on in (True, False):
            use_kernel(on)
            for name, call in cases.items():
                call()  # warm: the first call after a switch loads the kernel
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                seconds = (time.perf_counter() - start) / args.calls
                times.setdefault((name, on), []).append(seconds)
    print(f"{cpu_model()}, torch {torch.__version__}, 1 thread, {args.tokens} tokens, n = 4")
    print("| call (forward + backward) | C kernel | PyTorch loop | speed-up |")
    print("|---|---|---|---|")
    for name in cases:
        kernel, loop = (1000 * statistics.median(times[name, on]) for on in (True, False))
        print(f"| {name} | {kernel:.2f} ms | {loop:.2f} ms | {loop / kernel:.2f}× |")


if __name__ == "__main__":
    main()
