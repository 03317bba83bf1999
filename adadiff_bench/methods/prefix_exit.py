"""What the prefix-exiting baselines share: a backbone with exit heads, run through the exit-aware forward.

A prefix-exit method runs blocks 1..k of the U-ViT and takes eps from the exit head after block k;
only its exit policy differs. Subclasses implement `policy` (see `ExitPolicy`) and may reset
per-call state in `begin`.

Knob `checkpoint`: "" runs the run's base model with its own final head at every exit; an AdaDiff
checkpoint runs its backbone with its exit heads (shared or per exit), so a baseline can be compared
with AdaDiff on the same network; a U-ViT checkpoint runs that model with its final head.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import UserError
from ..models.exit_forward import ExitHeads, exit_aware_forward, shared_head
from .registry import Method


@dataclass
class PrefixParams:
    checkpoint: str = ""

    def validate(self, where: str) -> None:
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: checkpoint {self.checkpoint!r} not found; fix the path or leave it "
                            "empty to use the run's base model")


@lru_cache(maxsize=8)
def backbone_and_heads(path: str):
    """(U-ViT, exit heads) of a U-ViT or AdaDiff checkpoint."""
    from ..adadiff_checkpoints import FORMAT, load_adadiff
    from ..checkpoints import load_model, read_checkpoint
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        net = load_adadiff(path).eval()
        return net.backbone, net.head
    model = load_model(path).eval()
    return model, shared_head(model)


def backbone_of(checkpoint: str, model):
    """The U-ViT a prefix-exit method with this `checkpoint` knob runs."""
    return backbone_and_heads(checkpoint)[0] if checkpoint else model


def architecture(model) -> tuple[int, ...]:
    """What the run's unit costs depend on: channels, image size, patch, width, blocks."""
    return model.in_chans, model.img_size, model.patch_size, model.embed_dim, model.num_blocks


def check_architecture(backbone, model, where: str, what: str) -> None:
    """The step log is costed with the run's model: a method's backbone must have its architecture."""
    if architecture(backbone) != architecture(model):
        raise UserError(f"{where}: {what} (channels, size, patch, width, blocks = {architecture(backbone)}) "
                        f"differs from the run's model {architecture(model)}; use a checkpoint of the run's "
                        "architecture")


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square difference of two eps predictions (eps has unit variance)."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


class PrefixExit(Method):
    """Base of the prefix-exit baselines (not registered itself)."""
    Params = PrefixParams

    def __init__(self, model, params=None):
        super().__init__(model, params)
        if self.params.checkpoint:
            self.backbone, self.heads = backbone_and_heads(self.params.checkpoint)
        else:
            self.backbone, self.heads = model, shared_head(model)

    @classmethod
    def check(cls, params, model, where):
        check_architecture(backbone_of(params.checkpoint, model), model, where, f"checkpoint {params.checkpoint!r}")

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    def predict(self, exit_point: int, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The exit's eps prediction for the active samples, logged as a head call."""
        self.log.ran_head(active)
        return self.heads(exit_point, tokens)

    def begin(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        """Called at the start of every network evaluation (one sampling step of a batch)."""

    def policy(self, exit_point: int, tokens: torch.Tensor, t: torch.Tensor, active: torch.Tensor):
        raise NotImplementedError

    def __call__(self, x, t, y):
        self.begin(x, t, y)
        return exit_aware_forward(self.backbone, x, t, y, self.policy, self.log, heads=self.heads)


__all__ = ["ExitHeads", "PrefixExit", "PrefixParams", "backbone_and_heads", "backbone_of", "check_architecture",
           "rms_distance"]
