"""`deepcache`: reuse the deep features, recompute only the shallow blocks (Ma, Fang, Wang,
"DeepCache: Accelerating Diffusion Models for Free", CVPR 2024; arXiv 2312.00858).

DeepCache observes that the high-level features a U-Net's deep part produces change little between
adjacent sampling steps. With the uniform 1:N strategy, every N-th step runs the whole network and
caches the features that enter the up-sampling block U_m of the chosen skip branch m (the output of
everything deeper); the N - 1 steps in between run only D_1..D_m and U_m..U_1, where U_m fuses the
fresh skip of D_m with the cached deep features.

On U-ViT: D_1..D_m are the first m in-blocks, U_m..U_1 the last m out-blocks (out-block
`num_blocks - 1 - i` pops the long skip of in-block i), and the deep part is in-blocks m.., the
mid-block and the out-blocks before the last m. A cached step runs 2m blocks; the shallow out-blocks
fuse their skips (`skip_linear` on cat(x, skip)) from in-blocks computed fresh at this step, and the
first of them reads the cached deep features as its x. Costs: 2m blocks plus embed and head per
cached step; the cache is one token tensor per sample.

Knobs: `interval` (N, a full step every N steps; 1 = `full`) and `branch` (m, 1..number of
in-blocks; 1 is the shallowest branch, the cheapest cached step). Differs from the paper: only the
uniform 1:N schedule (not its non-uniform one for large N); a branch is one transformer block per
side instead of a U-Net resolution stage. Needs long skips: a backbone without them (a DiT) is
refused in `check`.
"""
from __future__ import annotations

from dataclasses import dataclass

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.block_cache import BlockCaching, check_interval
from adadiff_bench.methods.registry import register_method


@dataclass
class DeepCacheParams:
    interval: int = knob(3, "N: a full step (every block, refilling the cache) every N sampling steps; 1 = `full`",
                         at_least=1)
    branch: int = knob(1, "m: the skip branch whose deep features are cached; cached steps run the first m in-blocks "
                          "and the last m out-blocks (1 = shallowest, cheapest)", at_least=1,
                       valid="at most the number of in-blocks")

    def validate(self, where: str) -> None:
        check_interval(self.interval, where)
        if self.branch < 1:
            raise UserError(f"{where}: branch must be >= 1 (in-blocks recomputed on cached steps), got {self.branch}")


@register_method
class DeepCache(BlockCaching):
    name = "deepcache"
    family = "caching"
    Params = DeepCacheParams

    @classmethod
    def check(cls, params, model, where):
        if not model.has_long_skips:
            raise UserError(f"{where}: DeepCache reuses the deep features between long-skip pairs, and this backbone "
                            "has no long skips; run deepcache on a U-ViT (or use fora, delta-dit or teacache)")
        paired = sum(model.skip_partner(i) is not None for i in range(model.num_blocks))
        if params.branch > paired:
            raise UserError(f"{where}: branch = {params.branch} exceeds the model's {paired} in-blocks; "
                            f"pick branch in 1..{paired}")

    def is_refresh(self, step: int) -> bool:
        return step % self.params.interval == 0

    def refresh(self, tokens, state, step):
        first_shallow_out = self.model.num_blocks - self.params.branch  # U_m in execution order
        for index in range(self.model.num_blocks):
            if index == first_shallow_out:
                self.cache = {"deep": tokens}  # F_cache: the deep part's output, entering U_m
            tokens = self.run_block(index, tokens, state)
        return tokens

    def reuse(self, tokens, state, step):
        m, num_blocks = self.params.branch, self.model.num_blocks
        for index in range(m):  # D_1..D_m, pushing fresh skips
            tokens = self.run_block(index, tokens, state)
        for index in range(m, num_blocks - m):  # the deep part does not run; its skips pair up among themselves
            self.model.bypass_block(index, tokens, state)
        tokens = self.cache["deep"]
        for index in range(num_blocks - m, num_blocks):  # U_m..U_1 fuse the fresh skips
            tokens = self.run_block(index, tokens, state)
        return tokens
