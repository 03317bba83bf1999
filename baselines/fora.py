"""`fora`: reuse every block's attention and MLP outputs between refresh steps (Selvaraju, Ding,
Chen, Zharkov, Liang, "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration",
arXiv 2407.01425, 2024).

FORA's static caching: at every N-th sampling step every layer k computes and caches its residual
branches h_attn^(k) and h_mlp^(k); in the N - 1 steps after, each layer skips both and adds the
cached outputs to its residual stream (x <- x + h_attn^(k), x <- x + h_mlp^(k)), so only the
embedding and the head see the new input.

On U-ViT: every block (in, mid, out) caches its attention and MLP outputs the same way. An
out-block's long-skip fusion `skip_linear(cat(x, skip))` is neither attention nor MLP, so it is
recomputed at every step from the fresh residual stream and the fresh skip (the in-blocks' outputs,
themselves embed + cached residuals); caching it too would discard everything fresh at the first
out-block and repeat the last refresh step's eps. Its cost (one linear 2D -> D per token and
out-block) is logged with `add_macs`; the blocks themselves count as not run. The cache is two
token tensors per block and sample.

Knob: `interval` (N; 1 = `full`). Differs from the paper: the skip fusion above, which DiT lacks.
"""
from __future__ import annotations

from dataclasses import dataclass

from adadiff_bench.flops import unit_costs
from adadiff_bench.knobs import knob
from adadiff_bench.models.backbone import BRANCHES
from adadiff_bench.methods.block_cache import BlockCaching, check_interval
from adadiff_bench.methods.registry import register_method


@dataclass
class ForaParams:
    interval: int = knob(3, "N: a full step (every block, refilling the cache) every N sampling steps; 1 = `full`",
                         at_least=1)

    def validate(self, where: str) -> None:
        check_interval(self.interval, where)


@register_method
class Fora(BlockCaching):
    name = "fora"
    family = "caching"
    Params = ForaParams

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.fusion_macs = unit_costs(model).branches[:, BRANCHES.index("fusion")]  # per block, per sample

    def is_refresh(self, step: int) -> bool:
        return step % self.params.interval == 0

    def refresh(self, tokens, state, step):
        cache = {}
        for k in range(self.model.num_blocks):  # every block runs, keeping its attention and MLP outputs
            tokens = self.run_block(k, tokens, state,
                                    branch=lambda name, compute, k=k: cache.setdefault((k, name), compute()))
        self.cache = cache
        return tokens

    def reuse(self, tokens, state, step):
        for k in range(self.model.num_blocks):  # x <- x + h_attn^(k) + h_mlp^(k) from the cache; skip fusions run
            if self.fusion_macs[k]:
                self.log.add_macs(self.fusion_macs[k])
            tokens = self.model.run_block(k, tokens, state, branch=lambda name, compute, k=k: self.cache[k, name])
        return tokens
