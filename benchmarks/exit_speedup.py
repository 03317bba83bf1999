"""Do AdaDiff's exits show in wall-clock? Measured speed-up over `full` next to the ideal one from FLOPs.

For each batch size and threshold, one sampling run of `batch` samples is timed for `adadiff` and for
`full` back to back, `repeats` times (A B A B ...). The measured speed-up is the median over the
repeats of the pair's ratio full / adadiff, so a drift of the shared machine that slows a whole pair
cancels out; the spread column is the interquartile range of those ratios. The ideal speed-up is the
ratio of MACs the step log says were executed. measured / ideal near 1 means the skipped blocks
really were not run.

Threshold 0 is a calibration row: nothing exits before the last block, so its measured speed-up
below 1 is the price of deciding (an estimator call and a mask at every exit point).

    python benchmarks/exit_speedup.py --checkpoint checkpoints/adadiff_digits_finetuned.pt
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from adadiff_bench.checkpoints import load_model
from adadiff_bench.device import module_device, resolve_device
from adadiff_bench.flops import unit_costs
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.timing import iqr, time_once


def paired_speedups(cell: Cell, reference: Cell, model, batch: int, repeats: int, precision: str = "fp32") -> np.ndarray:
    """reference time / cell time for each of `repeats` back-to-back pairs (after one warm-up of each)."""
    methods = {c: build_method(c, model) for c in (cell, reference)}
    device = module_device(model)

    def run(c: Cell):
        return lambda: generate(c, model, batch, batch, method=methods[c], precision=precision)

    run(cell)(), run(reference)()
    return np.array([time_once(run(reference), batch, device) / time_once(run(cell), batch, device)
                     for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/adadiff_digits_finetuned.pt")
    parser.add_argument("--base", default="checkpoints/uvit_digits.pt")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.035, 0.045, 0.08],
                        help="the defaults give the shipped fine-tuned checkpoint layer ratios of about 0.79, 0.70 "
                             "and 0.57 at batch 64 (0 is the calibration row)")
    parser.add_argument("--solver", default="dpm-solver++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (CUDA events time it there)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.base).to(resolve_device(args.device, "--device"))
    costs = unit_costs(model)
    full = Cell("full", (), args.solver, args.steps, 0)
    print(f"device={args.device} precision={args.precision} threads={args.threads} solver={args.solver} "
          f"steps={args.steps} repeats={args.repeats} checkpoint={args.checkpoint}")
    print("| batch | threshold | layer ratio | ideal speed-up | measured speed-up (IQR) | measured / ideal |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        _, full_log = generate(full, model, batch, batch)
        for threshold in args.thresholds:
            cell = Cell("adadiff", (("checkpoint", args.checkpoint), ("threshold", threshold)), args.solver, args.steps, 0)
            _, log = generate(cell, model, batch, batch, precision=args.precision)
            ideal = full_log.macs_per_image(costs) / log.macs_per_image(costs)
            ratios = paired_speedups(cell, full, model, batch, args.repeats, args.precision)
            measured = float(np.median(ratios))
            print(f"| {batch} | {threshold:g} | {log.layer_ratio():.3f} | {ideal:.2f} | {measured:.2f} "
                  f"({iqr(list(ratios)):.2f}) | {measured / ideal:.2f} |", flush=True)


if __name__ == "__main__":
    main()
