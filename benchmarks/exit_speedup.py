"""Do AdaDiff's exits show in wall-clock? Measured speed-up over `full` next to the ideal one from FLOPs.

For each batch size and threshold, one sampling run of `batch` samples is timed for `adadiff` and for
`full`, interleaved (A B A B ...), median of the repeats; the ideal speed-up is the ratio of MACs the
step log says were executed. measured / ideal near 1 means the skipped blocks really were not run.

    python benchmarks/exit_speedup.py --checkpoint checkpoints/adadiff_digits_frozen.pt
"""
from __future__ import annotations

import argparse

import torch

from adadiff_bench.checkpoints import load_model
from adadiff_bench.flops import unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.timing import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/adadiff_digits_frozen.pt")
    parser.add_argument("--base", default="checkpoints/uvit_digits.pt")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--solver", default="dpm-solver++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.base)
    costs = unit_costs(model)
    full = Cell("full", (), args.solver, args.steps, 0)
    print(f"threads={args.threads} solver={args.solver} steps={args.steps} repeats={args.repeats}")
    print("| batch | threshold | layer ratio | ideal speed-up | measured speed-up | measured / ideal |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        _, full_log = generate(full, model, batch, batch)
        for threshold in args.thresholds:
            cell = Cell("adadiff", (("checkpoint", args.checkpoint), ("threshold", threshold)), args.solver, args.steps, 0)
            _, log = generate(cell, model, batch, batch)
            ideal = full_log.macs_per_image(costs) / log.macs_per_image(costs)
            timing = measure(lambda: generate(cell, model, batch, batch), lambda: generate(full, model, batch, batch),
                             batch, args.repeats, warmup=lambda: generate(cell, model, batch, batch))
            print(f"| {batch} | {threshold:g} | {log.layer_ratio():.3f} | {ideal:.2f} | {timing.speedup:.2f} | "
                  f"{timing.speedup / ideal:.2f} |", flush=True)


if __name__ == "__main__":
    main()
