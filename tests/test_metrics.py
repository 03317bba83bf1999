"""Quality metrics: the shipped digits classifier, FID/IS/KID against independent numpy, caching, Inception modes."""
from __future__ import annotations

import hashlib
import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
import torch.hub
import torch.nn as nn
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import Dataset, load_dataset
from adadiff_bench.errors import UserError
from adadiff_bench.metrics import classifier
from adadiff_bench.metrics.extractors import INCEPTION_WEIGHTS_FILE, resolve_inception_weights
from adadiff_bench.metrics.quality import compute_quality

FAST = MetricsConfig(inception="off", kid_subset_size=100, isc_splits=10)
DIGITS_KEYS = {"fid_digits_cnn", "is_digits_cnn_mean", "is_digits_cnn_std", "kid_digits_cnn_mean", "kid_digits_cnn_std",
               "precision_digits_cnn", "recall_digits_cnn"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one CPU thread, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """The full digits data set."""
    return load_dataset(DataConfig())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A reference-statistics cache shared by the tests of this module."""
    return tmp_path_factory.mktemp("fidelity_cache")


@pytest.fixture(scope="module")
def shifted(digits) -> torch.Tensor:
    """Every digit moved one pixel to the right (wrapping around)."""
    return digits.images.roll(1, dims=3)


@pytest.fixture(scope="module")
def self_quality(digits, cache_dir) -> dict[str, float]:
    """Metrics of the digits against themselves."""
    return compute_quality(digits.images, digits, FAST, cache_dir)


@pytest.fixture(scope="module")
def shifted_quality(digits, shifted, cache_dir) -> dict[str, float]:
    """Metrics of the shifted digits against the digits."""
    return compute_quality(shifted, digits, FAST, cache_dir)


def subset(data: Dataset, indices) -> Dataset:
    """A data set of some of `data`'s images, with its own sha256."""
    images = data.images[indices]
    return Dataset(data.name, images, data.labels[indices], hashlib.sha256(images.numpy().tobytes()).hexdigest())


@torch.no_grad()
def classifier_outputs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of the shipped classifier, computed directly (not through torch-fidelity)."""
    model, _ = classifier.load_classifier()
    return model.features(images).double().numpy(), model(images).double().numpy()


def numpy_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))


def numpy_inception_score(logits: np.ndarray, splits: int, seed: int = 2020) -> tuple[float, float]:
    """IS as torch-fidelity splits it: shuffle with RandomState(seed), chunk i covers [i N / s, (i + 1) N / s)."""
    n = len(logits)
    logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(np.exp(chunk).mean(axis=0))
        scores.append(math.exp((np.exp(chunk) * (chunk - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---- the classifier --------------------------------------------------------------------------

def test_shipped_classifier_is_small_and_accurate_on_heldout_split(digits):
    model, meta = classifier.load_classifier()
    _, heldout = classifier.heldout_split(digits.labels)
    accuracy = classifier.accuracy(model, digits.images[heldout], digits.labels[heldout])
    assert accuracy >= 0.97
    assert meta["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert meta["feature_dim"] == 64
    assert classifier.ASSET_PATH.stat().st_size < 1_000_000


def test_registration_is_idempotent():
    classifier.register_digits_extractor()
    spec = importlib.util.spec_from_file_location("adadiff_bench.metrics._classifier_again", classifier.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # runs the registration a second time
    assert FEATURE_EXTRACTORS_REGISTRY[classifier.EXTRACTOR_NAME] is classifier.DigitsCNNExtractor


def test_extractor_reads_rgb_as_the_channel_mean(digits):
    extractor = classifier.DigitsCNNExtractor(classifier.EXTRACTOR_NAME, ["features", "logits_unbiased"])
    gray = digits.images[:8]
    rgb = gray.expand(-1, 3, -1, -1).contiguous()
    for from_gray, from_rgb in zip(extractor(gray), extractor(rgb)):
        assert from_gray.shape[0] == 8
        torch.testing.assert_close(from_gray, from_rgb)


# ---- FID, IS, KID in the digits feature space ------------------------------------------------

def test_quality_returns_the_digits_columns(self_quality):
    assert set(self_quality) == DIGITS_KEYS
    assert all(math.isfinite(value) for value in self_quality.values())


def test_fid_is_zero_against_itself_and_positive_for_shifted_digits(self_quality, shifted_quality):
    assert abs(self_quality["fid_digits_cnn"]) < 1e-3
    assert shifted_quality["fid_digits_cnn"] > 0.05


def test_fid_matches_scipy_sqrtm(digits, shifted, shifted_quality):
    features_shifted, _ = classifier_outputs(shifted)
    features_real, _ = classifier_outputs(digits.images)
    expected = numpy_fid(features_shifted, features_real)
    assert shifted_quality["fid_digits_cnn"] == pytest.approx(expected, rel=1e-4)


def test_inception_score_of_real_digits_matches_numpy(digits, self_quality):
    _, logits = classifier_outputs(digits.images)
    mean, std = numpy_inception_score(logits, FAST.isc_splits)
    assert 1 < self_quality["is_digits_cnn_mean"] < 10
    assert self_quality["is_digits_cnn_mean"] == pytest.approx(mean, rel=1e-5)
    assert self_quality["is_digits_cnn_std"] == pytest.approx(std, rel=1e-3, abs=1e-6)


def test_kid_subset_size_is_clamped_to_the_sample_count(digits, cache_dir):
    config = MetricsConfig(inception="off", kid_subset_size=1000)
    with pytest.warns(UserWarning, match="kid_subset_size 1000 exceeds the 50 images"):
        quality = compute_quality(digits.images[:50], digits, config, cache_dir)
    assert math.isfinite(quality["kid_digits_cnn_mean"])


def test_reference_features_are_cached_and_keyed_by_reference(digits, tmp_path, monkeypatch):
    counted = []
    extractor_class = FEATURE_EXTRACTORS_REGISTRY[classifier.EXTRACTOR_NAME]
    original_forward = extractor_class.forward

    def counting_forward(self, images):
        counted.append(len(images))
        return original_forward(self, images)

    monkeypatch.setattr(extractor_class, "forward", counting_forward)
    samples, first, second = digits.images[:40], subset(digits, slice(0, 200)), subset(digits, slice(200, 400))
    config = MetricsConfig(inception="off", kid_subset_size=40)

    compute_quality(samples, first, config, tmp_path)
    cached = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    assert cached and sum(counted) == 240
    counted.clear()
    again = compute_quality(samples, first, config, tmp_path)
    assert sum(counted) == 40  # only the samples: the reference came from the cache
    assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == cached
    assert math.isfinite(again["fid_digits_cnn"])

    compute_quality(samples, second, config, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 * len(cached)


def test_unknown_feature_space_is_a_user_error(digits, cache_dir):
    with pytest.raises(UserError, match="unknown feature extractor 'inceptoin'"):
        compute_quality(digits.images[:10], digits, FAST, cache_dir, extractors=("inceptoin",))


# ---- Inception --------------------------------------------------------------------------------

def variance_preserving_init(network: nn.Module) -> None:
    """Kaiming (fan-in) convs, identity batch norms, 1/sqrt(fan-in) linear layers: activations keep their scale."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
            nn.init.zeros_(module.bias)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> str:
    """A random but non-degenerate Inception-V3 state dict in torch-fidelity's layout, saved to a file."""
    with pytest.MonkeyPatch.context() as patch:  # build the network without downloading or loading weights
        patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None)
        network = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    variance_preserving_init(network)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(network.state_dict(), path)
    return str(path)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty folder, with no torch.hub.set_dir override in force."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home"


