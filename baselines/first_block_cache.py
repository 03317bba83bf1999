"""`first-block-cache`: run the first block every step; reuse the rest when its residual barely moved.

First-Block-Cache (FBCache) by Zeyi Cheng in ParaAttention (github.com/chengzeyi/ParaAttention,
`para_attn/first_block_cache`, 2025), also in diffusers as `FirstBlockCacheConfig` /
`apply_first_block_cache`; it builds on TeaCache's residual caching (Liu et al., arXiv 2411.19108).
Per sample and step: run the first block, r_1 = block_1(h_0) - h_0, and compare it with the r_1
of the sample's last full step, ||r_1 - r_1^prev||_1 / ||r_1^prev||_1. Below `threshold`, the
other blocks do not run: the hidden state is block_1's output plus the cached residual of the
remaining blocks; otherwise they run, and that residual and r_1 become the new references.

U-ViT mapping: the first block is in_blocks[0]; its output is both the next block's input and
the long skip that the last out-block fuses. The cached residual therefore spans the whole
remaining stack, from the first block's output to the head's input (the output of the last
out-block) minus the first block's output, so reuse is exact when the inputs do not change.
Embedding, first block and head run at every step.

Differs from ParaAttention/diffusers: decisions and caches are per sample (they average over the
whole batch, one decision per batch); reuse iff the change is < threshold (ParaAttention's rule;
diffusers reuses on <=), so threshold 0 always runs the full network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adadiff_bench.device import rows_on
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.block_cache import run_blocks
from adadiff_bench.methods.registry import Method, register_method


@dataclass
class FirstBlockCacheParams:
    threshold: float = knob(0.12, "reuse the other blocks' residual while the first block's residual changed by "
                                  "less than this relative L1 since the last full step (0 never reuses)", at_least=0)

    def validate(self, where: str) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise UserError(f"{where}: threshold must be a number >= 0 (got {self.threshold}); 0 never reuses")


def relative_l1(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample ||current - reference||_1 / ||reference||_1."""
    return (current - reference).flatten(1).abs().mean(1) / reference.flatten(1).abs().mean(1)


@register_method
class FirstBlockCache(Method):
    name = "first-block-cache"
    family = "caching"
    Params = FirstBlockCacheParams

    def start_batch(self, log) -> None:
        super().start_batch(log)
        self.first_residual: torch.Tensor | None = None  # r_1 at each sample's last full step
        self.residual: torch.Tensor | None = None        # remaining stack's output - input, same step

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        model, log = self.model, self.log
        tokens, state = model.begin(x, t, y)
        log.ran_embed()
        first_output = model.run_block(0, tokens, state)
        log.ran_block(0)
        first_residual = first_output - tokens
        rows = None  # (host) the samples that run blocks 2..N; None = all, as at the first step
        if self.first_residual is not None:
            changed = relative_l1(first_residual, self.first_residual) >= self.params.threshold
            rows = torch.nonzero(changed.cpu()).flatten()  # the step's one read of the device
        if rows is None or len(rows) == len(x):  # every sample runs: no gather, no scatter
            hidden = run_blocks(model, first_output, state, None, log, first=1)
            self.first_residual, self.residual = first_residual, hidden - first_output
        else:
            hidden = first_output + self.residual  # reused rows: first block's output + cached residual
            if len(rows):
                # blocks 2..N for those rows, the first block's output as their input (and, on U-ViT, first long skip)
                index = rows_on(rows, x.device)
                computed = run_blocks(model, first_output[index], state.subset(index), rows, log, first=1)
                hidden[index] = computed.to(hidden.dtype)
                self.residual[index] = (computed - first_output[index]).to(self.residual.dtype)
                self.first_residual[index] = first_residual[index].to(self.first_residual.dtype)
        self.note_cache(self.first_residual, self.residual)
        eps = model.head(hidden, state)
        log.ran_head()
        return eps
