"""The shipped digits checkpoints: they load strictly, and their samples look like digits to the classifier."""
from __future__ import annotations

import torch

from adadiff_bench.adadiff_checkpoints import load_adadiff
from adadiff_bench.checkpoints import load_model
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import load_dataset, to_uint8
from adadiff_bench.harness import Cell, generate
from adadiff_bench.metrics.quality import compute_quality
from conftest import REPO

BASE = REPO / "checkpoints" / "uvit_digits.pt"


def test_base_model_is_the_documented_u_vit_and_fits_in_8_mb():
    model = load_model(BASE)
    assert model.num_blocks == 13 and model.embed_dim == 128 and model.patch_size == 2
    assert BASE.stat().st_size < 8 * 2 ** 20


def test_base_model_samples_look_like_digits(tmp_path):
    model = load_model(BASE)
    images, _ = generate(Cell("full", (), "dpm-solver++", 10, 0), model, 200, 200)
    samples = to_uint8(images)
    real = load_dataset(DataConfig())
    noise = to_uint8(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    settings = MetricsConfig(kid_subset_size=100, isc_splits=2)
    quality = compute_quality(samples, real, settings, tmp_path)
    noise_quality = compute_quality(noise, real, settings, tmp_path)
    assert quality["fid_digits_cnn"] < 0.35 * noise_quality["fid_digits_cnn"]
    assert quality["is_digits_cnn_mean"] > 5 > noise_quality["is_digits_cnn_mean"]
    # the classes are all there: every digit is the classifier's pick for at least 3% of the samples
    from adadiff_bench.metrics.classifier import load_classifier
    classifier, _ = load_classifier()
    with torch.no_grad():
        shares = torch.bincount(classifier(samples).argmax(-1), minlength=10).float() / len(samples)
    assert shares.min() > 0.03