def test_inception_metrics_with_local_weights(digits, random_inception_weights, tmp_path, monkeypatch):
    # Speed only: resize to Inception's smallest valid input, 75x75, instead of 299x299 (16x fewer pixels).
    monkeypatch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    config = MetricsConfig(inception="require", inception_weights=random_inception_weights,
                           kid_subset_size=16, isc_splits=4)
    samples, reference = digits.images[100:116].roll(1, dims=3), subset(digits, slice(0, 32))
    quality = compute_quality(samples, reference, config, tmp_path, extractors=("digits-cnn", "inception"))

    assert DIGITS_KEYS | {"fid_inception", "is_inception_mean", "is_inception_std",
                          "kid_inception_mean", "kid_inception_std", "precision_inception", "recall_inception"} == set(quality)
    assert math.isfinite(quality["fid_inception"]) and quality["fid_inception"] > 0
    (cached_features,) = tmp_path.glob("*inception-v3-compat-features-2048.npz")
    with np.load(cached_features, allow_pickle=False) as archive:
        reference_features = torch.from_numpy(archive["features"])
    assert reference_features.shape == (32, 2048)
    assert reference_features.std(dim=0).mean() > 1e-4  # the random network still tells images apart


def test_inception_require_with_missing_file_is_a_user_error(digits, tmp_path):
    config = MetricsConfig(inception="require", inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="missing.pth"):
        compute_quality(digits.images[:10], digits, config, tmp_path, extractors=("digits-cnn", "inception"))


def test_inception_require_without_weights_is_a_user_error(digits, tmp_path, empty_torch_home):
    with pytest.raises(UserError, match="--inception-weights PATH"):
        compute_quality(digits.images[:10], digits, MetricsConfig(inception="require"), tmp_path,
                        extractors=("digits-cnn", "inception"))
    assert not list(tmp_path.glob("*.pt"))  # failed before computing anything


def test_inception_auto_without_weights_skips_with_one_stderr_line(digits, cache_dir, empty_torch_home, capsys):
    config = MetricsConfig(inception="auto", kid_subset_size=50)
    quality = compute_quality(digits.images[:50], digits, config, cache_dir, extractors=("digits-cnn", "inception"))
    assert set(quality) == DIGITS_KEYS
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "Inception metrics skipped" in lines[0] and "--inception-weights PATH" in lines[0]


def test_inception_off_skips_silently(digits, cache_dir, capsys):
    config = MetricsConfig(inception="off", kid_subset_size=50)
    quality = compute_quality(digits.images[:50], digits, config, cache_dir, extractors=("digits-cnn", "inception"))
    assert set(quality) == DIGITS_KEYS
    assert capsys.readouterr().err == ""


def test_resolve_inception_weights_prefers_config_then_torch_hub_cache(tmp_path, empty_torch_home):
    assert resolve_inception_weights(MetricsConfig()) is None
    cached = empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.touch()
    assert resolve_inception_weights(MetricsConfig()) == str(cached)
    explicit = tmp_path / "mine.pth"
    explicit.touch()
    assert resolve_inception_weights(MetricsConfig(inception_weights=str(explicit))) == str(explicit)
