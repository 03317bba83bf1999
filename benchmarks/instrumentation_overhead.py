"""What does the step log cost? Sampling with it on and off, side by side in one run.

The harness records, for every sample and step, which blocks ran, where the method exited and any
extra MACs; FLOPs, layer ratios and exit histograms all come from that log. This benchmark samples
the same cell with the log on (`StepLog`) and off (`NullStepLog`, which keeps the batch and step
context but records nothing), back to back, `repeats` times (A B A B ...), and prints the median of
the pairs' ratios time(on) / time(off) and its interquartile range. The goal is <= 1.03 for `full`.
AdaDiff's rows are context: it logs per block, not per step.

The paired ratio is noisy on a shared machine, so `full` also gets a direct estimate: the time of the
log calls one sampling run makes (a `set_step` and a `ran_full` per step), timed alone over many
calls, over the time of that run.

    python benchmarks/instrumentation_overhead.py
"""
from __future__ import annotations

import argparse
import timeit

import numpy as np
import torch

from adadiff_bench.checkpoints import load_model
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.timing import iqr, time_once


def paired_overheads(cell: Cell, model, batch: int, repeats: int) -> np.ndarray:
    """time(log on) / time(log off) for each of `repeats` back-to-back pairs, after one warm-up of each."""
    method = build_method(cell, model)

    def run(record: bool):
        return lambda: generate(cell, model, batch, batch, method=method, record=record)

    run(True)(), run(False)()
    return np.array([time_once(run(True), batch) / time_once(run(False), batch) for _ in range(repeats)])


def direct_log_share(cell: Cell, model, batch: int) -> float:
    """Time of `full`'s log calls in one run (timed alone, many calls) over the time of that run."""
    _, log = generate(cell, model, batch, batch)
    log.set_batch(list(range(batch)))
    calls = 2000
    per_step = timeit.timeit(lambda: (log.set_step(0), log.ran_full()), number=calls) / calls
    run_s = min(timeit.repeat(lambda: generate(cell, model, batch, batch), number=1, repeat=3))
    return per_step * cell.num_steps / run_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="checkpoints/uvit_digits.pt")
    parser.add_argument("--adadiff", default="checkpoints/adadiff_digits_finetuned.pt",
                        help="AdaDiff checkpoint for the context rows ('' to skip them)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--solver", default="dpm-solver++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.base)
    cells = [Cell("full", (), args.solver, args.steps, 0)]
    if args.adadiff:
        cells.append(Cell("adadiff", (("checkpoint", args.adadiff), ("threshold", 0.3)), args.solver, args.steps, 0))
    print(f"threads={args.threads} solver={args.solver} steps={args.steps} repeats={args.repeats}")
    print("| method | batch | time with log / without (median) | IQR | log calls' share of the run (direct) |")
    print("|---|---:|---:|---:|---:|")
    for cell in cells:
        for batch in args.batch_sizes:
            ratios = paired_overheads(cell, model, batch, args.repeats)
            direct = f"{direct_log_share(cell, model, batch):.2%}" if cell.method == "full" else ""
            print(f"| {cell.method} | {batch} | {np.median(ratios):.3f} | {iqr(list(ratios)):.3f} | {direct} |",
                  flush=True)


if __name__ == "__main__":
    main()
