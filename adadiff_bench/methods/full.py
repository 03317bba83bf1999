"""`full`: every block at every step; the reference every other method is measured against.

Knob `checkpoint` (optional): run another model's full depth instead of the run's base model, e.g.
a fine-tuned AdaDiff checkpoint's own backbone, so its full-depth row can be reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import UserError
from .registry import Method, register_method


@dataclass
class FullParams:
    checkpoint: str = ""

    def validate(self, where: str) -> None:
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: checkpoint {self.checkpoint!r} not found; fix the path")


@lru_cache(maxsize=4)
def _backbone(path: str):
    from ..adadiff_checkpoints import FORMAT, load_adadiff
    from ..checkpoints import load_model, read_checkpoint
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return load_adadiff(path).backbone
    return load_model(path)


@register_method
class Full(Method):
    name = "full"
    Params = FullParams

    def __init__(self, model, params=None):
        super().__init__(model, params)
        if self.params.checkpoint:
            self.model = _backbone(self.params.checkpoint)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        eps = self.model(x, t, y)
        self.log.ran_full()
        return eps
