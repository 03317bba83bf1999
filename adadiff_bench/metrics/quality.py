"""Sample quality (FID, Inception Score, KID, precision/recall) through torch-fidelity, one feature space at a time.

Feature spaces: `digits-cnn` (the packaged digits classifier, always available) and `inception`
(torch-fidelity's Inception-V3, only when its weights are on disk: nothing is downloaded).

Each feature space is one pass: the features of the samples and of the reference are extracted once,
and every metric is computed from them with torch-fidelity's own functions and settings, so the
numbers are those of a direct `torch_fidelity.calculate_metrics` call (benchmarks/metric_overhead.py
checks it). The reference's features and FID statistics are cached on disk under `cache_dir`, keyed
by data set, image hash, n, resolution, extractor and a hash of the extractor's weights.

`fid_backend = "clean-fid"` computes FID with clean-fid instead: on the same features in the digits
space, and with clean-fid's own resizing and TorchScript Inception in the inception space. An optional
bootstrap gives a confidence interval for FID (see `fid_bootstrap_interval`).
"""
from __future__ import annotations

import io
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.hub
import torch_fidelity
import torch_fidelity.metric_fid as fidelity_fid
import torch_fidelity.metric_isc as fidelity_isc
import torch_fidelity.metric_kid as fidelity_kid
import torch_fidelity.metric_prc as fidelity_prc
import torch_fidelity.utils as fidelity_utils

from ..config import MetricsConfig
from ..data import Dataset
from ..errors import UserError, unknown_choice
from ..results import atomic_write_bytes
from .classifier import ASSET_PATH, EXTRACTOR_NAME, weights_sha256
from .cleanfid_backend import (CLEANFID_MODEL_FILE, cleanfid_default_model_dir, cleanfid_frechet_distance,
                               cleanfid_inception_features, resolve_cleanfid_model)

INCEPTION = "inception"
INCEPTION_FIDELITY_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTORS = (EXTRACTOR_NAME, INCEPTION)
HIGHER_IS_BETTER = {"fid": False, "is": True, "kid": False, "precision": True, "recall": True}


class ImageTensorDataset(torch.utils.data.Dataset):
    """A uint8 N x C x H x W tensor seen as a data set of C x H x W images (what torch-fidelity reads)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        """One uint8 C x H x W image."""
        return self.images[index]


def default_inception_weights_path() -> Path:
    """Where torch-fidelity caches the Inception weights it downloads ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(config: MetricsConfig) -> str | None:
    """The Inception weights file to use: the configured path, else torch-fidelity's cached copy, else None."""
    if config.inception_weights:
        if not Path(config.inception_weights).is_file():
            raise UserError(f"Inception weights file {config.inception_weights!r} does not exist; "
                            f"pass an existing file with --inception-weights PATH ([metrics] inception_weights)")
        return str(config.inception_weights)
    cached = default_inception_weights_path()
    return str(cached) if cached.is_file() else None


def compute_quality(samples: torch.Tensor, reference: Dataset, config: MetricsConfig, cache_dir: str | Path,
                    extractors: tuple[str, ...] = (EXTRACTOR_NAME,)) -> dict[str, float]:
    """FID, IS and KID of uint8 N x C x H x W `samples` against `reference`, one column per feature space."""
    if not extractors:
        return {}
    check_images(samples, reference.images, extractors)
    weights = {extractor: weights_for(extractor, config) for extractor in extractors}  # fail before any work
    check_fid_backend(config, tuple(e for e, path in weights.items() if path is not None))
    results = {}
    for extractor, path in weights.items():
        if path is not None:
            results.update(metrics_in_feature_space(extractor, path, samples, reference, config, cache_dir))
    return results


def check_images(samples: torch.Tensor, reference_images: torch.Tensor, extractors: tuple[str, ...]) -> None:
    """Refuse unknown extractors and images that the metrics cannot compare."""
    for extractor in extractors:
        if extractor not in EXTRACTORS:
            raise unknown_choice("feature extractor", extractor, EXTRACTORS)
    if samples.dtype != torch.uint8 or samples.dim() != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples must be a uint8 N x C x H x W tensor with C = 1 or 3, "
                         f"got {samples.dtype} {tuple(samples.shape)}")
    if len(samples) < 2:
        raise UserError(f"quality metrics need at least 2 samples (got {len(samples)}); raise num_samples")
    if samples.shape[2:] != reference_images.shape[2:]:
        raise UserError(f"samples are {tuple(samples.shape[2:])} pixels but the reference data is "
                        f"{tuple(reference_images.shape[2:])}; compare against data of the model's resolution")
    if EXTRACTOR_NAME in extractors and tuple(samples.shape[2:]) != (8, 8):
        raise UserError(f"the {EXTRACTOR_NAME} feature space only reads 8x8 digits (got "
                        f"{tuple(samples.shape[2:])} images); use the inception feature space for other data")


