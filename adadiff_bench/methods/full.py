"""`full`: every block at every step; the reference every other method is measured against.

Knob `checkpoint` (optional): run another model's full depth instead of the run's base model, e.g.
a fine-tuned AdaDiff checkpoint's own backbone, so its full-depth row can be reported beside it.
Knob `train` does the same for an AdaDiff network trained on demand: the backbone that training config
fine-tunes, from the cache its `adadiff` cells share, so that backbone's group has its own reference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..knobs import knob
from .adadiff.method import AdaDiffParams, on_demand_config, trained_on_demand
from .prefix_exit import EXIT_NETWORK_FORMATS, backbone_of, check_architecture
from .registry import Method, PrepareContext, register_method


@dataclass
class FullParams:
    checkpoint: str = knob("", "a model whose full depth runs instead of the run's base model (an AdaDiff "
                                "checkpoint: its backbone); \"\" = the run's base model",
                           valid="\"\" or an existing checkpoint file")

    train: str = knob("", "an AdaDiff training config: run the backbone it fine-tunes, trained on demand (once, "
                          "in <results_dir>/.adadiff_cache, shared with the adadiff cells that name the same config)",
                      valid="\"\" or an existing training config with an [adadiff] table")

    exclusive_keys = (("checkpoint", "train"),)

    def validate(self, where: str) -> None:
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: checkpoint {self.checkpoint!r} not found; fix the path")
        if self.train:
            on_demand_config(AdaDiffParams(train=self.train), where)  # a readable AdaDiff training config


@register_method
class Full(Method):
    name = "full"
    family = "reference"
    Params = FullParams
    reads = EXIT_NETWORK_FORMATS

    @classmethod
    def check(cls, params, model, where):
        if params.checkpoint:  # (a `train` network is checked by its training: it fine-tunes the run's model)
            check_architecture(backbone_of(params.checkpoint, model), model, where, f"checkpoint {params.checkpoint!r}")

    @classmethod
    def prepare(cls, params, context: PrepareContext):
        """`train`: the on-demand AdaDiff network's path (trained now unless cached) becomes `checkpoint`."""
        if not params.train:
            return params
        path = trained_on_demand(AdaDiffParams(train=params.train), context.training_cache, context.progress)
        return dataclasses.replace(params, checkpoint=path, train="")

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.model = backbone_of(self.params.checkpoint, model, self.device)  # (an AdaDiff checkpoint: its backbone)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        eps = self.model(x, t, y)
        self.log.ran_full()
        return eps
