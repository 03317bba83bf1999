"""`delta-dit`: stage-adaptive Δ-Cache (Chen, Shen, Ye, Cao, Tu, Bouganis, Zhao, Chen, "Δ-DiT: A
Training-Free Acceleration Method Tailored for Diffusion Transformers", arXiv 2406.01125, 2024).

Δ-Cache skips a range of N_c consecutive blocks and replaces their output by the current input of
the range plus the cached offset Δ = (range output - range input) of the last full step, so the new
input still reaches the blocks after the range. Because the front blocks shape the outline and the
rear blocks the details, the early sampling steps (before the boundary b) skip the rear N_c blocks
and the later steps the front N_c blocks; a full step refreshes Δ every N steps.

On U-ViT: blocks are counted in execution order (in-blocks, mid-block, out-blocks). A skipped range
also swallows long skips: an in-block inside the range whose paired out-block runs after the range
(in a front range of N_c <= depth / 2 + 1 blocks, every in-block) must still provide the skip that
out-block pops, so its offset skip - (range input) is cached too and the skip is rebuilt as (current
range input + offset); those offsets count in `cache_bytes`. Out-blocks inside a skipped range pop
their skips unused. A rear range exports no skip (every out-block paired with an in-block in it is
in it too), so it caches only Δ. With N_c = depth / 2 the front range is exactly the in-blocks and
the rear range exactly the out-blocks.

Knobs: `boundary` (b, a sampling-step index: steps 0..b-1 skip the rear blocks, steps b.. the front
blocks; 0 = always front, >= the number of steps = always rear; the default 15 of 25 steps keeps the
share of the paper's b = 12 of 20 steps), `interval` (N, 1 = `full`) and `num_cached` (N_c,
1..num_blocks - 1; default 6 = depth / 2 of the digits model). Differs from the paper: each stage
starts with a full step (the first step at or after b refreshes, so the front range never reads a Δ
cached for the rear range), then refreshes every N steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.block_cache import BlockCaching, check_interval
from adadiff_bench.methods.registry import register_method


@dataclass
class DeltaDiTParams:
    boundary: int = knob(15, "b: a sampling-step index; steps before it skip the rear blocks, later steps the front "
                             "blocks (0 = always front; >= the number of steps = always rear)", at_least=0)
    interval: int = knob(2, "N: a full step (every block, refilling the cache) every N sampling steps; 1 = `full`",
                         at_least=1)
    num_cached: int = knob(6, "N_c: consecutive blocks skipped on a cached step (their offset comes from the cache)",
                           at_least=1, valid="at most the number of blocks - 1")

    def validate(self, where: str) -> None:
        check_interval(self.interval, where)
        if self.boundary < 0:
            raise UserError(f"{where}: boundary must be a sampling-step index >= 0 (steps before it skip the rear "
                            f"blocks, later steps the front blocks), got {self.boundary}")
        if self.num_cached < 1:
            raise UserError(f"{where}: num_cached must be >= 1 (blocks skipped on cached steps), got {self.num_cached}")


@register_method
class DeltaDiT(BlockCaching):
    name = "delta-dit"
    family = "caching"
    Params = DeltaDiTParams

    @classmethod
    def check(cls, params, model, where):
        if params.num_cached >= model.num_blocks:
            raise UserError(f"{where}: num_cached = {params.num_cached} leaves none of the model's "
                            f"{model.num_blocks} blocks to run; pick num_cached in 1..{model.num_blocks - 1}")

    def cached_range(self, step: int) -> range:
        """The blocks Δ-Cache skips at `step`: the rear N_c before the boundary, the front N_c from it on."""
        num_blocks, n_c = self.model.num_blocks, self.params.num_cached
        return range(num_blocks - n_c, num_blocks) if step < self.params.boundary else range(n_c)

    def is_refresh(self, step: int) -> bool:
        stage_start = 0 if step < self.params.boundary else self.params.boundary
        return (step - stage_start) % self.params.interval == 0

    def exported_skips(self, blocks: range) -> list[int]:
        """Blocks of the range whose long skip is read by a block after the range."""
        partners = {i: self.model.skip_partner(i) for i in blocks}
        return [i for i, partner in partners.items() if partner is not None and partner >= blocks.stop]

    def refresh(self, tokens, state, step):
        blocks = self.cached_range(step)
        kept = set(self.exported_skips(blocks)) | {blocks.stop - 1}
        cache = {}
        for index in range(self.model.num_blocks):
            if index == blocks.start:
                range_input = tokens
            tokens = self.run_block(index, tokens, state)
            if index in kept:  # Δ of the range (last block) and of each exported skip
                cache[index] = tokens - range_input
        self.cache = cache
        return tokens

    def reuse(self, tokens, state, step):
        blocks = self.cached_range(step)
        for index in range(blocks.start):
            tokens = self.run_block(index, tokens, state)
        range_input = tokens
        for index in blocks:  # the skipped blocks leave the state as they would have, exported skips rebuilt
            self.model.bypass_block(index, range_input + self.cache[index] if index in self.cache else range_input,
                                    state)
        tokens = range_input + self.cache[blocks.stop - 1]
        for index in range(blocks.stop, self.model.num_blocks):
            tokens = self.run_block(index, tokens, state)
        return tokens
