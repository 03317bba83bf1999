"""`full`: every block at every step; the reference every other method is measured against.

Knob `checkpoint` (optional): run another model's full depth instead of the run's base model, e.g.
a fine-tuned AdaDiff checkpoint's own backbone, so its full-depth row can be reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..knobs import knob
from .prefix_exit import EXIT_NETWORK_FORMATS, backbone_of, check_architecture
from .registry import Method, register_method


@dataclass
class FullParams:
    checkpoint: str = knob("", "a model whose full depth runs instead of the run's base model (an AdaDiff "
                                "checkpoint: its backbone); \"\" = the run's base model",
                           valid="\"\" or an existing checkpoint file")

    def validate(self, where: str) -> None:
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: checkpoint {self.checkpoint!r} not found; fix the path")


@register_method
class Full(Method):
    name = "full"
    family = "reference"
    Params = FullParams
    reads = EXIT_NETWORK_FORMATS

    @classmethod
    def check(cls, params, model, where):
        if params.checkpoint:
            check_architecture(backbone_of(params.checkpoint, model), model, where, f"checkpoint {params.checkpoint!r}")

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.model = backbone_of(self.params.checkpoint, model, self.device)  # (an AdaDiff checkpoint: its backbone)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        eps = self.model(x, t, y)
        self.log.ran_full()
        return eps
