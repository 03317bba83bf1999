"""The shipped digits checkpoints: they load strictly, and their samples look like digits to the classifier."""
from __future__ import annotations

import torch

from adadiff_bench.methods.adadiff import load_adadiff
from adadiff_bench.checkpoints import load_model
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import load_dataset, to_uint8
from adadiff_bench.harness import Cell, generate
from adadiff_bench.metrics.quality import compute_quality
from conftest import REPO

BASE = REPO / "checkpoints" / "uvit_digits.pt"
DIT = REPO / "checkpoints" / "dit_digits.pt"
ADADIFF_DIT = REPO / "checkpoints" / "adadiff_digits_dit.pt"


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


def test_digits_dit_is_the_documented_dit_and_fits_in_8_mb():
    model = load_model(DIT)
    assert type(model).__name__ == "DiT" and model.num_blocks == 12 and model.embed_dim == 120
    assert model.null_label == 10 and not model.learned_sigma
    assert DIT.stat().st_size < 8 * 2 ** 20


def test_digits_dit_samples_are_the_digits_they_were_asked_for(tmp_path):
    images, _ = generate(Cell("full", (), "dpm-solver++", 10, 0), load_model(DIT), 200, 200)
    assert_digits_as_asked(images, 0, tmp_path, agreement=0.8)


def test_adadiff_dit_exits_skip_blocks_and_its_samples_stay_the_asked_digits(tmp_path):
    # the shipped AdaDiff DiT (issue 18) at a mid threshold: samples leave early (10 steps, seed 0: layer ratio 0.71
    # when written), and what they become is still mostly the digit asked for
    model = load_model(ADADIFF_DIT)
    assert type(model).__name__ == "DiT" and type(load_adadiff(ADADIFF_DIT)).__name__ == "AdaDiffNetwork"
    knobs = (("checkpoint", str(ADADIFF_DIT)), ("threshold", 0.06))
    images, log = generate(Cell("adadiff", knobs, "dpm-solver++", 10, 0), model, 200, 200)
    assert 0.5 < log.layer_ratio() < 0.9
    assert_digits_as_asked(images, 0, tmp_path, agreement=0.7)
    assert ADADIFF_DIT.stat().st_size < 8 * 2 ** 20


def assert_digits_as_asked(images: torch.Tensor, seed: int, tmp_path, agreement: float):
    """A class-conditional DiT's samples look like digits (FID [digits_cnn] under 0.35 of uniform noise's) and,
    for more than `agreement` of them, are the digit the sampler drew as their label."""
    from adadiff_bench.diffusion import initial_noise, sample_generators, sample_labels
    from adadiff_bench.metrics.classifier import load_classifier
    generators = sample_generators(seed, range(len(images)))  # the labels the sampler drew: after each sample's noise
    initial_noise(generators, (1, 8, 8))
    asked = sample_labels(generators, 10)
    samples = to_uint8(images)
    real = load_dataset(DataConfig())
    noise = to_uint8(torch.rand(len(images), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    settings = MetricsConfig(kid_subset_size=100, isc_splits=2)
    quality = compute_quality(samples, real, settings, tmp_path)
    assert quality["fid_digits_cnn"] < 0.35 * compute_quality(noise, real, settings, tmp_path)["fid_digits_cnn"]
    classifier, _ = load_classifier()
    with torch.no_grad():
        picked = classifier(samples).argmax(-1)
    assert (picked == asked).float().mean() > agreement


# every shipped checkpoint, the format it is, and the type its format loads it as
SHIPPED_FORMATS = {
    "uvit_digits.pt": ("adadiff-bench/uvit", "UViT"),
    "dit_digits.pt": ("adadiff-bench/dit", "DiT"),
    "duodiff_shallow_digits.pt": ("adadiff-bench/uvit", "UViT"),
    "duodiff_shallow_digits_dit.pt": ("adadiff-bench/dit", "DiT"),
    "ase_digits.pt": ("adadiff-bench/uvit", "UViT"),
    "adadiff_digits_frozen.pt": ("adadiff-bench/adadiff", "AdaDiffNetwork"),
    "adadiff_digits_finetuned.pt": ("adadiff-bench/adadiff", "AdaDiffNetwork"),
    "berxit_digits.pt": ("adadiff-bench/berxit", "BerxitCheckpoint"),
    "l2c_digits.pt": ("adadiff-bench/l2c-router", "RouterCheckpoint"),
    "adadiff_digits_dit.pt": ("adadiff-bench/adadiff", "AdaDiffNetwork"),
    "berxit_digits_dit.pt": ("adadiff-bench/berxit", "BerxitCheckpoint"),
    "ase_digits_dit.pt": ("adadiff-bench/dit", "DiT"),
    "l2c_digits_dit.pt": ("adadiff-bench/l2c-router", "RouterCheckpoint"),
}


def test_every_shipped_checkpoint_opens_as_its_format():
    from adadiff_bench.checkpoints import load_checkpoint, open_checkpoint
    from adadiff_bench.methods import available_methods, get_method
    assert sorted(p.name for p in (REPO / "checkpoints").glob("*.pt")) == sorted(SHIPPED_FORMATS)
    readers = {fmt for name in available_methods() for fmt in get_method(name).reads}
    for name, (format_name, type_name) in SHIPPED_FORMATS.items():
        fmt, payload = open_checkpoint(REPO / "checkpoints" / name)
        assert fmt.name == payload["format"] == format_name, name
        assert type(load_checkpoint(REPO / "checkpoints" / name, format_name)).__name__ == type_name
        assert format_name in readers  # some method reads it


def test_each_shipped_training_config_exports_the_format_its_method_writes():
    from adadiff_bench.checkpoints import DIT_FORMAT, FORMAT, checkpoint_format
    from adadiff_bench.methods import get_method
    from adadiff_bench.training import load_train_config
    exported = 0
    for path in sorted((REPO / "configs").glob("*.toml")):
        if "[train]" not in path.read_text() or "[[methods]]" in path.read_text():
            continue
        config = load_train_config(path)
        if not config.train.export:
            continue
        writes = (DIT_FORMAT if config.dit else FORMAT) if config.task is None else get_method(config.task).writes
        assert checkpoint_format(REPO / config.train.export).name in (writes if isinstance(writes, tuple) else (writes,)), \
            path.name
        exported += 1
    assert exported == 13
