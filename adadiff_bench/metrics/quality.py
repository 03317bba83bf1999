"""Sample quality: every registered metric (`specs`) in every feature space (`extractors`), through torch-fidelity.

For each feature space, the features of the samples and of the reference are extracted once, for
the layers of every enabled metric that the space provides; then each enabled metric's
`compute(space)` reads them from a `FeatureSpace`, and its quantities become columns named with the
space (`fid_digits_cnn`, `is_inception_mean`). The built-in metrics use torch-fidelity's own
functions and settings, so the numbers are those of a direct `torch_fidelity.calculate_metrics` call
with `fidelity_kwargs` (tests/test_measurement.py checks it). The reference's features and FID
statistics are cached on disk under `cache_dir`, keyed by data set, image hash, n, resolution,
extractor and a hash of the extractor's weights (`reference_cache_name`), as checksummed `.npz` files
that cannot run code (`reference_cache`); torch-fidelity's own cache, which unpickles, is switched off.

Metrics and feature spaces from plugin packages (entry-point group `adadiff_bench.metrics`) are loaded
before anything is computed. An optional bootstrap gives a confidence interval for FID
(`bootstrap.fid_bootstrap_interval`).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_fidelity.metric_fid as fidelity_fid
import torch_fidelity.utils as fidelity_utils

from ..config import MetricsConfig
from ..data import Dataset
from ..errors import UserError
from ..plugins import load_plugins
from .classifier import weights_sha256
from .extractor_training import check_trained_on
from .extractors import (DIGITS, PLUGIN_GROUP, ExtractorSpec, check_fid_backend, get_extractor, verify_weights,
                         weights_only_loads)
from .reference_cache import cache_file, cached_arrays
from .reference_stats import APPLIES_TO as PUBLISHED_SPACE, published_as_reference
from .specs import CI_HIGH, CI_LOW, FEATURE_ROLES, PIXELS, SPREAD, MetricSpec, metric_specs
from .swd import MIN_IMAGE_SIZE as SWD_MIN_IMAGE_SIZE, fits as swd_fits

CPU = torch.device("cpu")


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


@dataclass
class Features:
    """One feature space's extractor network, its layer per feature role, and the features of both image sets."""
    network: torch.nn.Module
    layers: dict[str, str]
    samples: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]


@dataclass
class FeatureSpace:
    """What a metric's `compute(space)` reads: one feature space of one `compute_quality` call.

    `features`: the network, `layers` {feature role: layer name} and the `samples` and `reference`
    feature dicts {layer name: N x D tensor on the CPU}; only the roles of enabled metrics that the
    space provides are there. `samples` (uint8 N x C x H x W) and `reference` (a `Dataset`) are the
    images themselves; `kwargs` are the keyword arguments of the equivalent `torch_fidelity.
    calculate_metrics` call (settings such as `kid_subset_size`, already capped at n); `config` is
    the run's `MetricsConfig`; `extractor` the space's `ExtractorSpec`; `cache_dir` where reference
    statistics are cached.
    """
    extractor: ExtractorSpec
    samples: torch.Tensor
    reference: Dataset
    config: MetricsConfig
    cache_dir: Path
    kwargs: dict
    features: Features | None
    kept: dict = field(default_factory=dict, init=False, repr=False)  # arrays a metric keeps: {quantity: {name: array}}
    _reference_statistics: dict | None = field(default=None, init=False, repr=False)

    def reference_statistics(self) -> dict:
        """The reference's FID mean and covariance {"mu", "sigma"} (cached on disk beside its features), or the
        published statistics of `reference_stats` in the Inception space (`metrics.reference_stats`)."""
        if self._reference_statistics is None and self.config.reference_stats and self.extractor.name == PUBLISHED_SPACE:
            self._reference_statistics = published_as_reference(self.config.reference_stats)
        if self._reference_statistics is None:
            layer = self.features.layers["fid"]
            path = cache_file(self.cache_dir, self.kwargs["input2_cache_name"], self.features.network.get_name(),
                              "stat-fid", layer)
            self._reference_statistics = cached_arrays(
                path, ("mu", "sigma"), lambda: fidelity_fid.fid_featuresdict_to_statistics(self.features.reference,
                                                                                          layer))
        return self._reference_statistics

    def cleanfid_fid(self) -> float:
        """FID by clean-fid in this space (`ExtractorSpec.cleanfid`)."""
        return self.extractor.cleanfid(self)


