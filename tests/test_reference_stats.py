"""Published FID statistics: FID against them equals the closed form on Gaussians (float64 published, float32
sample means), bad files are one line, and the Inception space reads them instead of reference images."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics

from adadiff_bench.config import MetricsConfig, load_run_config
from adadiff_bench.errors import UserError
from adadiff_bench.metrics.extractors import get_extractor
from adadiff_bench.metrics.quality import FeatureSpace
from adadiff_bench.metrics.reference_stats import fid_to_reference, load_reference_stats, published_as_reference


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 with scipy's matrix square root."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))


def test_diagonal_gaussians_against_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    own = {"mu": m1.astype(np.float32), "sigma": np.diag(a)}         # the suite's dtypes: float32 mean
    published = {"mu": m2, "sigma": np.diag(b)}                       # float64, as published
    expected = float(((m1.astype(np.float32).astype(np.float64) - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert fid_to_reference(own, published) == pytest.approx(expected, rel=1e-5)


def test_sampled_gaussian_features_against_published_statistics():
    rng = np.random.default_rng(1)
    dim = 16
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    features = torch.from_numpy((rng.normal(size=(4000, dim)) @ mixing + 0.3).astype(np.float32))
    own = fid_features_to_statistics(features)                         # torch-fidelity's own statistics
    assert own["mu"].dtype == np.float32 and own["sigma"].dtype == np.float64
    other = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    published = {"mu": rng.normal(size=dim), "sigma": other @ other.T + 0.1 * np.eye(dim)}
    expected = frechet_distance(own["mu"], own["sigma"], published["mu"], published["sigma"])
    assert fid_to_reference(own, published) == pytest.approx(expected, rel=1e-4)
    # the samples' population statistics are close: the FID to them is small next to the other's
    population = {"mu": np.full(dim, 0.3), "sigma": mixing.T @ mixing}
    assert fid_to_reference(own, population) < 0.05 * expected


def write_stats(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("arrays, message", [
    ({"mu": np.zeros(4), "sigma": np.eye(4)}, r"mu \(4,\) and sigma \(4, 4\).*\(8,\) and \(8, 8\)"),
    ({"mu": np.zeros(8)}, "needs arrays mu and sigma"),
    ({"mu": np.zeros(8), "sigma": np.full((8, 8), np.nan)}, "NaN or Inf"),
    ({"mu": np.array(["a"] * 8), "sigma": np.eye(8)}, "expected floats"),
])
def test_bad_statistics_are_one_line(tmp_path, arrays, message):
    path = write_stats(tmp_path / "stats.npz", **arrays)
    with pytest.raises(UserError, match=message) as error:
        load_reference_stats(path, dim=8)
    assert len(str(error.value).splitlines()) == 1 and "stats.npz" in str(error.value)


def test_a_pickled_array_is_refused_without_unpickling(tmp_path):
    path = write_stats(tmp_path / "stats.npz", mu=np.array([object()] * 8, dtype=object), sigma=np.eye(8))
    with pytest.raises(UserError, match="not a readable .npz"):
        load_reference_stats(path, dim=8)


def test_the_inception_space_reads_published_statistics_not_reference_features(tmp_path):
    rng = np.random.default_rng(2)
    path = write_stats(tmp_path / "fid_stats.npz", mu=rng.normal(size=2048), sigma=np.eye(2048))
    config = MetricsConfig(inception="require", reference_stats=path)
    space = FeatureSpace(get_extractor("inception"), torch.zeros(0), None, config, tmp_path, {}, features=None)
    statistics = space.reference_statistics()  # features=None: reading reference features would fail
    assert statistics["mu"].dtype == np.float32 and statistics["sigma"].dtype == np.float64
    assert np.allclose(statistics["mu"], load_reference_stats(path)["mu"], atol=1e-6)
    assert published_as_reference(path)["sigma"].shape == (2048, 2048)


@pytest.mark.parametrize("metrics", ['inception = "off"', 'inception = "require"\nfid_backend = "clean-fid"'])
def test_reference_stats_need_torch_fidelity_in_the_inception_space(tmp_path, metrics):
    config = tmp_path / "run.toml"
    config.write_text(f'[metrics]\n{metrics}\nreference_stats = "fid_stats.npz"\n')
    with pytest.raises(UserError, match="reference_stats are Inception statistics"):
        load_run_config(config)
