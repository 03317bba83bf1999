"""Metric and feature-extractor registries: built-in keys, one-registration plugins, shapes, roles, resolution."""
from __future__ import annotations

import hashlib
import re
import types

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.hub
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from adadiff_bench import plugins
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import Dataset, load_dataset
from adadiff_bench.errors import UserError
from adadiff_bench.metrics import cleanfid_backend, extractors, quality, specs
from adadiff_bench.metrics.classifier import ASSET_PATH, load_classifier
from adadiff_bench.metrics.extractors import (DIGITS, INCEPTION, INCEPTION_WEIGHTS_FILE, PLUGIN_GROUP, ExtractorSpec,
                                              get_extractor, register_extractor, resolve_extractors)
from adadiff_bench.metrics.specs import MetricSpec, Quantity, register_metric

FAST = MetricsConfig(inception="off", kid_subset_size=50, isc_splits=5)


@pytest.fixture(autouse=True)
def registrations():
    """What a test registers (metrics, feature spaces, torch-fidelity extractors, plugin loads) is removed after it."""
    saved = [(registry, dict(registry)) for registry in (specs._METRICS, extractors._EXTRACTORS,
                                                         FEATURE_EXTRACTORS_REGISTRY, plugins._loaded)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty folder, with no torch.hub.set_dir override in force."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home"


def subset(data: Dataset, indices) -> Dataset:
    images = data.images[indices]
    return Dataset(data.name, images, data.labels[indices], hashlib.sha256(images.numpy().tobytes()).hexdigest())


# ---- a plugin's feature space and metric, each one registration ------------------------------------

class Pixels(FeatureExtractorBase):
    """Raw pixels in [0, 1] as features, for images of any size; no logits."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, images):
        return (images.flatten(1).float() / 255,)

    @staticmethod
    def get_provided_features_list():
        return ("pixels",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pixels"


def register_pixels(name: str = "test-pixels", **settings) -> ExtractorSpec:
    settings = {"roles": ("fid", "kid", "prc"), **settings}
    return register_extractor(ExtractorSpec(name, name, weights=lambda config, where: __file__, fidelity_class=Pixels,
                                            **settings))


def density_coverage(space) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) from k-NN balls around the reference features."""
    layer, k = space.features.layers["prc"], space.config.prc_neighborhood
    real, fake = space.features.reference[layer].double(), space.features.samples[layer].double()
    exact = "donot_use_mm_for_euclid_dist"
    radii = torch.cdist(real, real, compute_mode=exact).kthvalue(k + 1, dim=1).values
    inside = torch.cdist(fake, real, compute_mode=exact) <= radii[None, :]
    return {"density": inside.sum().item() / (k * len(fake)), "coverage": inside.any(dim=0).double().mean().item()}


def register_density_coverage() -> MetricSpec:
    density, coverage = Quantity("density", "density", True), Quantity("coverage", "coverage", True)
    return register_metric(MetricSpec("dc", (density, coverage), "prc", density_coverage))


def brute_density_coverage(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Density and coverage by explicit loops over points, in float64."""
    radii = np.array([np.sort(np.linalg.norm(real - point, axis=1))[k] for point in real])
    inside = np.array([np.linalg.norm(real - point, axis=1) <= radii for point in fake])
    return inside.sum() / (k * len(fake)), inside.any(axis=0).mean()


def numpy_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real))


# ---- the built-in metrics ----------------------------------------------------------------------------

def test_builtin_metrics_read_the_result_keys_torch_fidelity_exports(monkeypatch):
    """Each torch-fidelity function returns its exported keys only; every built-in quantity must come out right."""
    returned = {"metric_fid.fid_statistics_to_metric": {torch_fidelity.KEY_METRIC_FID: 1.25},
                "metric_isc.isc_featuresdict_to_metric": {torch_fidelity.KEY_METRIC_ISC_MEAN: 2.5,
                                                          torch_fidelity.KEY_METRIC_ISC_STD: 0.5},
                "metric_kid.kid_featuresdict_to_metric": {torch_fidelity.KEY_METRIC_KID_MEAN: 0.125,
                                                          torch_fidelity.KEY_METRIC_KID_STD: 0.0625},
                "metric_prc.prc_featuresdict_to_metric": {torch_fidelity.KEY_METRIC_PRECISION: 0.75,
                                                          torch_fidelity.KEY_METRIC_RECALL: 0.375,
                                                          torch_fidelity.KEY_METRIC_F_SCORE: 0.5}}
    for function, result in returned.items():
        monkeypatch.setattr(f"torch_fidelity.{function}", lambda *args, result=result, **kwargs: dict(result))
    monkeypatch.setattr("torch_fidelity.metric_fid.fid_featuresdict_to_statistics", lambda *args: {})
    features = types.SimpleNamespace(samples={}, reference={}, layers=dict.fromkeys(specs.FEATURE_ROLES, "layer"))
    space = types.SimpleNamespace(features=features, kwargs={}, config=MetricsConfig(),
                                  reference_statistics=lambda: {})
    columns = {}
    for name in ("fid", "is", "kid", "prc"):
        metric = specs._METRICS[name]
        columns.update(quality.named_columns(metric, metric.compute(space), "space"))
    assert columns == {"fid_space": 1.25, "is_space_mean": 2.5, "is_space_std": 0.5, "kid_space_mean": 0.125,
                       "kid_space_std": 0.0625, "precision_space": 0.75, "recall_space": 0.375}


# ---- plugins: a metric and a feature space, one registration each -----------------------------------

def test_a_registered_metric_has_columns_in_every_space_and_matches_brute_force(digits, tmp_path):
    register_pixels()
    register_density_coverage()
    generated, real = digits.images[:150], subset(digits, slice(300, 600))  # other images of the same digits
    quality_columns = quality.compute_quality(generated, real, FAST, tmp_path, extractors=(DIGITS, "test-pixels"))
    model, _ = load_classifier()
    with torch.no_grad():
        spaces = {"digits_cnn": [model.features(images).double().numpy() for images in (generated, real.images)],
                  "test_pixels": [images.flatten(1).double().numpy() / 255 for images in (generated, real.images)]}
    for space, (fake, reference) in spaces.items():
        density, coverage = brute_density_coverage(fake, reference, FAST.prc_neighborhood)
        assert 0.05 < coverage < 0.95 and density > 0.05  # values that a wrong ball or count would change
        assert quality_columns[f"density_{space}"] == pytest.approx(density, abs=1e-9), space
        assert quality_columns[f"coverage_{space}"] == pytest.approx(coverage, abs=1e-9), space
    assert {"fid_digits_cnn", "is_digits_cnn_mean", "fid_test_pixels"} <= set(quality_columns)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # pixels in the corners never change: a singular covariance
def test_a_registered_extractor_reads_its_shapes_only_and_skips_metrics_it_cannot_feed(digits, tmp_path):
    pixels = register_pixels()
    assert pixels.applies((1, 8, 8)) and pixels.applies((3, 16, 16)) and not pixels.applies((2, 8, 8))
    rgb16 = register_pixels("test-pixels-rgb16", channels=(3,), size=(16, 16))
    assert rgb16.applies((3, 16, 16)) and not rgb16.applies((1, 16, 16)) and not rgb16.applies((3, 8, 8))
    assert resolve_extractors((1, 8, 8), FAST, "cfg") == (DIGITS, "test-pixels")
    assert resolve_extractors((3, 16, 16), FAST, "cfg") == ("test-pixels", "test-pixels-rgb16")
    with pytest.raises(UserError, match=re.escape("the test-pixels-rgb16 feature space only reads 3-channel 16x16 "
                                                  "images (got 1x8x8 images)")):
        quality.compute_quality(digits.images[:20], digits, FAST, tmp_path, extractors=("test-pixels-rgb16",))

    samples, reference = digits.images[:200].roll(1, dims=3).contiguous(), subset(digits, slice(200, 600))
    got = quality.compute_quality(samples, reference, FAST, tmp_path, extractors=("test-pixels",))
    assert set(got) == {"fid_test_pixels", "kid_test_pixels_mean", "kid_test_pixels_std", "precision_test_pixels",
                        "recall_test_pixels"}  # no logits, so no Inception Score in this space
    expected = numpy_fid(*(images.flatten(1).double().numpy() / 255 for images in (samples, reference.images)))
    assert got["fid_test_pixels"] == pytest.approx(expected, rel=1e-3)
    no_prc = MetricsConfig(inception="off", kid_subset_size=50, prc=False)
    without_prc = quality.compute_quality(samples, reference, no_prc, tmp_path, extractors=("test-pixels",))
    assert set(without_prc) == {"fid_test_pixels", "kid_test_pixels_mean", "kid_test_pixels_std"}


def test_duplicate_and_malformed_registrations_are_refused():
    digits_space = get_extractor(DIGITS)
    assert register_extractor(digits_space) is digits_space  # the same spec again: a no-op
    with pytest.raises(ValueError, match="'digits-cnn' is already registered"):
        register_extractor(ExtractorSpec(DIGITS, DIGITS, weights=lambda config, where: str(ASSET_PATH)))
    with pytest.raises(ValueError, match="'fid' is already registered"):
        register_metric(MetricSpec("fid", (Quantity("fid2", "FID", False),), "fid", lambda space: {}))
    with pytest.raises(ValueError, match="quantity 'recall' is malformed or taken"):
        register_metric(MetricSpec("recall2", (Quantity("recall", "recall", True),), "prc", lambda space: {}))
    with pytest.raises(ValueError, match="'sharpness': a metric that ranks leaderboards"):  # Pareto needs lower-better
        register_metric(MetricSpec("sharpness", (Quantity("sharpness", "S", True),), "fid", lambda space: {},
                                   stand_in=True))
    malformed = {"Pixels": {}, "pix_els": {}, "pixels-std": {}, "pixels-ci-low": {},  # the last two misread as spreads
                 "no-roles": {"roles": ()}, "logit-role": {"roles": ("logits",)}, "two-channels": {"channels": (2,)},
                 "grey-rgb": {"channels": (1,), "rgb": True}, "flat-size": {"size": (8,)}}
    for name, settings in malformed.items():
        with pytest.raises(ValueError, match=f"feature extractor '{name}'"):
            register_pixels(name, **settings)
    with pytest.raises(ValueError, match="torch-fidelity has no feature extractor 'nothing'"):
        register_extractor(ExtractorSpec("nothing", "nothing", weights=lambda config, where: __file__))
    with pytest.raises(ValueError, match="torch-fidelity already has another 'digits-cnn'"):
        register_extractor(ExtractorSpec("my-digits", DIGITS, weights=lambda config, where: __file__,
                                         fidelity_class=Pixels))
    assert set(extractors._EXTRACTORS) == {DIGITS, INCEPTION}


def test_a_metric_returning_a_key_of_none_of_its_quantities_is_refused(digits, tmp_path):
    register_metric(MetricSpec("spread", (Quantity("spread", "spread", False),), "fid",
                               lambda space: {"spread": 1.0, "spread_seed_std": 0.5}))
    with pytest.raises(ValueError, match="metric 'spread' returned 'spread_seed_std'"):
        quality.compute_quality(digits.images[:20], digits, FAST, tmp_path)


def test_plugins_are_loaded_before_feature_spaces_are_resolved(monkeypatch):
    class Entry:
        name, value = "pixels-plugin", "tests:pixels"

        def load(self):
            return register_pixels()

    monkeypatch.setattr(plugins, "entry_points", lambda group: [Entry()] if group == PLUGIN_GROUP else [])
    plugins._loaded.pop(PLUGIN_GROUP, None)
    assert resolve_extractors((3, 16, 16), FAST, "cfg") == ("test-pixels",)


# ---- which feature spaces a run uses --------------------------------------------------------------------

SKIPPED, NONE_APPLIES = "note: Inception metrics skipped: no weights on disk", "note: no feature extractor applies"


@pytest.mark.parametrize("shape, weights, inception, expected, notes", [
    ((1, 8, 8), None, "auto", (DIGITS,), [SKIPPED]),
    ((1, 8, 8), "hub", "auto", (DIGITS, INCEPTION), []),
    ((1, 8, 8), "config", "require", (DIGITS, INCEPTION), []),
    ((1, 8, 8), "hub", "off", (DIGITS,), []),
    ((3, 16, 16), None, "auto", (), [SKIPPED, NONE_APPLIES]),
    ((3, 16, 16), "config", "auto", (INCEPTION,), []),
    ((3, 16, 16), "hub", "require", (INCEPTION,), []),
    ((3, 16, 16), "config", "off", (), [NONE_APPLIES]),
])
def test_resolve_extractors(shape, weights, inception, expected, notes, tmp_path, empty_torch_home, capsys):
    stand_in = {"hub": empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE,
                "config": tmp_path / "my_inception.pth"}.get(weights)
    if stand_in is not None:
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_bytes(b"stand-in: resolving only checks that the file is there")
    config = MetricsConfig(inception=inception, inception_weights=str(stand_in) if weights == "config" else None)
    assert resolve_extractors(shape, config, "cfg.toml") == expected
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(notes) and all(line.startswith(note) for line, note in zip(lines, notes))


def test_resolve_extractors_refuses_what_the_run_requires_but_cannot_have(tmp_path, empty_torch_home, monkeypatch):
    hub_file = empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    for shape in ((1, 8, 8), (3, 16, 16)):
        with pytest.raises(UserError) as error:
            resolve_extractors(shape, MetricsConfig(inception="require"), "cfg.toml")
        assert str(error.value) == (f'cfg.toml: [metrics] inception = "require" but no Inception weights were found '
                                    f'at {hub_file}; pass --inception-weights PATH or set inception = "auto"')
    with pytest.raises(UserError, match="missing.pth' does not exist; pass an existing file with --inception-weights"):
        resolve_extractors((1, 8, 8), MetricsConfig(inception_weights=str(tmp_path / "missing.pth")), "cfg.toml")
    # clean-fid's own model file is needed in the Inception space only
    monkeypatch.setattr(cleanfid_backend, "cleanfid_default_model_dir", lambda: tmp_path / "empty")
    clean = MetricsConfig(fid_backend="clean-fid", inception="off")
    assert resolve_extractors((1, 8, 8), clean, "cfg.toml") == (DIGITS,)
    hub_file.parent.mkdir(parents=True)
    hub_file.touch()
    with pytest.raises(UserError, match="needs clean-fid's inception-2015-12-05.pt"):
        resolve_extractors((1, 8, 8), MetricsConfig(fid_backend="clean-fid"), "cfg.toml")


# ---- the device -----------------------------------------------------------------------------------------

def test_feature_extraction_runs_on_cuda_only_where_the_space_allows_it(digits, tmp_path):
    register_pixels("cpu-pixels", cuda=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    images = digits.images[:10]

    def uses_cuda(name, device):
        return quality.fidelity_kwargs(name, __file__, images, digits, FAST, tmp_path, device)["cuda"]

    assert uses_cuda(DIGITS, cuda) and not uses_cuda(DIGITS, cpu) and not uses_cuda("cpu-pixels", cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_agree_with_the_cpu(digits, tmp_path):
    samples = digits.images[:300].roll(1, dims=3).contiguous()
    on_cpu = quality.compute_quality(samples, digits, FAST, tmp_path / "cpu")
    on_cuda = quality.compute_quality(samples, digits, FAST, tmp_path / "cuda", device=torch.device("cuda"))
    assert set(on_cuda) == set(on_cpu)
    for column, value in on_cpu.items():
        assert on_cuda[column] == pytest.approx(value, rel=1e-3, abs=1e-5), column