def compute_quality(samples: torch.Tensor, reference: Dataset, config: MetricsConfig, cache_dir: str | Path,
                    extractors: tuple[str, ...] = (DIGITS,), device: torch.device = CPU,
                    kept: dict | None = None) -> dict[str, float]:
    """Every enabled metric of uint8 N x C x H x W `samples` against `reference`, in each of the `extractors`' spaces.

    Returns flat columns such as `fid_digits_cnn` and `is_inception_mean`. A space whose weights are
    not available is left out (or refused: `ExtractorSpec.weights`); every check runs before any work.
    Feature extraction runs on `device` where the space allows CUDA. `kept`, when given, receives the arrays
    metrics keep beside their columns, by column: FID's bootstrap {"fid_digits_cnn": {"point", "replicates"}}.
    """
    load_plugins(PLUGIN_GROUP)
    pixel_metrics = enabled_pixel_metrics(config, tuple(samples.shape[1:]), extractors)
    if not extractors and not pixel_metrics:
        return {}
    check_images(samples, reference.images, extractors)
    weights = {name: get_extractor(name).weights(config, "") for name in extractors}  # fail before any work
    used = tuple(name for name, path in weights.items() if path is not None)
    check_fid_backend(config, used)
    check_quality_inputs(len(samples), reference, config, used)
    results = {}
    space = PixelSpace(samples, reference, config)
    for metric in pixel_metrics:
        results.update(named_columns(metric, metric.compute(space), PIXELS))
    for name, path in weights.items():
        if path is not None:
            results.update(metrics_in_feature_space(name, path, samples, reference, config, cache_dir, device, kept))
    return results


def check_quality_inputs(num_samples: int, reference: Dataset, config: MetricsConfig, extractors: tuple[str, ...],
                         where: str = "") -> None:
    """What the metrics need, checked before anything is sampled: two samples and two reference images, a k-NN
    neighbourhood smaller than both sets, and weights files that open safely (`ExtractorSpec.verify`)."""
    if config.swd == "on" and not swd_fits(reference.images.shape):
        raise UserError(f"{where + ': ' if where else ''}[metrics] swd = \"on\" needs images of at least "
                        f"{SWD_MIN_IMAGE_SIZE}x{SWD_MIN_IMAGE_SIZE} pixels (got "
                        f"{'x'.join(map(str, reference.images.shape[2:]))}); set swd = \"off\"")
    if config.extractor:
        check_trained_on(config.extractor, reference, where)
    if not extractors and not enabled_pixel_metrics(config, tuple(reference.images.shape[1:]), extractors):
        return
    count, where = len(reference.images), f"{where}: " if where else ""
    if num_samples < 2:
        raise UserError(f"{where}[sampling] num_samples = {num_samples}, but quality metrics need at least 2 "
                        "samples; raise num_samples")
    if count < 2:
        raise UserError(f"{where}the reference data set {reference.name!r} holds {count} image(s), but quality "
                        "metrics need at least 2; use a larger data set")
    if extractors and config.prc and config.prc_neighborhood >= min(num_samples, count):
        raise UserError(f"{where}[metrics] prc_neighborhood = {config.prc_neighborhood} needs more than that many "
                        f"samples and reference images (got {num_samples} and {count}); lower prc_neighborhood, "
                        "raise num_samples, or set prc = false")
    verify_weights({name: get_extractor(name).weights(config, "") for name in extractors})


def check_images(samples: torch.Tensor, reference_images: torch.Tensor, extractors: tuple[str, ...]) -> None:
    """Refuse unknown extractors and images that the metrics cannot compare."""
    spaces = [get_extractor(name) for name in extractors]
    if samples.dtype != torch.uint8 or samples.dim() != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples must be a uint8 N x C x H x W tensor with C = 1 or 3, "
                         f"got {samples.dtype} {tuple(samples.shape)}")
    if len(samples) < 2:
        raise UserError(f"quality metrics need at least 2 samples (got {len(samples)}); raise num_samples")
    if samples.shape[2:] != reference_images.shape[2:]:
        raise UserError(f"samples are {tuple(samples.shape[2:])} pixels but the reference data is "
                        f"{tuple(reference_images.shape[2:])}; compare against data of the model's resolution")
    for space in spaces:
        if not space.applies(tuple(samples.shape[1:])):
            raise UserError(f"the {space.name} feature space only reads {space.reads()} (got "
                            f"{'x'.join(map(str, samples.shape[1:]))} images); use another feature space for this data")


@dataclass
class PixelSpace:
    """What a PIXELS metric's `compute(space)` reads: uint8 N x C x H x W `samples`, the `reference` data set and
    the run's `MetricsConfig`."""
    samples: torch.Tensor
    reference: Dataset
    config: MetricsConfig


def enabled_pixel_metrics(config: MetricsConfig, image_shape: tuple[int, ...],
                          extractors: tuple[str, ...]) -> list[MetricSpec]:
    """The metrics that read the images themselves: enabled, and for the SWD under swd = "auto", only when no
    feature space reads these images and they are large enough for its 7x7 neighbourhoods."""
    wanted = [metric for metric in metric_specs() if metric.feature == PIXELS and metric.compute is not None
              and metric.enabled(config)]
    if config.swd == "auto" and (extractors or not swd_fits(image_shape)):
        wanted = [metric for metric in wanted if metric.name != "swd"]
    return wanted


def enabled_metrics(extractor: ExtractorSpec, config: MetricsConfig) -> list[MetricSpec]:
    """The metrics a run computes in one space: enabled, computable, and reading a feature role the space provides."""
    return [metric for metric in metric_specs() if metric.compute is not None and metric.enabled(config)
            and metric.feature in extractor.roles]


