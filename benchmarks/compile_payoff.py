"""Does ``train.compile=true`` pay for a sweep on this machine? Per variant and depth, at the
quick preset's shape, through the suite's own training path (``suite.run.runner.run_cell``):

    python -m benchmarks.compile_payoff [--variants preln,hc,mhc,attnres:blocks=8] [--depths 6,24]
                                        [--steps 60]

Each (variant, depth) runs in two fresh processes that share a new, empty inductor cache. Each
process first trains a two-step eager cell, so that what every first cell pays (imports, the
corpus) is not counted as compiling. Then:

1. the first trains the eager cell, a compiled cell (cold: nothing cached), and a second compiled
   cell of the same configuration, as a sweep's worker does (dynamo reuses the compiled code for
   a new model of the same configuration);
2. the second trains one compiled cell from the warm on-disk cache (a later sweep, another
   worker).

All at one seed and learning rate 1e-3, every step trained. A cell's overhead is its wall time
less its steps at its median step time (``tokens_per_s``): model build, diagnostics, evaluation
and compiling. A compile's cost is a compiling cell's overhead less the eager cell's; the
second compiled cell's is that cell's. The quick sweep's wall time follows for both: 10 cells of
400 steps per depth on 2 single-threaded workers, each compiling each depth once from the warm
cache. Prints a markdown table with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK_STEPS, QUICK_CELLS_PER_DEPTH, QUICK_WORKERS = 400, 10, 2


def cell_wall(variant: str, depth: int, steps: int, compile: bool) -> dict:
    """Train one quick-preset cell; its wall time (compile included), median step and overhead."""
    import time

    from hydra import compose, initialize_config_dir

    from suite.launch.cell import cell_from_config, config_dir
    from suite.launch.preflight import register_configs
    from suite.run.runner import run_cell

    register_configs()
    name, *settings = variant.split(":")  # attnres:blocks=8 → +variant=attnres variant.blocks=8
    overrides = [f"+variant={name}", *(f"variant.{s}" for s in settings), "sweep=quick",
                 f"model.depth={depth}", f"train.steps={steps}", "optim.lr=1e-3", "seed=0",
                 f"train.compile={str(compile).lower()}", "store=unused"]  # fmt: skip
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cell = cell_from_config(compose("config", overrides=overrides))
    start = time.perf_counter()
    record, _ = run_cell(cell)
    wall = time.perf_counter() - start
    if record["status"] != "ok" or record.get("steps_completed") != steps:
        raise SystemExit(f"{cell.cell_id()}: not every step trained ({record.get('error')})")
    step = cell.train.batch_size * cell.model.seq_len / record["tokens_per_s"]
    return {
        "wall_s": wall,
        "step_s": step,
        "overhead_s": wall - steps * step,
        "machine": record.get("device_name"),
        "torch": record.get("torch_version"),
    }


def child(args: argparse.Namespace) -> None:
    """One process's cells, as JSON on stdout."""
    variant, depth, steps = args.child, args.depth, args.steps
    cell_wall(variant, 1, 2, compile=False)  # the first cell's own costs, outside the measure
    if args.warm:
        runs = {"warm": cell_wall(variant, depth, steps, True)}
    else:
        runs = {
            "eager": cell_wall(variant, depth, steps, False),
            "cold": cell_wall(variant, depth, steps, True),
            "reused": cell_wall(variant, depth, steps, True),
        }
    print("RESULT " + json.dumps(runs))


def measure(variant: str, depth: int, steps: int) -> dict:
    cache = tempfile.mkdtemp(prefix="compile_payoff_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1"}
    runs: dict = {}
    try:
        for warm in (False, True):
            command = [sys.executable, "-m", "benchmarks.compile_payoff", "--child", variant]
            command += ["--depth", str(depth), "--steps", str(steps)]
            command += ["--warm"] if warm else []
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            runs.update(json.loads(lines[-1].removeprefix("RESULT ")))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return costs(runs)


def costs(runs: dict) -> dict:
    """Step times, overheads and compile costs from one (variant, depth)'s cells (``child``'s)."""
    eager = runs["eager"]["overhead_s"]
    return {
        "eager_step_s": runs["eager"]["step_s"],
        "compiled_step_s": runs["reused"]["step_s"],
        "eager_overhead_s": eager,
        "cold_compile_s": runs["cold"]["overhead_s"] - eager,
        "warm_compile_s": runs["warm"]["overhead_s"] - eager,
        "reused_compile_s": runs["reused"]["overhead_s"] - eager,
        "machine": runs["eager"]["machine"],
        "torch": runs["eager"]["torch"],
    }


def quick_sweep_minutes(rows: list[dict], compiled: bool) -> float:
    """The quick sweep's wall time for one variant from its per-depth measurements."""
    seconds = 0.0
    for row in rows:
        step = row["compiled_step_s"] if compiled else row["eager_step_s"]
        overhead = row["eager_overhead_s"] + (row["reused_compile_s"] if compiled else 0.0)
        seconds += QUICK_CELLS_PER_DEPTH * (QUICK_STEPS * step + overhead) / QUICK_WORKERS
        seconds += row["warm_compile_s"] if compiled else 0.0  # the workers compile in parallel
    return seconds / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="preln,hc,mhc")
    parser.add_argument("--depths", default="6,24")
    parser.add_argument("--steps", type=int, default=60, help="steps per measured cell")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    by_variant: dict[str, list[dict]] = {}
    print("| variant | depth | eager step | compiled step | speed-up | compile cold | "
          "compile, warm disk cache | compile, second cell in the worker |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            row = measure(variant, depth, args.steps)
            by_variant.setdefault(variant, []).append(row)
            print(f"| {variant} | {depth} | {1000 * row['eager_step_s']:.1f} ms | "
                  f"{1000 * row['compiled_step_s']:.1f} ms | "
                  f"{row['eager_step_s'] / row['compiled_step_s']:.2f}× | "
                  f"{row['cold_compile_s']:.1f} s | {row['warm_compile_s']:.1f} s | "
                  f"{row['reused_compile_s']:.1f} s |", flush=True)  # fmt: skip
    print()
    print("| variant | quick sweep, eager | quick sweep, compiled (warm cache) |")
    print("|---|---|---|")
    for variant, rows in by_variant.items():
        eager, compiled = quick_sweep_minutes(rows, False), quick_sweep_minutes(rows, True)
        print(f"| {variant} | {eager:.1f} min | {compiled:.1f} min ({eager / compiled:.2f}×) |")
    row = next(iter(by_variant.values()))[0]
    where = f"{row['machine']}, torch {row['torch']}"
    print(f"\n{where}; train.threads=1 (the quick preset's); {args.steps} steps a measured cell")


if __name__ == "__main__":
    main()
