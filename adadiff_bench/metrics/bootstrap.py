"""Bootstrap intervals: FID over resampled generated samples (one seed), and a mean over seeds.

`mean_bootstrap_interval` needs only numpy, so reports (which never import torch) can use it.
"""
from __future__ import annotations

import numpy as np

EXACT_LIMIT = 50_000  # enumerate every resample when there are at most this many (k**k for k values)


def fid_bootstrap_interval(sample_features, reference_stats: dict, resamples: int, level: float,
                           seed: int = 0) -> tuple[float, float]:
    """A basic (reverse-percentile) bootstrap interval for FID over resampled generated samples.

    The reference statistics stay fixed. FID is biased upward at finite n, and a resample (with its
    duplicates) is biased once more; the basic interval [2 F - q_hi, 2 F - q_lo] reflects the resamples'
    spread around the point estimate F and so corrects for that shift, where the plain percentile
    interval would sit above the estimate.
    """
    point, replicates = fid_bootstrap_replicates(sample_features, reference_stats, resamples, seed)
    return basic_interval(point, replicates, level)


def fid_bootstrap_replicates(sample_features, reference_stats: dict, resamples: int,
                             seed: int = 0) -> tuple[float, np.ndarray]:
    """(FID of all samples, FID of each of `resamples` resamples of them).

    Resample r draws its rows from `seed` alone, so two cells with as many samples draw the same rows: where
    sample i of both started from the same noise (every method of a run seed does), the difference of their
    replicates is a paired bootstrap of the FID difference (`paired_basic_interval`)."""
    import torch
    import torch_fidelity
    import torch_fidelity.metric_fid as fidelity_fid

    features = sample_features.numpy()
    rng = np.random.default_rng(seed)

    def fid_of(rows: np.ndarray) -> float:
        stats = fidelity_fid.fid_features_to_statistics(torch.from_numpy(features[rows]))
        return fidelity_fid.fid_statistics_to_metric(stats, reference_stats, False)[torch_fidelity.KEY_METRIC_FID]

    n = len(features)
    return fid_of(np.arange(n)), np.array([fid_of(rng.integers(0, n, n)) for _ in range(resamples)])


def basic_interval(point: float, replicates, level: float, floor: float | None = 0.0) -> tuple[float, float]:
    """The basic bootstrap interval [2 p - q_hi, 2 p - q_lo] of a point estimate p from its replicates
    (clipped below at `floor`: FID is never negative; None for a difference)."""
    q_low, q_high = np.quantile(np.asarray(replicates, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    low, high = 2 * point - float(q_high), 2 * point - float(q_low)
    return (low, high) if floor is None else (max(floor, low), max(floor, high))


def paired_basic_interval(point_a: float, replicates_a, point_b: float, replicates_b,
                          level: float) -> tuple[float, float]:
    """Basic bootstrap interval of FID(a) - FID(b) from replicates drawn on the same sample rows (NaN when the
    two sets of replicates differ in length, i.e. were not drawn alike)."""
    replicates_a, replicates_b = np.asarray(replicates_a, dtype=float), np.asarray(replicates_b, dtype=float)
    if replicates_a.shape != replicates_b.shape or not len(replicates_a):
        return np.nan, np.nan
    return basic_interval(point_a - point_b, replicates_a - replicates_b, level, floor=None)


def mean_bootstrap_interval(values, level: float = 0.95, resamples: int = 20_000,
                            seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval for the mean of a few values (e.g. one FID per seed).

    With k values there are k**k equally likely ordered resamples: when that is at most `EXACT_LIMIT`
    every one is taken (no Monte Carlo noise), otherwise `resamples` are drawn. With 3 seeds at level
    0.95 the interval is [min, max]: each extreme resample has probability 1/27 > 2.5%.
    """
    values = np.asarray(values, dtype=float)
    k = len(values)
    if k < 2:
        return np.nan, np.nan
    if k ** k <= EXACT_LIMIT:  # every ordered resample: the k-digit numbers in base k
        rows = (np.arange(k ** k)[:, None] // k ** np.arange(k)) % k
    else:
        rows = np.random.default_rng(seed).integers(0, k, (resamples, k))
    means = values[rows].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(low), float(high)
