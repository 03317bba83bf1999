"""Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + w (eps_c - eps_u), one knob `guidance` = w.

w = 1 is no guidance (one pass, the conditional one). U-ViT writes the same combination as
eps_c + s (eps_c - eps_u), so its scale s is w - 1: its ImageNet s = 0.4 is w = 1.4, its MS-COCO
s = 1.0 is w = 2.0. The unconditional pass replaces the condition by a null one: the label
`num_classes` of an embedding that holds one extra row for it (1000 for ImageNet's 1001-row
embedding), or, for text conditioning, the empty prompt's context tokens.

Each pass is its own method object with its own step log: under early exits and caches each pass
decides for itself (U-ViT's and AdaDiff's code call the network twice, with the same threshold), and
both passes' blocks are counted in the FLOPs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import UserError
from .models import variance

NO_GUIDANCE = 1.0

# y_null = null_condition(y): the unconditional pass's condition for a batch conditioned on y
NullCondition = Callable[[torch.Tensor], torch.Tensor]


def null_label(label: int) -> NullCondition:
    """The null class label for every sample (U-ViT: `num_classes`, the embedding's last row)."""
    return lambda y: torch.full_like(y, label)


def null_context(tokens: torch.Tensor) -> NullCondition:
    """The same context tokens (e.g. the empty prompt's CLIP features, L x D) for every sample of a batch of contexts."""
    return lambda y: tokens.to(device=y.device, dtype=y.dtype).expand(len(y), *tokens.shape[-2:])


def guided(conditional, unconditional, guidance: float, null: NullCondition, channels: int = 0):
    """A denoiser eps_u + w (eps_c - eps_u) from two denoisers called as denoiser(x, t, y, ctx): `conditional`
    with the batch's condition, `unconditional` with `null(y)`. Each pass sees the same x, t and context.
    With `channels` > 0 only the first `channels` channels are guided and the rest are eps_c (the DiT paper's
    rule, 3 of 4 latent channels, kept for reproducing its FID; diffusers' DiTPipeline guides all)."""

    def denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        eps_c = conditional(x, t, y, ctx)
        with variance.ignored():  # a learned variance is the conditional pass's (DiT's forward_with_cfg)
            eps_u = unconditional(x, t, null(y), ctx)
        eps = eps_u + guidance * (eps_c - eps_u)
        return torch.cat([eps[:, :channels], eps_c[:, channels:]], dim=1) if channels else eps

    return denoiser


def label_classes(model, guidance: float) -> int:
    """How many labels the sampler draws from (0 for an unconditional model). A model that names its
    `null_label` (set where it is built, e.g. 1000 for ImageNet's 1001 rows) draws from the labels below
    it; otherwise, under guidance, the embedding's last row is the null label and is never drawn."""
    null = getattr(model, "null_label", None)
    if null is not None:
        return null
    num_classes = model.num_classes
    return num_classes - 1 if guidance != NO_GUIDANCE and num_classes > 0 else max(num_classes, 0)


def check_guidance(guidance: float, model, where: str, channels: int = 0) -> None:
    """Guidance needs a null condition: a label embedding with a null row besides real classes, or a
    text-conditioned network's empty-prompt tokens; a channel rule needs that many channels."""
    if channels and channels > model.in_chans:
        raise UserError(f"{where}: guidance_channels = {channels} but the network's output has {model.in_chans} "
                        "channels; set at most that many (0 guides them all)")
    if guidance == NO_GUIDANCE or getattr(model, "null_context", None) is not None or model.num_classes >= 2:
        return
    raise UserError(f"{where}: guidance = {guidance} needs a conditional model trained with a null label "
                    f"(num_classes >= 2, the last one null); this model has num_classes = {model.num_classes}. "
                    "Set guidance = 1.0 (no guidance)")


def null_condition(model) -> NullCondition:
    """The unconditional pass's condition for `model`: the empty prompt's tokens of a text-conditioned network
    (its `null_context`, set where it is built), else its `null_label` or the last label of its embedding."""
    tokens = getattr(model, "null_context", None)
    if tokens is not None:
        return null_context(tokens)
    null = getattr(model, "null_label", None)
    return null_label(model.num_classes - 1 if null is None else null)
