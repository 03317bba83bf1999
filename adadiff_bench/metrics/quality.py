"""Sample quality (FID, Inception Score, KID) through torch-fidelity, one feature space at a time.

Feature spaces: `digits-cnn` (the packaged digits classifier, always available) and `inception`
(torch-fidelity's Inception-V3, only when its weights are on disk: nothing is downloaded). Reference
features are cached under `cache_dir`, keyed by data set, resolution, extractor and weights file.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import torch
import torch.hub
import torch_fidelity

from ..config import MetricsConfig
from ..data import Dataset
from ..errors import UserError, unknown_choice
from .classifier import ASSET_PATH, EXTRACTOR_NAME, weights_sha256

INCEPTION = "inception"
INCEPTION_FIDELITY_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTORS = (EXTRACTOR_NAME, INCEPTION)
HIGHER_IS_BETTER = {"fid": False, "is": True, "kid": False}


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
    """One torch-fidelity call: FID, IS and KID in one feature space, as flat named columns."""
    to_input = with_three_channels if extractor == INCEPTION else (lambda images: images)
    raw = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(to_input(samples)),
        input2=ImageTensorDataset(to_input(reference.images)),
        feature_extractor=INCEPTION_FIDELITY_NAME if extractor == INCEPTION else extractor,
        feature_extractor_weights_path=weights,
        fid=True, isc=True, kid=True, cuda=False, verbose=False, save_cpu_ram=True,
        isc_splits=clamped("isc_splits", config.isc_splits, len(samples)),
        kid_subset_size=clamped("kid_subset_size", config.kid_subset_size, len(samples), len(reference.images)),
        cache_root=str(cache_dir), input2_cache_name=reference_cache_name(reference, extractor, weights),
    )
    column = extractor.replace("-", "_")
    return {
        f"fid_{column}": raw[torch_fidelity.KEY_METRIC_FID],
        f"is_{column}_mean": raw[torch_fidelity.KEY_METRIC_ISC_MEAN],
        f"is_{column}_std": raw[torch_fidelity.KEY_METRIC_ISC_STD],
        f"kid_{column}_mean": raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        f"kid_{column}_std": raw[torch_fidelity.KEY_METRIC_KID_STD],
    }


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
    """Cache key of the reference features: data set, image hash, resolution, extractor, weights hash."""
    height, width = reference.images.shape[2:]
    dataset = re.sub(r"[^A-Za-z0-9_.]+", "_", reference.name)
    return f"{dataset}-{reference.sha256[:16]}-{height}x{width}-{extractor}-{weights_sha256(weights)[:16]}"
