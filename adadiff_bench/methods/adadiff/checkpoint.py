"""AdaDiff's checkpoint formats: this suite's (a U-ViT or DiT backbone + estimators + optional exit heads, both
configs) and the official code's (a U-ViT state dict with `lte_classifer.*` estimators, its U-ViT config given
apart)."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from ...checkpoints import (CheckpointFormat, atomic_torch_save, backbone_config_from, backbone_kind, build_backbone,
                            check_layer_count, checked_build, config_from_table, load_checkpoint, register_format,
                            state_for_saving)
from ...config import DiTConfig, UViTConfig
from ...errors import UserError
from .network import AdaDiffConfig, AdaDiffNetwork, looks_official, map_official_state_dict

FORMAT = "adadiff-bench/adadiff"
OFFICIAL_FORMAT = "adadiff-official"
TRAIN_HINT = "train one with `adadiff-bench train --config configs/adadiff_digits_frozen.toml`"


def build_adadiff(backbone: UViTConfig | DiTConfig, adadiff: AdaDiffConfig) -> AdaDiffNetwork:
    return AdaDiffNetwork(build_backbone(backbone), adadiff)


def save_adadiff(path: str | Path, net: AdaDiffNetwork, backbone: UViTConfig | DiTConfig, meta: dict | None = None,
                 half: bool = False) -> None:
    """The network with its backbone's config and kind (`backbone`: "uvit" or "dit")."""
    state = state_for_saving(net, half)
    atomic_torch_save({"format": FORMAT, "version": 1, "backbone": backbone_kind(backbone),
                       "model": dataclasses.asdict(backbone), "adadiff": dataclasses.asdict(net.config),
                       "state_dict": state, "meta": meta or {}}, path)


def _ready(backbone: UViTConfig | DiTConfig, adadiff: AdaDiffConfig, state: dict, path: str) -> AdaDiffNetwork:
    """The network in float32 eval mode with `state` loaded strictly, its size bounded and its names and shapes
    checked on a meta copy first (nothing allocated for a file that does not fit)."""
    check_layer_count(backbone, state, path)
    build = functools.partial(build_adadiff, backbone, adadiff)
    return checked_build(build, build, state, path)


def _load(payload: dict, path: str, uvit: UViTConfig | None = None) -> AdaDiffNetwork:
    """This suite's format carries its own backbone config (a given one is not needed)."""
    adadiff = config_from_table(AdaDiffConfig, payload["adadiff"], path, "adadiff")
    return _ready(backbone_config_from(payload, path), adadiff, payload["state_dict"], path)


def _load_official(payload: dict, path: str, uvit: UViTConfig | None = None) -> AdaDiffNetwork:
    if uvit is None:  # a release of a published network: its preset's U-ViT
        from ...models.presets import preset_for_state
        preset = preset_for_state(payload)
        uvit = preset.network if preset is not None else None
    if uvit is None:
        raise UserError(f"{path} is an official AdaDiff state dict of no known preset; pass its U-ViT config "
                        "(load_adadiff(path, uvit=UViTConfig(...)))")
    return _ready(uvit, AdaDiffConfig(estimator="official", heads="shared"), map_official_state_dict(payload), path)


register_format(CheckpointFormat(FORMAT, "an AdaDiff network (backbone, estimators, exit heads)", _load, TRAIN_HINT))
register_format(CheckpointFormat(OFFICIAL_FORMAT, "an official AdaDiff checkpoint (U-ViT config given separately)",
                                 _load_official, recognise=looks_official))


def load_adadiff(path: str | Path, uvit: UViTConfig | None = None) -> AdaDiffNetwork:
    """An AdaDiff checkpoint of this suite, or an official AdaDiff state dict together with its U-ViT config."""
    return load_checkpoint(path, (FORMAT, OFFICIAL_FORMAT), uvit=uvit)
