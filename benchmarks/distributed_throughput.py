"""Sampling throughput with 1 and 2 processes under torchrun (1 thread each), as a ratio.

Each measurement launches `torchrun --standalone --nproc_per_node=N` on this script's worker, which
samples `--num-samples` images of `full` with the harness's sharded `generate` (gloo on the CPU) and
reports the wall-clock time between two barriers, gathering included. Launches alternate 1, 2, 1, 2 ...
`--repeats` times; printed: images per second for each and the median of the pairs' ratios. On a
machine with at least 2 free cores the ideal ratio is 2.

    python benchmarks/distributed_throughput.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """Inside torchrun: time one sharded sampling run; rank 0 prints the seconds."""
    import torch

    from adadiff_bench.checkpoints import load_model
    from adadiff_bench.distributed import join_world, leave_world
    from adadiff_bench.harness import Cell, generate

    torch.set_num_threads(1)
    world = join_world()
    model = load_model(args.checkpoint)
    cell = Cell("full", (), args.solver, args.steps, 0)
    generate(cell, model, args.batch, args.batch)  # warm-up, local
    world.barrier()
    start = time.perf_counter()
    generate(cell, model, args.num_samples, args.batch, world=world)
    world.barrier()
    if world.is_main:
        print(f"SECONDS {time.perf_counter() - start:.6f}", flush=True)
    leave_world(world)


def launch(processes: int, args) -> float:
    """Seconds of one sharded sampling run with `processes` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--num-samples", str(args.num_samples), "--batch", str(args.batch),
               "--steps", str(args.steps), "--solver", args.solver, "--checkpoint", args.checkpoint]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("SECONDS")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="checkpoints/uvit_digits.pt")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--solver", default="dpm-solver++")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    ratios, rates = [], {1: [], 2: []}
    for _ in range(args.repeats):
        one, two = launch(1, args), launch(2, args)
        rates[1].append(args.num_samples / one)
        rates[2].append(args.num_samples / two)
        ratios.append(one / two)
    print(f"cpu_count={os.cpu_count()} samples={args.num_samples} batch={args.batch} steps={args.steps} "
          f"repeats={args.repeats}, 1 thread per process")
    print("| processes | images/s (median) | throughput ratio 2 / 1 (median, IQR) |")
    print("|---:|---:|---:|")
    print(f"| 1 | {np.median(rates[1]):.1f} | |")
    q75, q25 = np.percentile(ratios, [75, 25])
    print(f"| 2 | {np.median(rates[2]):.1f} | {np.median(ratios):.2f} ({q75 - q25:.2f}) |")


if __name__ == "__main__":
    main()
