"""AdaDiff checkpoints: backbone + estimators (+ per-exit heads) with both configs, and official-format loading."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoints import atomic_torch_save, build_model, load_state_dict_strict, read_checkpoint, state_for_saving
from .config import UViTConfig
from .errors import UserError
from .models.adadiff import AdaDiffConfig, AdaDiffUViT, looks_official, map_official_state_dict

FORMAT = "adadiff-bench/adadiff"


def build_adadiff(uvit: UViTConfig, adadiff: AdaDiffConfig) -> AdaDiffUViT:
    return AdaDiffUViT(build_model(uvit), adadiff)


def save_adadiff(path: str | Path, net: AdaDiffUViT, uvit: UViTConfig, meta: dict | None = None,
                 half: bool = False) -> None:
    state = state_for_saving(net, half)
    atomic_torch_save({"format": FORMAT, "version": 1, "model": dataclasses.asdict(uvit),
                       "adadiff": dataclasses.asdict(net.config), "state_dict": state, "meta": meta or {}}, path)


def load_adadiff(path: str | Path, uvit: UViTConfig | None = None) -> AdaDiffUViT:
    """An AdaDiff checkpoint of this suite, or an official AdaDiff state dict together with its U-ViT config."""
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        net = build_adadiff(UViTConfig(**payload["model"]), AdaDiffConfig(**payload["adadiff"]))
        state = payload["state_dict"]
    elif isinstance(payload, dict) and looks_official(payload):
        if uvit is None:
            raise UserError(f"{path} is an official AdaDiff state dict; pass its U-ViT config "
                            "(load_adadiff(path, uvit=UViTConfig(...)))")
        net = build_adadiff(uvit, AdaDiffConfig(estimator="official", heads="shared"))
        state = map_official_state_dict(payload)
    else:
        raise UserError(f"{path} is not an AdaDiff checkpoint (no estimator weights); train one with "
                        "`adadiff-bench train --config configs/adadiff_digits_frozen.toml`")
    load_state_dict_strict(net, state, str(path))
    return net.float().eval()
