"""Which backbone a cell ran on: a hash of the backbone's weights alone, so reports compare within one backbone.

Estimators, exit heads, routers, regressors and second models are not part of it: AdaDiff with a frozen
backbone hashes like the base model it was trained on, while a fine-tuned network is a backbone of its own.
"""
from __future__ import annotations

import hashlib
import weakref

import torch

from .models.backbone import Backbone

_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its hash (one per loaded checkpoint)


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors of a state dict, by name in sorted order (floats as float32, on the CPU).

    Equal weights hash alike: -0.0 counts as 0.0 (an EMA over a frozen weight can flip the sign of a zero)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        tensor = tensor.float() + 0.0 if tensor.is_floating_point() else tensor  # (-0.0 + 0.0 = +0.0)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_hash(backbone: torch.nn.Module) -> str:
    """`weights_hash` of a backbone's state dict, computed once per module (a checkpoint is loaded once per
    file and device, `checkpoints.cached_checkpoint`, so this is once per checkpoint)."""
    if backbone not in _HASHES:
        _HASHES[backbone] = weights_hash(backbone.state_dict())
    return _HASHES[backbone]


def method_backbone(method) -> Backbone:
    """The backbone a method's cell runs: the one it names `backbone` (prefix exits, BERxiT), its network's
    (AdaDiff's `net.backbone`, ASE's fine-tuned `net`), else the model it was given (full, caches, L2C, and
    DuoDiff's deep model; its shallow second model is not the backbone)."""
    net = getattr(method, "net", None)
    for candidate in (getattr(method, "backbone", None), getattr(net, "backbone", None), net, method.model):
        if isinstance(candidate, Backbone):
            return candidate
    raise TypeError(f"method {type(method).__name__} runs no Backbone")
