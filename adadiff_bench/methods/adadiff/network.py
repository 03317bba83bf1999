"""AdaDiff's network: a backbone, an uncertainty estimator per exit point, and exit heads.

Tang et al., "AdaDiff: Accelerating Diffusion Models through Step-Wise Adaptive Computation",
ECCV 2024 (arXiv 2309.17074). Exit points follow every block (one per block, numbered 1..num_blocks
by blocks run). Exit heads: the backbone's own final head shared by all exits (the official code)
or one head per exit point, initialised as a copy of the final head (option).

Official checkpoints (Tangshengku/AdaDiff) are U-ViT state dicts plus `lte_classifer.{i}.lte.*`;
`map_official_state_dict` maps those names onto `estimator.certainty.{i}.*` at the loading edge.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import UserError, unknown_choice
from ...models.backbone import Backbone, BlockState
from ...models.exit_forward import ExitHeads, shared_head
from .estimators import ESTIMATORS, Estimator

OFFICIAL_ESTIMATOR_KEY = re.compile(r"^lte_classifer\.(\d+)\.lte\.(weight|bias)$")


@dataclass
class AdaDiffConfig:
    estimator: str = "official"        # a name in ESTIMATORS: official | timestep | probe | attention | ...
    heads: str = "shared"              # shared (official) | per-exit
    timestep_weights: str = "shared"   # the timestep estimator's w_t: shared | bucketed

    def validate(self, where: str) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"{where}: {unknown_choice('estimator', self.estimator, ESTIMATORS)}")
        if self.heads not in ("shared", "per-exit"):
            raise UserError(f"{where}: heads must be 'shared' or 'per-exit' (got {self.heads!r})")
        if self.timestep_weights not in ("shared", "bucketed"):
            raise UserError(f"{where}: timestep_weights must be 'shared' or 'bucketed' (got {self.timestep_weights!r})")


class AdaDiffNetwork(nn.Module):
    def __init__(self, backbone: Backbone, config: AdaDiffConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        self.estimator: Estimator = ESTIMATORS[config.estimator](backbone, config)
        # per-exit heads for every exit but the last, which is the backbone's own head
        self.exit_heads = nn.ModuleList([backbone.copy_head() for _ in range(self.num_exits - 1)]) \
            if config.heads == "per-exit" else None

    @property
    def num_exits(self) -> int:
        return self.backbone.num_blocks

    def exit_head(self, exit_point: int, tokens: torch.Tensor, state: BlockState) -> torch.Tensor:
        """eps from the hidden state after `exit_point` blocks."""
        if self.exit_heads is None or exit_point == self.num_exits:
            return self.backbone.head(tokens, state)
        return self.exit_heads[exit_point - 1](tokens, state)

    def sampling_heads(self) -> ExitHeads:
        """The heads `exit_aware_forward` calls: the backbone's own, shared by every exit, or one per exit."""
        return shared_head(self.backbone) if self.exit_heads is None else self.exit_head

    def all_exits(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, backbone_grad: bool = True):
        """Every exit's eps prediction and uncertainty (training): lists of length num_exits.

        `backbone_grad=False` (frozen backbone) runs the blocks without building their graph.
        """
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            tokens, state = self.backbone.begin(x, t, y)
        predictions, uncertainties = [], []
        for block in range(self.num_exits):
            with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
                tokens = self.backbone.run_block(block, tokens, state)
            predictions.append(self.exit_head(block + 1, tokens, state))
            uncertainties.append(self.estimator.uncertainty(block + 1, tokens, t))
        return predictions, uncertainties

    def forward(self, x, timesteps, y=None):
        """Full depth (what the backbone computes)."""
        return self.backbone(x, timesteps, y)


def map_official_state_dict(state: dict) -> dict:
    """Official AdaDiff names -> ours: U-ViT keys under `backbone.`, `lte_classifer.{i}.lte` under the estimator."""
    mapped = {}
    for key, value in state.items():
        match = OFFICIAL_ESTIMATOR_KEY.match(key)
        mapped[f"estimator.certainty.{match[1]}.{match[2]}" if match else f"backbone.{key}"] = value
    return mapped


def looks_official(state: dict) -> bool:
    return any(OFFICIAL_ESTIMATOR_KEY.match(str(k)) for k in state)
