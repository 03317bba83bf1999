"""Checkpoints: the model config plus (EMA) weights in one file, and `load_model` that gives back a ready module.

Format: a dict {"format": "adadiff-bench/uvit", "version": 1, "model": {U-ViT kwargs},
"state_dict": {...}, "meta": {...}}. A plain reference U-ViT state dict (as published) loads too when
the model config is passed alongside.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .config import UViTConfig
from .errors import UserError
from .models.uvit import UViT

FORMAT = "adadiff-bench/uvit"
VERSION = 1


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(config: UViTConfig) -> UViT:
    return UViT(**dataclasses.asdict(config))


def atomic_torch_save(obj, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state_for_saving(module: torch.nn.Module, half: bool) -> dict:
    """A detached CPU copy of the state dict, floating tensors in half precision when asked."""
    return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
            for k, v in module.state_dict().items()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: UViTConfig, meta: dict | None = None,
                    half: bool = False) -> None:
    state = state_for_saving(model, half)
    atomic_torch_save({"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(config),
                       "state_dict": state, "meta": meta or {}}, path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; train one with `adadiff-bench train --config "
                        "configs/train_digits.toml` or point `checkpoint` at an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file ({type(exc).__name__}); "
                        "re-download or retrain it") from None


def load_model(path: str | Path, config: UViTConfig | None = None) -> UViT:
    """Load a checkpoint into a float32 U-ViT in eval mode.

    `path` is an adadiff-bench checkpoint, or a reference U-ViT state dict together with `config`.
    """
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        config = UViTConfig(**payload["model"])
        state = payload["state_dict"]
    elif config is not None and isinstance(payload, dict):
        state = payload
    else:
        raise UserError(f"checkpoint {str(path)!r} is a plain state dict without a model config; pass the "
                        "U-ViT config (load_model(path, config=UViTConfig(...)))")
    model = build_model(config)
    load_state_dict_strict(model, state, str(path))
    return model.float().eval()


def load_state_dict_strict(model: torch.nn.Module, state: dict, where: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming missing and unexpected keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(f"checkpoint {where!r} does not fit the model ({'; '.join(parts)}); "
                        "check that the model config matches the checkpoint")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
