"""AdaDiff's network: a U-ViT backbone, an uncertainty estimator per exit point, and exit heads.

Tang et al., "AdaDiff: Accelerating Diffusion Models through Step-Wise Adaptive Computation",
ECCV 2024 (arXiv 2309.17074). Exit points follow every block (depth + 1 of them, numbered
1..num_blocks by blocks run). Exit heads: the backbone's own final head shared by all exits (the
official code) or one head per exit point, initialised from the final head (option).

Official checkpoints (Tangshengku/AdaDiff) are U-ViT state dicts plus `lte_classifer.{i}.lte.*`;
`from_official_state_dict` maps those names onto `estimator.certainty.{i}.*` at the loading edge.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .estimators import ESTIMATORS, Estimator, build_estimator
from .uvit import UViT

OFFICIAL_ESTIMATOR_KEY = re.compile(r"^lte_classifer\.(\d+)\.lte\.(weight|bias)$")


@dataclass
class AdaDiffConfig:
    estimator: str = "official"        # official | timestep | probe | attention
    heads: str = "shared"              # shared (official) | per-exit
    timestep_weights: str = "shared"   # the timestep estimator's w_t: shared | bucketed

    def validate(self, where: str) -> None:
        from ..errors import UserError, unknown_choice
        if self.estimator not in ESTIMATORS:
            raise UserError(f"{where}: {unknown_choice('estimator', self.estimator, ESTIMATORS)}")
        if self.heads not in ("shared", "per-exit"):
            raise UserError(f"{where}: heads must be 'shared' or 'per-exit' (got {self.heads!r})")
        if self.timestep_weights not in ("shared", "bucketed"):
            raise UserError(f"{where}: timestep_weights must be 'shared' or 'bucketed' (got {self.timestep_weights!r})")


class ExitHead(nn.Module):
    """A copy of U-ViT's final head (norm, decoder_pred, unpatchify, conv) for one exit point."""

    def __init__(self, backbone: UViT):
        super().__init__()
        self.norm = copy.deepcopy(backbone.norm)
        self.decoder_pred = copy.deepcopy(backbone.decoder_pred)
        self.final_layer = copy.deepcopy(backbone.final_layer)
        self.extras, self.in_chans = backbone.extras, backbone.in_chans

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from .uvit import unpatchify
        patches = self.decoder_pred(self.norm(tokens))[:, self.extras:, :]
        return self.final_layer(unpatchify(patches, self.in_chans))


class AdaDiffUViT(nn.Module):
    def __init__(self, backbone: UViT, config: AdaDiffConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        num_exits = backbone.num_blocks
        self.estimator: Estimator = build_estimator(config.estimator, num_exits, backbone.embed_dim,
                                                    backbone.patch_size, backbone.in_chans, backbone.extras,
                                                    config.timestep_weights)
        # per-exit heads for every exit but the last, which is the backbone's own head
        self.exit_heads = nn.ModuleList([ExitHead(backbone) for _ in range(num_exits - 1)]) \
            if config.heads == "per-exit" else None

    @property
    def num_exits(self) -> int:
        return self.backbone.num_blocks

    def head(self, exit_point: int, tokens: torch.Tensor) -> torch.Tensor:
        if self.exit_heads is None or exit_point == self.num_exits:
            return self.backbone.head(tokens)
        return self.exit_heads[exit_point - 1](tokens)

    def all_exits(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, backbone_grad: bool = True):
        """Every exit's eps prediction and uncertainty (training): lists of length num_exits.

        `backbone_grad=False` (frozen backbone) runs the blocks without building their graph.
        """
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            tokens = self.backbone.embed(x, t, y)
        skips: list[torch.Tensor] = []
        predictions, uncertainties = [], []
        for block in range(self.num_exits):
            with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
                tokens = self.backbone.run_block(block, tokens, skips)
            predictions.append(self.head(block + 1, tokens))
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
    return any(OFFICIAL_ESTIMATOR_KEY.match(k) for k in state)