def check_fid_backend(config: MetricsConfig, extractors: tuple[str, ...]) -> None:
    """Refuse the clean-fid backend in the Inception space when clean-fid's model file is not on disk."""
    if config.fid_backend == "clean-fid" and INCEPTION in extractors and resolve_cleanfid_model(
            config.cleanfid_model) is None:
        raise UserError(cleanfid_missing_message())


def weights_for(extractor: str, config: MetricsConfig) -> str | None:
    """The weights file of a feature space, or None when it is to be skipped."""
    if extractor == EXTRACTOR_NAME:
        return str(ASSET_PATH)
    if config.inception == "off":
        return None
    weights = resolve_inception_weights(config)
    if weights is None and config.inception == "require":
        raise UserError(f"inception = \"require\" but no Inception weights were found at "
                        f"{default_inception_weights_path()}; pass --inception-weights PATH")
    if weights is None:
        print(f"Inception metrics skipped: no weights at {default_inception_weights_path()}; "
              f"pass --inception-weights PATH to compute them", file=sys.stderr)
    return weights


def metrics_in_feature_space(extractor: str, weights: str, samples: torch.Tensor, reference: Dataset,
                             config: MetricsConfig, cache_dir: str | Path) -> dict[str, float]:
    """FID, IS, KID (and precision/recall) in one feature space, as flat named columns."""
    kwargs = fidelity_kwargs(extractor, weights, samples, reference, config, cache_dir)
    features = extract_features(kwargs)
    raw = fidelity_metrics(features, kwargs)
    column = extractor.replace("-", "_")
    columns = {f"{name}_{column}{suffix}": raw[key] for name, suffix, key in COLUMNS if key in raw}
    if config.fid_backend == "clean-fid":
        columns[f"fid_{column}"] = cleanfid_fid(extractor, samples, reference, features, config, cache_dir,
                                                kwargs["input2_cache_name"])
    if config.fid_bootstrap:
        low, high = fid_bootstrap_interval(features.samples[features.layers["fid"]], reference_statistics(
            features, kwargs), config.fid_bootstrap, config.fid_ci)
        columns.update({f"fid_{column}_ci_low": low, f"fid_{column}_ci_high": high})
    return columns


@dataclass
class Features:
    """One feature space's extractor network, its layer per metric, and the features of both image sets."""
    network: torch.nn.Module
    layers: dict[str, str]
    samples: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]


COLUMNS = (("fid", "", torch_fidelity.KEY_METRIC_FID),
           ("is", "_mean", torch_fidelity.KEY_METRIC_ISC_MEAN), ("is", "_std", torch_fidelity.KEY_METRIC_ISC_STD),
           ("kid", "_mean", torch_fidelity.KEY_METRIC_KID_MEAN), ("kid", "_std", torch_fidelity.KEY_METRIC_KID_STD),
           ("precision", "", torch_fidelity.KEY_METRIC_PRECISION), ("recall", "", torch_fidelity.KEY_METRIC_RECALL))


def fidelity_kwargs(extractor: str, weights: str, samples: torch.Tensor, reference: Dataset, config: MetricsConfig,
                    cache_dir: str | Path) -> dict:
    """The keyword arguments of the equivalent `torch_fidelity.calculate_metrics` call."""
    to_input = with_three_channels if extractor == INCEPTION else (lambda images: images)
    return dict(
        input1=ImageTensorDataset(to_input(samples)), input2=ImageTensorDataset(to_input(reference.images)),
        feature_extractor=INCEPTION_FIDELITY_NAME if extractor == INCEPTION else extractor,
        feature_extractor_weights_path=weights,
        fid=True, isc=True, kid=True, prc=config.prc, cuda=False, verbose=False, save_cpu_ram=True,
        isc_splits=clamped("isc_splits", config.isc_splits, len(samples)),
        kid_subset_size=clamped("kid_subset_size", config.kid_subset_size, len(samples), len(reference.images)),
        prc_neighborhood=config.prc_neighborhood,
        cache_root=str(cache_dir), input2_cache_name=reference_cache_name(reference, extractor, weights),
    )


def extract_features(kwargs: dict) -> Features:
    """Both image sets through the feature extractor once; the reference's come from the cache when there."""
    metrics = [m for m in ("isc", "fid", "kid", "prc") if kwargs[m]]
    layers = {m: fidelity_utils.resolve_feature_layer_for_metric(m, **kwargs) for m in metrics}
    network = fidelity_utils.create_feature_extractor(kwargs["feature_extractor"], sorted(set(layers.values())),
                                                      **kwargs)
    return Features(network, layers, fidelity_utils.extract_featuresdict_from_input_id_cached(1, network, **kwargs),
                    fidelity_utils.extract_featuresdict_from_input_id_cached(2, network, **kwargs))


