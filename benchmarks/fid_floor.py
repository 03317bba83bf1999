"""The FID a perfect sampler would get at a run's n: n real images drawn with replacement from the run's
reference set, scored against that set in each feature space the run measures, one draw per seed.

FID at finite n is biased upwards, so every generator's FID sits on a floor set by n and the data. Where a
method's FID is near this floor the metric cannot tell its samples from the data's own, and differences
between methods there say little about quality. Drawing with replacement treats the reference set as the true
distribution and gives independent draws from it, as a sampler's are.

    python benchmarks/fid_floor.py configs/digits_full.toml                        # 3 seeds at the run's n
    python benchmarks/fid_floor.py configs/digits_full.toml --seeds 0 1 2 3 4 5 6 7 8 9 --samples 250
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from adadiff_bench.config import load_run_config
from adadiff_bench.data import load_dataset
from adadiff_bench.errors import UserError
from adadiff_bench.metrics.extractors import resolve_extractors
from adadiff_bench.metrics.quality import compute_quality


def floor(config_path: str, samples: int | None, seeds: list[int], cache_dir: str = "results/.cache") -> list[dict]:
    """One row per seed: {"seed", "n", and each FID column} for real images drawn with replacement."""
    config = load_run_config(config_path)
    data = load_dataset(config.data)
    n = samples or config.sampling.num_samples
    # FID alone: no precision/recall, bootstrap or SWD, whose columns would be thrown away
    metrics = dataclasses.replace(config.metrics, prc=False, fid_bootstrap=0, swd="off")
    spaces = resolve_extractors(tuple(data.images.shape[1:]), metrics, config_path)
    rows = []
    for seed in seeds:
        drawn = torch.randint(len(data.images), (n,), generator=torch.Generator().manual_seed(seed))
        quality = compute_quality(data.images[drawn], data, metrics, cache_dir, spaces)
        rows.append({"seed": seed, "n": n, **{k: quality[k] for k in fid_columns(quality)}})
    return rows


def fid_columns(row: dict) -> list[str]:
    return [key for key in row if key.startswith("fid_")]


def summary(rows: list[dict]) -> list[str]:
    """Each FID column's mean ± std over seeds and its lowest and highest seed."""
    lines = []
    for column in fid_columns(rows[0]):
        values = [row[column] for row in rows]
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        lines.append(f"{column} floor at n = {rows[0]['n']}: {statistics.mean(values):.4f}{spread} "
                     f"[{min(values):.4f}, {max(values):.4f}] over {len(values)} seed(s)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a run config (its [data], [metrics] and [sampling] num_samples are read)")
    parser.add_argument("--samples", type=int, help="images per draw (default: the config's num_samples)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one draw per seed (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    if args.samples is not None and args.samples < 2:
        parser.error(f"--samples must be at least 2 (FID needs a covariance; got {args.samples})")
    torch.set_num_threads(args.threads)
    try:
        rows = floor(args.config, args.samples, args.seeds)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not fid_columns(rows[0]):
        print("error: no feature space measures this data, so there is no FID floor to draw (see [metrics])",
              file=sys.stderr)
        return 2
    for row in rows:
        values = ", ".join(f"{column} {row[column]:.4f}" for column in fid_columns(row))
        print(f"seed {row['seed']}, n = {row['n']}: {values}", flush=True)
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