def metrics_in_feature_space(extractor: str, weights: str, samples: torch.Tensor, reference: Dataset,
                             config: MetricsConfig, cache_dir: str | Path,
                             device: torch.device = CPU, kept: dict | None = None) -> dict[str, float]:
    """Every enabled metric in one feature space, as flat columns named with the space (arrays into `kept`)."""
    spec = get_extractor(extractor)
    metrics = enabled_metrics(spec, config)
    if not metrics:
        return {}
    kwargs = fidelity_kwargs(extractor, weights, samples, reference, config, cache_dir, device)
    columns = {}
    with torch.cuda.device(device) if kwargs["cuda"] else contextlib.nullcontext():
        space = FeatureSpace(spec, samples, reference, config, Path(cache_dir), kwargs,
                             extract_features(kwargs, Path(cache_dir)))
        for metric in metrics:
            columns.update(named_columns(metric, metric.compute(space), spec.column))
    if kept is not None:
        kept.update({f"{quantity}_{spec.column}": arrays for quantity, arrays in space.kept.items()})
    return columns


def named_columns(metric: MetricSpec, values: dict[str, float], space: str) -> dict[str, float]:
    """A metric's {quantity name + tail: value} as results columns of one space: "is_std" -> "is_digits_cnn_std"."""
    columns = {}
    for key, value in values.items():
        quantity = max((q for q in metric.quantities if key == q.name or key.startswith(q.name + "_")),
                       key=lambda q: len(q.name), default=None)
        tail = key[len(quantity.name):] if quantity is not None else None
        if quantity is None or tail not in (quantity.suffix, SPREAD, CI_LOW, CI_HIGH):
            raise ValueError(f"metric {metric.name!r} returned {key!r}, which is none of its quantities "
                             f"({', '.join(q.name for q in metric.quantities)}) with its suffix, {SPREAD}, "
                             f"{CI_LOW} or {CI_HIGH}")
        columns[quantity.column(space, tail)] = value
    return columns


def fidelity_kwargs(extractor: str, weights: str, samples: torch.Tensor, reference: Dataset, config: MetricsConfig,
                    cache_dir: str | Path, device: torch.device = CPU) -> dict:
    """The keyword arguments of the equivalent `torch_fidelity.calculate_metrics` call in one feature space.

    torch-fidelity's cache is off (`cache=False`: it would read its files with `torch.load(weights_only=False)`),
    so `cache_dir` goes into no keyword (the suite caches the reference itself: `extract_features`); it stays a
    parameter for the callers. `input2_cache_name` is the key of that cache, which torch-fidelity never reads.
    """
    spec = get_extractor(extractor)
    roles = {metric.feature for metric in enabled_metrics(spec, config)}
    to_input = with_three_channels if spec.rgb else (lambda images: images)
    return dict(
        input1=ImageTensorDataset(to_input(samples)), input2=ImageTensorDataset(to_input(reference.images)),
        feature_extractor=spec.fidelity_name, feature_extractor_weights_path=weights,
        **{role: role in roles for role in FEATURE_ROLES},
        cuda=device.type == "cuda" and spec.cuda, verbose=False, save_cpu_ram=True,
        isc_splits=clamped("isc_splits", config.isc_splits, len(samples)),
        kid_subset_size=clamped("kid_subset_size", config.kid_subset_size, len(samples), len(reference.images)),
        prc_neighborhood=config.prc_neighborhood,
        cache=False, input2_cache_name=reference_cache_name(reference, extractor, weights),
    )


def extract_features(kwargs: dict, cache_dir: Path) -> Features:
    """Both image sets through the feature extractor once; the reference's come from `cache_dir` when there.

    The network is built with every `torch.load` forced to `weights_only` (its weights file cannot run code)."""
    layers = {role: fidelity_utils.resolve_feature_layer_for_metric(role, **kwargs)
              for role in FEATURE_ROLES if kwargs[role]}
    names = sorted(set(layers.values()))
    with weights_only_loads():
        network = fidelity_utils.create_feature_extractor(kwargs["feature_extractor"], names, **kwargs)
    samples = fidelity_utils.extract_featuresdict_from_input_id(1, network, **kwargs)
    return Features(network, layers, samples, reference_features(network, names, kwargs, cache_dir))


def reference_features(network, names: list[str], kwargs: dict, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The reference's features {layer: N x D}, one cache file per layer; the network runs once if any is missing."""
    paths = {name: cache_file(cache_dir, kwargs["input2_cache_name"], network.get_name(), "features", name)
             for name in names}
    computed: dict[str, torch.Tensor] = {}

    def compute(name: str) -> dict:
        if not computed:
            computed.update(fidelity_utils.extract_featuresdict_from_input_id(2, network, **kwargs))
        return {"features": computed[name].numpy()}

    return {name: torch.from_numpy(cached_arrays(paths[name], ("features",), lambda: compute(name))["features"])
            for name in names}


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
