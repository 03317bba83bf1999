"""What the block-caching methods share (`deepcache`, `fora`, `delta-dit` and plugins like them).

Every network evaluation embeds the input, runs either a *refresh* (every block, filling the cache)
or a *reuse* (some blocks, the rest taken from the cache) and applies the head. Whether a step
refreshes depends only on its sampling-step index, so every sample of a batch takes the same path
and batch size never changes an image. The cache holds one row per sample of the current batch and
is dropped in `start_batch`; its size after every step goes to `note_cache` (peak = `cache_bytes`).

Everything goes through the backbone interface (`models.backbone`): `run_block` for a block that
runs (logged), `bypass_block` for one that does not (the blocks' state stays consistent, e.g. U-ViT's
long skips), `run_block(..., branch=...)` to cache or reuse a block's attention and MLP branches.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..models.backbone import Backbone, BlockState
from ..steplog import StepLog
from .registry import Method


def check_interval(interval: int, where: str) -> None:
    if interval < 1:
        raise UserError(f"{where}: interval must be >= 1 (a full refresh every `interval` sampling steps; "
                        f"1 = no caching), got {interval}")


def run_blocks(model: Backbone, hidden: torch.Tensor, state: BlockState, rows: torch.Tensor | None, log: StepLog,
               first: int = 0) -> torch.Tensor:
    """Blocks `first`..N for batch rows `rows` (`hidden` and `state` hold just those rows), logged as a run
    to full depth."""
    rows = rows.cpu() if rows is not None else None  # one host copy, not one per block
    for block in range(first, model.num_blocks):
        hidden = model.run_block(block, hidden, state)
        log.ran_block(block, rows)
    log.exited(model.num_blocks, rows)
    return hidden


class BlockCaching(Method):
    """Base of the block-level caching methods (not registered itself).

    Subclasses implement `is_refresh(step)`, `refresh(tokens, state, step)` (run every block, set
    `self.cache`) and `reuse(tokens, state, step)` (run what the method recomputes, read the rest from
    `self.cache`); `run_block` runs and logs one block.
    """

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.cache: dict[object, torch.Tensor] = {}

    def start_batch(self, log: StepLog) -> None:
        super().start_batch(log)
        self.cache = {}

    def is_refresh(self, step: int) -> bool:
        raise NotImplementedError

    def refresh(self, tokens: torch.Tensor, state: BlockState, step: int) -> torch.Tensor:
        raise NotImplementedError

    def reuse(self, tokens: torch.Tensor, state: BlockState, step: int) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, index: int, tokens: torch.Tensor, state: BlockState, branch=None) -> torch.Tensor:
        """Block `index` for the whole batch, logged."""
        self.log.ran_block(index)
        return self.model.run_block(index, tokens, state, branch)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        tokens, state = self.model.begin(x, t, y)
        self.log.ran_embed()
        # an empty cache (first step of a batch) always refreshes
        refresh = not self.cache or self.is_refresh(ctx.step)
        tokens = (self.refresh if refresh else self.reuse)(tokens, state, ctx.step)
        self.note_cache(*self.cache.values())
        self.log.ran_head()
        return self.model.head(tokens, state)
