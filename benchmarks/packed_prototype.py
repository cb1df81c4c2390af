"""Would packing K learning-rate cells into one batched step pay on this machine?

    python -m benchmarks.packed_prototype [--members 5] [--threads 1]

Times one forward + backward of K copies of the suite's GPT stacked with ``torch.func``
(``functional_call`` under ``vmap``: what a packed LR sweep would run each step) against K
ordinary steps one after another, alternating rounds, at the quick preset's shape (width 64,
depth 6, seq 64, batch 16). The optimizer is left out: it is elementwise and costs the same
either way. A ratio above 1 means packing is faster.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from benchmarks.peer import VOCAB, Shape, alternate, suite_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    shape = Shape(64, 4, 6, 64, 16)
    torch.manual_seed(0)
    model = suite_model(shape, "preln")
    tokens = torch.randint(0, VOCAB, (shape.batch, shape.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    stacked = {
        name: p.detach().expand(args.members, *p.shape).clone().requires_grad_()
        for name, p in model.named_parameters()
    }

    def member_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def packed() -> float:
        for p in stacked.values():
            p.grad = None
        losses = vmap(member_loss)(stacked)
        losses.sum().backward()
        return losses.sum().item()

    def one_by_one() -> float:
        total = 0.0
        for _ in range(args.members):
            model.zero_grad(set_to_none=True)
            loss = member_loss(dict(model.named_parameters()))
            loss.backward()
            total += loss.item()
        return total

    seconds = alternate({"packed": packed, "one by one": one_by_one}, args.rounds, 1)
    print(
        f"{args.members} members, {torch.get_num_threads()} thread(s): packed "
        f"{1000 * seconds['packed']:.0f} ms, one by one {1000 * seconds['one by one']:.0f} ms; "
        f"packing speed-up {seconds['one by one'] / seconds['packed']:.2f}×"
    )


if __name__ == "__main__":
    main()
