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

import torch

from adadiff_bench.methods.registry import register_method

from ._block_cache import BlockCaching, check_interval


@dataclass
class ForaParams:
    interval: int = 3

    def validate(self, where: str) -> None:
        check_interval(self.interval, where)


@register_method
class Fora(BlockCaching):
    name = "fora"
    family = "caching"
    Params = ForaParams

    def __init__(self, model, params=None):
        super().__init__(model, params)
        num_tokens = model.pos_embed.shape[1]
        self.skip_macs = model.embed_dim * 2 * model.embed_dim * num_tokens  # skip_linear, per sample

    def is_refresh(self, step: int) -> bool:
        return step % self.params.interval == 0

    def fuse_skip(self, block, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """An out-block's long-skip fusion (identity for in- and mid-blocks)."""
        if block.skip_linear is None:
            return tokens
        return block.skip_linear(torch.cat([tokens, skips.pop()], dim=-1))

    def refresh(self, tokens):
        num_in, skips, cache = len(self.model.in_blocks), [], {}
        for k, block in enumerate(self.model.block_list()):
            # Block.forward, keeping its two residual branches
            tokens = self.fuse_skip(block, tokens, skips)
            cache[k, "attn"] = h_attn = block.attn(block.norm1(tokens))
            tokens = tokens + h_attn
            cache[k, "mlp"] = h_mlp = block.mlp(block.norm2(tokens))
            tokens = tokens + h_mlp
            self.log.ran_block(k)
            if k < num_in:
                skips.append(tokens)
        self.cache = cache
        return tokens

    def reuse(self, tokens):
        num_in, skips = len(self.model.in_blocks), []
        for k, block in enumerate(self.model.block_list()):
            if block.skip_linear is not None:
                self.log.add_macs(self.skip_macs)
            tokens = self.fuse_skip(block, tokens, skips)
            tokens = tokens + self.cache[k, "attn"]
            tokens = tokens + self.cache[k, "mlp"]
            if k < num_in:
                skips.append(tokens)
        return tokens
