"""Does the harness's metric pass cost more than torch-fidelity itself, or give other numbers?

The same samples and reference go through (A) the harness's `compute_quality` and (B) one direct
`torch_fidelity.calculate_metrics` call with the same settings (FID, IS, KID, precision/recall; the
reference's features cached for both, as in a run after its first cell). They alternate A B A B ...
`repeats` times; printed: the median of the pairs' time ratios A / B (goal <= 1.05) and whether every
number is identical.

    python benchmarks/metric_overhead.py                      # 1,000 shifted digits vs the digits set
    python benchmarks/metric_overhead.py --samples results/demo/cells/<cell>/samples.npz
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch_fidelity

from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import load_dataset
from adadiff_bench.metrics.extractors import DIGITS, get_extractor
from adadiff_bench.metrics.quality import compute_quality, fidelity_kwargs
from adadiff_bench.timing import iqr

# harness column (metric, suffix) -> the key of the same number in torch-fidelity's result
COLUMNS = (("fid", "", torch_fidelity.KEY_METRIC_FID),
           ("is", "_mean", torch_fidelity.KEY_METRIC_ISC_MEAN), ("is", "_std", torch_fidelity.KEY_METRIC_ISC_STD),
           ("kid", "_mean", torch_fidelity.KEY_METRIC_KID_MEAN), ("kid", "_std", torch_fidelity.KEY_METRIC_KID_STD),
           ("precision", "", torch_fidelity.KEY_METRIC_PRECISION), ("recall", "", torch_fidelity.KEY_METRIC_RECALL))


def load_samples(path: str | None, reference: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 N x C x H x W samples: a results cell's samples.npz, or digits moved one pixel."""
    if path is None:
        return reference[:count].roll(1, dims=3).contiguous()
    with np.load(path) as archive:
        return torch.from_numpy(archive["arr_0"]).permute(0, 3, 1, 2).contiguous()


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", help="a samples.npz (uint8 NHWC, key arr_0); default: shifted digits")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_dataset(DataConfig())
    samples = load_samples(args.samples, reference.images, args.num_samples)
    config = MetricsConfig(inception="off")
    with tempfile.TemporaryDirectory() as cache_dir:
        space = get_extractor(DIGITS)
        kwargs = fidelity_kwargs(DIGITS, space.weights(config, ""), samples, reference, config, cache_dir)
        harness = lambda: compute_quality(samples, reference, config, cache_dir, (DIGITS,))  # noqa: E731
        direct = lambda: torch_fidelity.calculate_metrics(**kwargs)  # noqa: E731
        harness(), direct()  # warm-up; both now read the reference's cached features
        ratios, same = [], True
        for _ in range(args.repeats):
            harness_s, ours = timed(harness)
            direct_s, theirs = timed(direct)
            ratios.append(harness_s / direct_s)
            same &= all(ours[f"{name}_{space.column}{suffix}"] == theirs[key] for name, suffix, key in COLUMNS)
    print(f"threads={args.threads} samples={len(samples)} reference={len(reference.images)} repeats={args.repeats}")
    print("| feature space | harness time / direct torch-fidelity time (median) | IQR | numbers identical |")
    print("|---|---:|---:|---|")
    print(f"| {DIGITS} | {np.median(ratios):.3f} | {iqr(ratios):.3f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