def reference_statistics(features: Features, kwargs: dict) -> dict:
    """The reference's FID mean and covariance (cached beside its features)."""
    return fidelity_fid.fid_featuresdict_to_statistics_cached(
        features.reference, kwargs["input2_cache_name"], features.network, features.layers["fid"], **kwargs)


def fidelity_metrics(features: Features, kwargs: dict) -> dict[str, float]:
    """torch-fidelity's metrics from extracted features, as `calculate_metrics` computes them."""
    layers, samples, reference = features.layers, features.samples, features.reference
    raw = dict(fidelity_isc.isc_featuresdict_to_metric(samples, layers["isc"], **kwargs))
    sample_stats = fidelity_fid.fid_featuresdict_to_statistics(samples, layers["fid"])
    raw.update(fidelity_fid.fid_statistics_to_metric(sample_stats, reference_statistics(features, kwargs), False))
    raw.update(fidelity_kid.kid_featuresdict_to_metric(samples, reference, layers["kid"], **kwargs))
    if "prc" in layers:
        raw.update(fidelity_prc.prc_featuresdict_to_metric(samples, reference, layers["prc"], **kwargs))
    return raw


def fid_bootstrap_interval(sample_features: torch.Tensor, reference_stats: dict, resamples: int, level: float,
                           seed: int = 0) -> tuple[float, float]:
    """A basic (reverse-percentile) bootstrap interval for FID over resampled generated samples.

    The reference statistics stay fixed. FID is biased upward at finite n, and a resample (with its
    duplicates) is biased once more; the basic interval [2 F - q_hi, 2 F - q_lo] reflects the resamples'
    spread around the point estimate F and so corrects for that shift, where the plain percentile
    interval would sit above the estimate.
    """
    features = sample_features.numpy()
    rng = np.random.default_rng(seed)

    def fid_of(rows: np.ndarray) -> float:
        stats = fidelity_fid.fid_features_to_statistics(torch.from_numpy(features[rows]))
        return fidelity_fid.fid_statistics_to_metric(stats, reference_stats, False)[torch_fidelity.KEY_METRIC_FID]

    n = len(features)
    point = fid_of(np.arange(n))
    values = [fid_of(rng.integers(0, n, n)) for _ in range(resamples)]
    q_low, q_high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return max(0.0, 2 * point - float(q_high)), max(0.0, 2 * point - float(q_low))


def cleanfid_fid(extractor: str, samples: torch.Tensor, reference: Dataset, features: Features,
                 config: MetricsConfig, cache_dir: str | Path, reference_key: str) -> float:
    """FID by clean-fid: same features in the digits space; clean-fid's own Inception pipeline otherwise."""
    if extractor != INCEPTION:
        layer = features.layers["fid"]
        return cleanfid_frechet_distance(features.samples[layer].numpy(), features.reference[layer].numpy())
    model_dir = resolve_cleanfid_model(config.cleanfid_model)
    if model_dir is None:
        raise UserError(cleanfid_missing_message())
    model_hash = weights_sha256(model_dir / CLEANFID_MODEL_FILE)[:16]
    cached = Path(cache_dir) / f"{reference_key}-cleanfid-{model_hash}.npy"
    if cached.is_file():
        reference_inception = np.load(cached)
    else:
        reference_inception = cleanfid_inception_features(reference.images, model_dir)
        atomic_write_bytes(cached, npy_bytes(reference_inception))
    return cleanfid_frechet_distance(cleanfid_inception_features(samples, model_dir), reference_inception)


def cleanfid_missing_message() -> str:
    """The one line that says where clean-fid's Inception file was looked for and how to provide it."""
    return (f"fid_backend = \"clean-fid\" needs clean-fid's {CLEANFID_MODEL_FILE} (looked in "
            f"{cleanfid_default_model_dir()}); set [metrics] cleanfid_model = PATH or use fid_backend = \"torch-fidelity\"")


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def with_three_channels(images: torch.Tensor) -> torch.Tensor:
    """Grayscale N x 1 x H x W repeated to N x 3 x H x W (Inception reads RGB only)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def clamped(setting: str, value: int, *counts: int) -> int:
    """`value` capped at the smallest image count, with a warning when capped."""
    limit = min(counts)
    if value <= limit:
        return value
    warnings.warn(f"{setting} {value} exceeds the {limit} images available; using {limit}", stacklevel=3)
    return limit


def reference_cache_name(reference: Dataset, extractor: str, weights: str) -> str:
    """Cache key of the reference features: data set, image hash, n, resolution, extractor, weights hash."""
    count, _, height, width = reference.images.shape
    dataset = re.sub(r"[^A-Za-z0-9_.]+", "_", reference.name)
    return (f"{dataset}-{reference.sha256[:16]}-n{count}-{height}x{width}-{extractor}-"
            f"{weights_sha256(weights)[:16]}")
