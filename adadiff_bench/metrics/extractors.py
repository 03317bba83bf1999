"""Feature extractors: one registered spec per feature space, and which of them a run uses.

A feature space is a network that turns images into features (`digits-cnn`: the packaged digits
classifier; `inception`: torch-fidelity's Inception-V3). Every metric (see `specs`) is computed in
every space that provides the feature layer it reads, and its columns carry the space's name:
`fid_digits_cnn`, `is_inception_mean`.

Adding a space is one `register_extractor(ExtractorSpec(...))` call, in this file or in a plugin
module loaded through the `adadiff_bench.metrics` entry-point group. For example, raw pixels as
features for images of any size, with no logits, so no Inception Score in that space::

    register_extractor(ExtractorSpec("pixels", "pixels", weights=lambda config, where: __file__,
                                     roles=("fid", "kid", "prc"), fidelity_class=Pixels))

where `Pixels` is a torch-fidelity `FeatureExtractorBase` whose one feature, "pixels", is
`images.flatten(1).float() / 255` (tests/test_metric_registry.py has it in full).

Nothing is downloaded unless asked: a space whose weights are not on disk is left out (or refused,
when the run requires it); `inception = "download"` fetches torch-fidelity's Inception file into torch
hub's cache, with a connect timeout, and checks it like any other weights file before use. Nothing is unpickled either: a space's weights file is opened with
`torch.load(weights_only=True)` first (`ExtractorSpec.verify`), every load while torch-fidelity builds
a network is forced to `weights_only` (`weights_only_loads`), and clean-fid's TorchScript file is only
taken from its shared default folder when it is the user's own (`cleanfid_backend`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.hub
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..config import MetricsConfig
from ..errors import UserError, unknown_choice
from ..plugins import load_plugins
from .classifier import ASSET_PATH, EXTRACTOR_NAME, DigitsCNNExtractor, weights_sha256
from .extractor_training import LearnedExtractor, read_extractor_file
from .extractor_training import feature_roles as learned_feature_roles
from .cleanfid_backend import (CLEANFID_MODEL_FILE, cleanfid_default_model_dir, cleanfid_frechet_distance,
                               cleanfid_inception_features, resolve_cleanfid_model)
from .reference_cache import cache_file, cached_arrays
from .specs import FEATURE_ROLES, parse_column, quantities

PLUGIN_GROUP = "adadiff_bench.metrics"
DIGITS = EXTRACTOR_NAME
INCEPTION = "inception"
INCEPTION_FIDELITY_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
DOWNLOAD_TIMEOUT_S = 30.0  # seconds a socket of the download may wait (connect, then each read)


def same_features_fid(space) -> float:
    """clean-fid's Frechet distance on the space's own FID features (the default clean-fid behaviour)."""
    layer = space.features.layers["fid"]
    return cleanfid_frechet_distance(space.features.samples[layer].numpy(), space.features.reference[layer].numpy())


@dataclass(frozen=True)
class ExtractorSpec:
    """A feature space: the network, where its weights are, which images it reads, which feature roles it gives.

    `name` is the space's name in configs and results (lower case words joined by "-"; in column
    names the "-" becomes "_"). `fidelity_name` is the torch-fidelity feature extractor that computes
    it: a torch-fidelity built-in, or `fidelity_class` (a `FeatureExtractorBase` subclass), which is
    registered with torch-fidelity under that name when this spec is registered.

    `weights(config, where)` returns the file to load, whose SHA-256 also keys the reference cache (a
    network without weights returns a file that identifies it, such as its module's `__file__`), or
    None to leave the space out. It owns the space's availability policy: a one-line `UserError`
    (prefixed with `where` when given) when the run requires weights that are not on disk, a one-line
    note on stderr when it leaves the space out for a reason the user should hear of.

    The space reads images with `channels` in (1, 3) and, when `size` is set, exactly that H x W;
    `rgb` repeats grey images to three channels first. `roles` are the metric feature roles it
    provides (`specs.FEATURE_ROLES`: "fid", "isc", "kid", "prc"); a metric reading another role is
    skipped in this space. torch-fidelity's `get_default_feature_layer_for_metric(role)` names the
    layer of each role. `cleanfid(space)` is FID by clean-fid in this space (`fid_backend =
    "clean-fid"`), and `cleanfid_model` says that it needs clean-fid's own Inception file, checked
    before any work. `cuda`: the network may run on a CUDA device when the run uses one. `verify(path)`,
    when given, opens the weights file safely before torch-fidelity loads it and raises a one-line
    `UserError` when it is not what the space reads (the harness calls it before anything is written).
    """
    name: str
    fidelity_name: str
    weights: Callable[[MetricsConfig, str], str | None]
    channels: tuple[int, ...] = (1, 3)
    size: tuple[int, int] | None = None
    rgb: bool = False
    roles: tuple[str, ...] = FEATURE_ROLES
    fidelity_class: type | None = None
    cleanfid: Callable[[Any], float] = same_features_fid
    cleanfid_model: bool = False
    cuda: bool = True
    verify: Callable[[str], None] | None = None

    @property
    def column(self) -> str:
        """The space's name as it appears in column names: `digits_cnn`."""
        return self.name.replace("-", "_")

    def applies(self, image_shape: tuple[int, ...]) -> bool:
        """Whether the space reads C x H x W images of this shape."""
        channels, *size = image_shape
        return channels in self.channels and (self.size is None or tuple(size) == tuple(self.size))

    def reads(self) -> str:
        """The images the space reads, in words: "1-channel 8x8 images"."""
        size = f" {self.size[0]}x{self.size[1]}" if self.size else ""
        return f"{' or '.join(map(str, self.channels))}-channel{size} images"


_EXTRACTORS: dict[str, ExtractorSpec] = {}


def register_extractor(spec: ExtractorSpec) -> ExtractorSpec:
    """Add a feature space (and its network to torch-fidelity); a malformed spec or a taken name is refused."""
    problem = _malformed(spec)
    if problem:
        raise ValueError(f"feature extractor {spec.name!r}: {problem}")
    if spec.name in _EXTRACTORS and _EXTRACTORS[spec.name] is not spec:
        raise ValueError(f"feature extractor {spec.name!r} is already registered")
    registered = FEATURE_EXTRACTORS_REGISTRY.get(spec.fidelity_name)
    if spec.fidelity_class is not None and registered not in (None, spec.fidelity_class):
        raise ValueError(f"feature extractor {spec.name!r}: torch-fidelity already has another "
                         f"{spec.fidelity_name!r} ({registered.__qualname__})")
    if spec.fidelity_class is not None and registered is None:
        register_feature_extractor(spec.fidelity_name, spec.fidelity_class)
    _EXTRACTORS[spec.name] = spec
    return spec


def _malformed(spec: ExtractorSpec) -> str | None:
    """What is wrong with a spec, or None."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", spec.name):
        return "a name like 'digits-cnn' is needed (lower case words joined by '-')"
    for _, quantity in quantities():  # the space must read back out of every metric's column names
        parsed = parse_column(quantity.column(spec.column))
        if parsed is None or parsed.quantity != quantity or parsed.space != spec.column or not parsed.is_value:
            return f"its column {quantity.column(spec.column)!r} would not read back as {quantity.name!r}"
    if not spec.roles or not set(spec.roles) <= set(FEATURE_ROLES):
        return f"roles must be some of {', '.join(FEATURE_ROLES)} (got {spec.roles!r})"
    if not spec.channels or not set(spec.channels) <= {1, 3} or (spec.rgb and 3 not in spec.channels):
        return f"channels must be some of 1, 3 (got {spec.channels!r}; rgb needs 3)"
    if spec.size is not None and (len(spec.size) != 2 or min(spec.size) <= 0):
        return f"size must be None or (height, width) (got {spec.size!r})"
    if not callable(spec.weights) or not callable(spec.cleanfid) or not (spec.verify is None or callable(spec.verify)):
        return "weights, cleanfid and verify must be functions"
    if spec.fidelity_class is None and spec.fidelity_name not in FEATURE_EXTRACTORS_REGISTRY:
        return f"torch-fidelity has no feature extractor {spec.fidelity_name!r}; give its fidelity_class"
    return None


def extractor_specs() -> list[ExtractorSpec]:
    """Every registered feature space, in preference order (registration order; plugins loaded first)."""
    load_plugins(PLUGIN_GROUP)
    return list(_EXTRACTORS.values())


def get_extractor(name: str) -> ExtractorSpec:
    """The registered feature space `name`; a UserError with the close matches when there is none."""
    load_plugins(PLUGIN_GROUP)
    if name not in _EXTRACTORS:
        raise unknown_choice("feature extractor", name, tuple(_EXTRACTORS))
    return _EXTRACTORS[name]


def resolve_extractors(image_shape: tuple[int, int, int], config: MetricsConfig, where: str) -> tuple[str, ...]:
    """The feature spaces a run on C x H x W images uses, in preference order; raises UserError before any work.

    A space is used when it reads images of this shape and its weights are available (`ExtractorSpec.
    weights`: Inception under `inception = "auto" | "require" | "off" | "download"`). The clean-fid backend's model
    file is checked here too.
    """
    if config.extractor:
        register_learned_extractor(config.extractor)
    names = tuple(spec.name for spec in extractor_specs()
                  if spec.applies(tuple(image_shape)) and spec.weights(config, where) is not None)
    check_fid_backend(config, names)
    if not names:
        swd = config.swd != "off" and min(image_shape[1:]) >= 8
        print("note: no feature extractor applies to this data set (the digits classifier needs 1x8x8 images and "
              "no Inception weights were found); FID, IS, KID and precision/recall will be skipped"
              f"{' (the SWD is computed instead)' if swd else ''}; `adadiff-bench train-extractor` trains a "
              "feature space for your data", file=sys.stderr)
    return names


def verify_weights(weights: dict[str, str | None]) -> None:
    """Open each space's weights file safely ({space: path}, None: left out) before any library loads it."""
    for name, path in weights.items():
        verify = get_extractor(name).verify
        if path is not None and verify is not None:
            verify(path)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every `torch.load` behaves as `weights_only=True`, even one that asks for False (torch-fidelity's)."""
    saved = {key: os.environ.pop(key, None) for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def check_fid_backend(config: MetricsConfig, extractors: tuple[str, ...]) -> None:
    """Refuse the clean-fid backend in a space that needs clean-fid's model file when that file is not on disk."""
    if config.fid_backend == "clean-fid" and any(get_extractor(name).cleanfid_model for name in extractors) and \
            resolve_cleanfid_model(config.cleanfid_model) is None:
        raise UserError(cleanfid_missing_message())


def cleanfid_missing_message() -> str:
    """The one line that says where clean-fid's Inception file was looked for and how to provide it."""
    return (f"fid_backend = \"clean-fid\" needs clean-fid's {CLEANFID_MODEL_FILE} (looked in "
            f"{cleanfid_default_model_dir()}); set [metrics] cleanfid_model = PATH or use "
            "fid_backend = \"torch-fidelity\"")


# ---- Inception: torch-fidelity's network when its weights are on disk; clean-fid's own pipeline for FID -----

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


def inception_weights(config: MetricsConfig, where: str = "") -> str | None:
    """Inception's weights under `inception`: "off" leaves the space out, "require" refuses a run without them,
    "auto" uses them when on disk and otherwise leaves the space out with a note, "download" fetches them
    when they are not on disk."""
    if config.inception == "off":
        return None
    weights = resolve_inception_weights(config)  # raises when a configured file is absent
    if weights is None and config.inception == "download":
        weights = download_inception_weights()
    if weights is None and config.inception == "require":
        raise UserError(f'{where + ": " if where else ""}[metrics] inception = "require" but no Inception weights '
                        f"were found at {default_inception_weights_path()}; pass --inception-weights PATH or set "
                        'inception = "auto"')
    if weights is None:
        print(f"note: Inception metrics skipped: no weights on disk (pass --inception-weights PATH or put "
              f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} in $TORCH_HOME/hub/checkpoints)", file=sys.stderr)
    return weights


def download_inception_weights() -> str:
    """torch-fidelity's Inception file, fetched into torch hub's cache (a socket timeout of DOWNLOAD_TIMEOUT_S
    while it runs) and opened with weights_only=True before anything uses it; a file that fails is removed."""
    target = default_inception_weights_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"note: downloading the Inception weights from {URL_INCEPTION_V3} to {target}", file=sys.stderr)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:  # torch hub writes a temporary file beside the target and renames it into place when complete
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
    except OSError as exc:  # (URLError, a timeout, a refused connection, a full disk)
        raise UserError(f"could not download the Inception weights from {URL_INCEPTION_V3} ({exc}); check the "
                        f"connection, or put {INCEPTION_WEIGHTS_FILE} on disk and pass --inception-weights PATH") \
            from None
    finally:
        socket.setdefaulttimeout(previous)
    try:
        check_inception_weights(str(target))
    except UserError:
        target.unlink(missing_ok=True)  # never leave a file that fails the check where "auto" would find it
        raise
    return str(target)


def check_inception_weights(path: str) -> None:
    """Refuse an Inception weights file that is not plain tensors (`torch.load(weights_only=True)` fails on it)."""
    stat = os.stat(path)
    _check_tensor_file(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _check_tensor_file(path: str, size: int, mtime_ns: int) -> None:
    """`check_inception_weights`, once per file version (size and modification time)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # (pickled code, a truncated file, anything else that is not a tensor file)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Inception weights file {path!r} is not a file of plain tensors ({reason[:160]}); "
                        f"pass torch-fidelity's {INCEPTION_WEIGHTS_FILE} with --inception-weights PATH") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"Inception weights file {path!r} holds {type(state).__name__}, not a state dict of "
                        f"tensors; pass torch-fidelity's {INCEPTION_WEIGHTS_FILE} with --inception-weights PATH")


def inception_cleanfid_fid(space) -> float:
    """FID by clean-fid's own resize and TorchScript Inception; the reference's features are cached on disk."""
    model_dir = resolve_cleanfid_model(space.config.cleanfid_model)
    if model_dir is None:
        raise UserError(cleanfid_missing_message())
    model_hash = weights_sha256(model_dir / CLEANFID_MODEL_FILE)[:16]
    cached = cache_file(space.cache_dir, space.kwargs["input2_cache_name"], "cleanfid", model_hash)
    reference_inception = cached_arrays(cached, ("features",), lambda: {
        "features": cleanfid_inception_features(space.reference.images, model_dir)})["features"]
    return cleanfid_frechet_distance(cleanfid_inception_features(space.samples, model_dir), reference_inception)


# ---- the built-in feature spaces, in preference order ---------------------------------------------

register_extractor(ExtractorSpec(DIGITS, DIGITS, weights=lambda config, where="": str(ASSET_PATH),
                                 channels=(1,), size=(8, 8), fidelity_class=DigitsCNNExtractor))
register_extractor(ExtractorSpec(INCEPTION, INCEPTION_FIDELITY_NAME, weights=inception_weights, rgb=True,
                                 cleanfid=inception_cleanfid_fid, cleanfid_model=True, verify=check_inception_weights))


# ---- feature spaces trained on the user's data (`adadiff-bench train-extractor`), registered when a run names one ---

def register_learned_extractor(path: str) -> ExtractorSpec:
    """Register the feature space of a trained extractor file under its name (`learned-<data hash>`), with
    torch-fidelity too (`feature_extractor="learned-<data hash>"`, `feature_extractor_weights_path=path`).

    The file is read weights-only first; the space is used only by runs whose `[metrics] extractor` is this file,
    and only on images of the shape it was trained on."""
    meta = read_extractor_file(path)["meta"]
    file = Path(path).resolve()
    registered = _EXTRACTORS.get(meta["name"])
    if registered is not None and registered.weights(MetricsConfig(extractor=str(file)), "") is not None:
        return registered

    def weights(config: MetricsConfig, where: str = "") -> str | None:
        """This file, for a run whose [metrics] extractor names it; otherwise the space is left out."""
        return str(file) if config.extractor and Path(config.extractor).resolve() == file else None

    spec = ExtractorSpec(meta["name"], meta["name"], weights=weights, channels=(meta["channels"],),
                         size=(meta["height"], meta["width"]), roles=learned_feature_roles(meta),
                         fidelity_class=LearnedExtractor, verify=read_extractor_file)
    _EXTRACTORS.pop(meta["name"], None)  # (the same name from another file of the same data: the newer one)
    return register_extractor(spec)


def forget_learned_extractors() -> None:
    """Unregister every trained feature space (a process that runs several configs, such as a test session)."""
    for name in [name for name, spec in _EXTRACTORS.items() if spec.fidelity_class is LearnedExtractor]:
        del _EXTRACTORS[name]
        FEATURE_EXTRACTORS_REGISTRY.pop(name, None)
