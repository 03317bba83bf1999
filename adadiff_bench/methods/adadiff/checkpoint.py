"""AdaDiff's checkpoint formats: this suite's (backbone + estimators + optional exit heads, both configs)
and the official code's (a U-ViT state dict with `lte_classifer.*` estimators, its U-ViT config given apart)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ...checkpoints import (CheckpointFormat, atomic_torch_save, build_model, config_from_table, load_checkpoint,
                            load_state_dict_strict, register_format, state_for_saving, uvit_config_from)
from ...config import UViTConfig
from ...errors import UserError
from .network import AdaDiffConfig, AdaDiffNetwork, looks_official, map_official_state_dict

FORMAT = "adadiff-bench/adadiff"
OFFICIAL_FORMAT = "adadiff-official"
TRAIN_HINT = "train one with `adadiff-bench train --config configs/adadiff_digits_frozen.toml`"


def build_adadiff(uvit: UViTConfig, adadiff: AdaDiffConfig) -> AdaDiffNetwork:
    return AdaDiffNetwork(build_model(uvit), adadiff)


def save_adadiff(path: str | Path, net: AdaDiffNetwork, uvit: UViTConfig, meta: dict | None = None,
                 half: bool = False) -> None:
    state = state_for_saving(net, half)
    atomic_torch_save({"format": FORMAT, "version": 1, "model": dataclasses.asdict(uvit),
                       "adadiff": dataclasses.asdict(net.config), "state_dict": state, "meta": meta or {}}, path)


def _ready(net: AdaDiffNetwork, state: dict, path: str) -> AdaDiffNetwork:
    load_state_dict_strict(net, state, path)
    return net.float().eval()


def _load(payload: dict, path: str, uvit: UViTConfig | None = None) -> AdaDiffNetwork:
    """This suite's format carries its own U-ViT config (a given one is not needed)."""
    uvit = uvit_config_from(payload["model"], path)
    net = build_adadiff(uvit, config_from_table(AdaDiffConfig, payload["adadiff"], path, "adadiff"))
    return _ready(net, payload["state_dict"], path)


def _load_official(payload: dict, path: str, uvit: UViTConfig | None = None) -> AdaDiffNetwork:
    if uvit is None:  # a release of a published network: its preset's U-ViT
        from ...models.presets import preset_for_state
        preset = preset_for_state(payload)
        uvit = preset.uvit if preset is not None else None
    if uvit is None:
        raise UserError(f"{path} is an official AdaDiff state dict of no known preset; pass its U-ViT config "
                        "(load_adadiff(path, uvit=UViTConfig(...)))")
    net = build_adadiff(uvit, AdaDiffConfig(estimator="official", heads="shared"))
    return _ready(net, map_official_state_dict(payload), path)


register_format(CheckpointFormat(FORMAT, "an AdaDiff network (backbone, estimators, exit heads)", _load, TRAIN_HINT))
register_format(CheckpointFormat(OFFICIAL_FORMAT, "an official AdaDiff checkpoint (U-ViT config given separately)",
                                 _load_official, recognise=looks_official))


def load_adadiff(path: str | Path, uvit: UViTConfig | None = None) -> AdaDiffNetwork:
    """An AdaDiff checkpoint of this suite, or an official AdaDiff state dict together with its U-ViT config."""
    return load_checkpoint(path, (FORMAT, OFFICIAL_FORMAT), uvit=uvit)
