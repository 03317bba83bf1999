"""The clean-fid backend against torch-fidelity, an independent scipy FID, and clean-fid's own pipeline.

clean-fid's real Inception file cannot be downloaded here, so a random TorchScript stand-in with the same
interface is saved under the same name; clean-fid's public `compute_fid` then reads PNG folders with it.
Every download entry point of clean-fid is made to raise.
"""
from __future__ import annotations

import platform
import re
import urllib.request
from pathlib import Path

import cleanfid.downloads_helper
import cleanfid.features
import cleanfid.fid
import cleanfid.inception_torchscript
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from adadiff_bench.config import DataConfig
from adadiff_bench.data import load_dataset
from adadiff_bench.errors import UserError
from adadiff_bench.metrics import cleanfid_backend
from adadiff_bench.metrics.classifier import load_classifier
from adadiff_bench.metrics.cleanfid_backend import (CLEANFID_MODEL_FILE, cleanfid_default_model_dir,
                                                    cleanfid_frechet_distance, cleanfid_inception_features,
                                                    resolve_cleanfid_model)

RTOL = 1e-4


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Every way clean-fid could fetch a file raises instead."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"clean-fid tried to download ({args}, {kwargs})")
    for module in (cleanfid.downloads_helper, cleanfid.inception_torchscript):
        monkeypatch.setattr(module, "check_download_inception", refuse)
    for module in (cleanfid.downloads_helper, cleanfid.features):
        monkeypatch.setattr(module, "check_download_url", refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "download_google_drive", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset(DataConfig()).images


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def scipy_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Textbook FID in float64: unbiased covariances, Tr sqrtm(S_a S_b) by scipy."""
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    sigma_a = centred_a.T @ centred_a / (len(a) - 1)
    sigma_b = centred_b.T @ centred_b / (len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def eigh_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two Gaussians with PSD covariances by symmetric eigensolvers (5x faster than sqrtm)."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    # S1 S2 is similar to S1^1/2 S2 S1^1/2 (symmetric PSD), so Tr sqrt(S1 S2) = sum of sqrt of its eigenvalues
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@pytest.mark.parametrize("shift", [0, 1])
def test_frechet_distance_matches_torch_fidelity_and_scipy(digits, shift):
    """Same digits-cnn features: clean-fid's FID = torch-fidelity's = scipy's (halves of the data, one rolled)."""
    model, _ = load_classifier()
    with torch.no_grad():
        features_a = model.features(digits[0::2])
        features_b = model.features(torch.roll(digits[1::2], shift, dims=3))
    ours = cleanfid_frechet_distance(features_a.numpy(), features_b.numpy())
    fidelity = fid_statistics_to_metric(fid_features_to_statistics(features_a),
                                        fid_features_to_statistics(features_b), False)[KEY_METRIC_FID]
    independent = scipy_fid(features_a.numpy(), features_b.numpy())
    print(f"shift {shift}: clean-fid {ours:.6f}, torch-fidelity {fidelity:.6f} "
          f"(rel {relative_difference(ours, fidelity):.2e}), scipy {independent:.6f} "
          f"(rel {relative_difference(ours, independent):.2e})")
    assert ours > 0
    assert relative_difference(ours, fidelity) < RTOL
    assert relative_difference(ours, independent) < RTOL
    stats = [cleanfid_backend.cleanfid_statistics(f.numpy()) for f in (features_a, features_b)]
    assert relative_difference(eigh_frechet_distance(*stats[0], *stats[1]), independent) < RTOL


class StandInInception(nn.Module):
    """Random network with the interface of clean-fid's TorchScript Inception (`layers`: N x 3 x 299 x 299 ->
    N x 2048 x 1 x 1 on inputs in [-1, 1]; `forward` resizes and normalises [0, 255] images itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=3), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 2048, 1))
        self.logits = nn.Linear(2048, 10)  # stands for Inception's 1008 logits
        for module in self.layers:
            if isinstance(module, nn.Conv2d):  # variance-preserving, so that the features do not collapse
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).flatten(1)
        return features if return_features else self.logits(features)


def save_stand_in(folder: Path) -> Path:
    """Script a seeded stand-in and save it under clean-fid's file name; return the folder."""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    torch.jit.script(StandInInception().eval()).save(str(folder / CLEANFID_MODEL_FILE))
    return folder


def write_png_folder(images: torch.Tensor, folder: Path) -> str:
    """uint8 N x 1 x H x W images as grayscale PNGs named in order (clean-fid reads a folder in sorted order)."""
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{index:04d}.png")
    return str(folder)


def test_features_and_fid_match_cleanfid_compute_fid(digits, tmp_path, monkeypatch):
    """Our in-memory pipeline = clean-fid's `compute_fid` on PNG folders of the same 8x8 digits (clean mode)."""
    model_dir = save_stand_in(tmp_path / "model")
    images_a, images_b = digits[:24], torch.roll(digits[24:48], 1, dims=3)
    folder_a, folder_b = write_png_folder(images_a, tmp_path / "a"), write_png_folder(images_b, tmp_path / "b")
    # Record what clean-fid computes; the 2048-d Frechet distance uses eigh (scipy's sqrtm takes ~20 s per call on
    # one core; test_frechet_distance_matches_torch_fidelity_and_scipy checks the real one) in both pipelines.
    folder_features, statistics = [], []
    real_folder_features = cleanfid.fid.get_folder_features

    def record_features(*args, **kwargs):
        folder_features.append(real_folder_features(*args, **kwargs))
        return folder_features[-1]

    def record_frechet(mu1, sigma1, mu2, sigma2):
        statistics.append((mu1, sigma1, mu2, sigma2))
        return eigh_frechet_distance(mu1, sigma1, mu2, sigma2)

    monkeypatch.setattr(cleanfid.fid, "get_folder_features", record_features)
    monkeypatch.setattr(cleanfid.fid, "frechet_distance", record_frechet)
    extractor = cleanfid.inception_torchscript.InceptionV3W(str(model_dir), download=False).eval()
    reference = cleanfid.fid.compute_fid(folder_a, folder_b, mode="clean", device=torch.device("cpu"),
                                         num_workers=0, custom_feat_extractor=extractor, verbose=False)
    features = [cleanfid_inception_features(images, model_dir, batch_size=16) for images in (images_a, images_b)]
    ours = cleanfid_frechet_distance(*features)
    feature_error = max(np.abs(f - g).max() for f, g in zip(features, folder_features))
    print(f"features max |diff| {feature_error:.2e} (scale {np.abs(features[0]).max():.2e}); FID ours {ours:.6f}, "
          f"compute_fid {reference:.6f}, rel {relative_difference(ours, reference):.2e}")
    assert all(f.shape == (24, 2048) and f.std(axis=0).min() > 1e-4 for f in features)
    for ours_features, clean_features in zip(features, folder_features):
        np.testing.assert_allclose(ours_features, clean_features, rtol=1e-5, atol=1e-5)
    for ours_stat, clean_stat in zip(statistics[1], statistics[0]):
        np.testing.assert_allclose(ours_stat, clean_stat, rtol=1e-5, atol=1e-6)
    assert reference > 0 and relative_difference(ours, reference) < RTOL


def test_default_model_dir_is_where_cleanfid_looks(monkeypatch):
    """clean-fid's own feature_extractor asks InceptionV3W for the folder we report."""
    asked = []

    def capture(path, download=True, resize_inside=False):
        asked.append(Path(path))
        raise RuntimeError("captured")

    monkeypatch.setattr(cleanfid.features, "InceptionV3W", capture)
    with pytest.raises(RuntimeError, match="captured"):
        cleanfid.features.feature_extractor(device=torch.device("cpu"), use_dataparallel=False)
    assert asked == [cleanfid_default_model_dir()]
    assert cleanfid_default_model_dir() == (Path("./") if platform.system() == "Windows" else Path("/tmp"))


def test_resolve_cleanfid_model(tmp_path, monkeypatch):
    """Configured file -> its folder; folder -> itself; missing -> one-line UserError; else default or None."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / CLEANFID_MODEL_FILE).write_bytes(b"stand-in")
    assert resolve_cleanfid_model(str(folder / CLEANFID_MODEL_FILE)) == folder
    assert resolve_cleanfid_model(str(folder)) == folder
    for absent in (tmp_path / "missing.pt", tmp_path):  # no such path; a folder without the file
        with pytest.raises(UserError, match=re.escape(str(absent))) as error:
            resolve_cleanfid_model(str(absent))
        assert "\n" not in str(error.value) and "cleanfid_model" in str(error.value)
    (tmp_path / "renamed.pt").write_bytes(b"stand-in")
    with pytest.raises(UserError, match=CLEANFID_MODEL_FILE):
        resolve_cleanfid_model(str(tmp_path / "renamed.pt"))
    default = tmp_path / "default"
    default.mkdir()
    monkeypatch.setattr(cleanfid_backend, "cleanfid_default_model_dir", lambda: default)
    assert resolve_cleanfid_model(None) is None
    (default / CLEANFID_MODEL_FILE).write_bytes(b"stand-in")
    assert resolve_cleanfid_model(None) == default
    assert resolve_cleanfid_model(str(folder)) == folder  # the configured path wins over the default


def test_harness_fid_in_the_inception_space_uses_cleanfid_features_and_caches_the_reference(digits, tmp_path,
                                                                                            monkeypatch):
    from adadiff_bench.config import MetricsConfig
    from adadiff_bench.data import Dataset
    from adadiff_bench.metrics import extractors, quality

    model_dir = save_stand_in(tmp_path / "model")
    extracted = []

    def counting_features(images, folder):
        extracted.append(len(images))
        return cleanfid_inception_features(images, folder)

    def mean_distance(a, b):  # a cheap stand-in for the 2048-d Frechet distance (~20 s on one core)
        return float(np.abs(a.mean(axis=0) - b.mean(axis=0)).sum())

    monkeypatch.setattr(extractors, "cleanfid_inception_features", counting_features)
    monkeypatch.setattr(extractors, "cleanfid_frechet_distance", mean_distance)
    config = MetricsConfig(fid_backend="clean-fid", cleanfid_model=str(model_dir / CLEANFID_MODEL_FILE))
    samples, reference = torch.roll(digits[:8], 1, dims=3), Dataset("digits", digits[8:24], None, "0" * 64)
    space = quality.FeatureSpace(extractors.get_extractor(extractors.INCEPTION), samples, reference, config,
                                 tmp_path / "cache", {"input2_cache_name": "key"}, None)
    first, again = space.cleanfid_fid(), space.cleanfid_fid()
    assert extracted == [16, 8, 8]  # the reference's features came from the cache the second time
    expected = mean_distance(cleanfid_inception_features(samples, model_dir),
                             cleanfid_inception_features(reference.images, model_dir))
    assert first == again == pytest.approx(expected, rel=1e-6) and first > 0
