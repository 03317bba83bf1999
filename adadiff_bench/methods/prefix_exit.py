"""What the prefix-exiting methods share: a backbone with exit heads, run through the exit-aware forward.

A prefix-exit method runs blocks 1..k of the backbone and takes eps from the exit head after block k;
only its exit policy differs. Subclasses implement `policy` (see `models.exit_forward.ExitPolicy`)
and may reset per-call state in `begin`.

Knob `checkpoint`: "" runs the run's base model with its own final head at every exit; an AdaDiff
checkpoint runs its backbone with its exit heads (shared or per exit), so a baseline can be compared
with AdaDiff on the same network; a U-ViT checkpoint runs that model with its final head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import FORMAT as UVIT_FORMAT
from ..checkpoints import DIT_FORMAT, UVIT_STATE_DICT, cached_checkpoint
from ..errors import UserError
from ..knobs import knob
from ..models.backbone import Backbone, BlockState
from ..models.exit_forward import ExitHeads, exit_aware_forward, shared_head
from .registry import Method

# a backbone alone (its final head serves every exit) or an AdaDiff network (its own exit heads)
EXIT_NETWORK_FORMATS = (UVIT_FORMAT, DIT_FORMAT, UVIT_STATE_DICT, "adadiff-bench/adadiff", "adadiff-official")


@dataclass
class PrefixParams:
    checkpoint: str = knob("", "the network whose exits are taken: \"\" = the run's base model with its final "
                                "head at every exit; an AdaDiff checkpoint = its backbone and exit heads; a U-ViT "
                                "or DiT checkpoint = that model with its final head",
                           valid="\"\" or an existing checkpoint file")

    def validate(self, where: str) -> None:
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: checkpoint {self.checkpoint!r} not found; fix the path or leave it "
                            "empty to use the run's base model")


def exit_network(path: str, where: str = "", device: torch.device | str = "cpu") -> tuple[Backbone, ExitHeads]:
    """(backbone, exit heads) of a checkpoint, on `device`: an AdaDiff network's own heads, or a backbone's
    final head."""
    return backbone_and_heads(cached_checkpoint(path, EXIT_NETWORK_FORMATS, where, device=device))


def backbone_and_heads(net) -> tuple[Backbone, ExitHeads]:
    """(backbone, exit heads) of a loaded exit network: an AdaDiff network's own heads, or a backbone's final head."""
    return (net, shared_head(net)) if isinstance(net, Backbone) else (net.backbone, net.sampling_heads())


def backbone_of(checkpoint: str, model: Backbone, device: torch.device | str = "cpu") -> Backbone:
    """The backbone a prefix-exit method with this `checkpoint` knob runs (on `device`)."""
    return exit_network(checkpoint, device=device)[0] if checkpoint else model


def _shape(net: Backbone) -> tuple[int, ...]:
    a = net.architecture
    return a.in_chans, a.img_size, a.patch_size, a.embed_dim, a.num_blocks


def check_architecture(backbone: Backbone, model: Backbone, where: str, what: str) -> None:
    """The step log is costed with the run's model: a method's backbone must have its architecture."""
    if backbone.architecture != model.architecture:
        raise UserError(f"{where}: {what} (channels, size, patch, width, blocks = {_shape(backbone)}) differs from "
                        f"the run's model {_shape(model)}; use a checkpoint of the run's architecture")


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square difference of two eps predictions (eps has unit variance)."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


class PrefixExit(Method):
    """Base of the prefix-exit methods (not registered itself)."""
    Params = PrefixParams
    reads = EXIT_NETWORK_FORMATS

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.backbone, self.heads = exit_network(self.params.checkpoint, device=self.device) if self.params.checkpoint \
            else (model, shared_head(model))

    @classmethod
    def check(cls, params, model, where):
        check_architecture(backbone_of(params.checkpoint, model), model, where, f"checkpoint {params.checkpoint!r}")

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    def predict(self, exit_point: int, tokens: torch.Tensor, state: BlockState, active: torch.Tensor) -> torch.Tensor:
        """The exit's eps prediction for the active samples, logged as a head call."""
        self.log.ran_head(active)
        return self.heads(exit_point, tokens, state)

    def begin(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> None:
        """Called at the start of every network evaluation (one sampling step of a batch)."""

    def policy(self, exit_point: int, tokens: torch.Tensor, state: BlockState, t: torch.Tensor, active: torch.Tensor):
        raise NotImplementedError

    def __call__(self, x, t, y, ctx):
        self.begin(x, t, y, ctx)
        return exit_aware_forward(self.backbone, x, t, y, self.policy, self.log, heads=self.heads)
