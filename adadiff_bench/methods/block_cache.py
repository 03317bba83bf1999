"""What the feature-caching baselines (`deepcache`, `fora`, `delta-dit`) share.

Every network evaluation embeds the input, runs either a *refresh* (every block, filling the cache)
or a *reuse* (some blocks, the rest taken from the cache) and applies the head. Whether a step
refreshes depends only on its sampling-step index, so every sample of a batch takes the same path
and batch size never changes an image. The cache holds one row per sample of the current batch and
is dropped in `start_batch`; its size after every step goes to `note_cache` (peak = `cache_bytes`).

Each piece that runs is logged (embed, head, `ran_block` per block); a reused block logs nothing.
"""
from __future__ import annotations

import torch

from adadiff_bench.errors import UserError
from adadiff_bench.methods.registry import Method
from adadiff_bench.models.uvit import UViT
from adadiff_bench.steplog import StepLog


def check_interval(interval: int, where: str) -> None:
    if interval < 1:
        raise UserError(f"{where}: interval must be >= 1 (a full refresh every `interval` sampling steps; "
                        f"1 = no caching), got {interval}")


def paired_out_block(model: UViT, index: int) -> int:
    """The out-block (execution order) that pops the long skip pushed by in-block `index`."""
    return model.num_blocks - 1 - index


def run_blocks(model: UViT, hidden: torch.Tensor, rows: torch.Tensor, log: StepLog, first: int = 0,
               skips: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Blocks `first`..N for batch rows `rows` (`hidden` holds just those rows), logged as a run to full depth."""
    skips = [] if skips is None else skips
    for block in range(first, model.num_blocks):
        hidden = model.run_block(block, hidden, skips)
        log.ran_block(block, rows)
    log.exited(model.num_blocks, rows)
    return hidden


class BlockCaching(Method):
    """Base of the block-level caching baselines (not registered itself).

    Subclasses implement `is_refresh(step)`, `refresh(tokens)` (run every block, set `self.cache`)
    and `reuse(tokens)` (run what the method recomputes, read the rest from `self.cache`).
    """

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.cache: dict[object, torch.Tensor] = {}

    def start_batch(self, log: StepLog) -> None:
        super().start_batch(log)
        self.cache = {}

    def is_refresh(self, step: int) -> bool:
        raise NotImplementedError

    def refresh(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reuse(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, index: int, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Block `index` for the whole batch, logged; in-blocks push their long skip, out-blocks pop one."""
        self.log.ran_block(index)
        return self.model.run_block(index, tokens, skips)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        tokens = self.model.embed(x, t, y)
        self.log.ran_embed()
        # an empty cache (first step of a batch) always refreshes
        refresh = not self.cache or self.is_refresh(self.log.current_step)
        tokens = self.refresh(tokens) if refresh else self.reuse(tokens)
        self.note_cache(*self.cache.values())
        self.log.ran_head()
        return self.model.head(tokens)
