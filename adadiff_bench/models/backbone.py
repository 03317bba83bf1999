"""The backbone interface: all that the exit-aware forward, the block caches and the methods see of a network.

A backbone runs one denoiser evaluation piece by piece:

    tokens, state = net.begin(x, t, y)          # embed; `state` is what blocks need besides the tokens
    for i in range(net.num_blocks):             # (U-ViT: the long-skip stack; a DiT: its adaLN conditioning)
        tokens = net.run_block(i, tokens, state)
    eps = net.head(tokens, state)

and describes itself: each block's kind (`in`, `mid`, `out` for U-ViT's long-skip halves, `plain`
otherwise), which later block reads a block's output through a long skip (`skip_partner`), its
patch geometry (for per-pixel estimators), and which of its modules make up each piece's cost
(`cost_parts`, measured once with fvcore). Methods use only this, so none branches on the backbone
type; a method that needs something one backbone lacks (DeepCache needs long skips) says so in its
`check`, and the harness refuses the cell with one line.

A block's two residual branches can be intercepted: `run_block(i, tokens, state, branch=...)` calls
`branch(name, compute)` for "attn" and "mlp" and adds what it returns (a cached output, or
`compute()`, the fresh one); feature caches (FORA, Learning-to-Cache) are written against that.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

BLOCK_KINDS = ("in", "mid", "out", "plain")
BRANCHES = ("attn", "mlp", "fusion")  # a block's residual branches, and the long-skip fusion some blocks have

# branch(name, compute) -> the branch output to add: compute() for a fresh one, or a cached tensor
BranchHook = Callable[[str, Callable[[], torch.Tensor]], torch.Tensor]


class BlockState(Protocol):
    """What a block needs besides the tokens, for the samples of the current batch."""

    def subset(self, rows: torch.Tensor) -> BlockState:
        """The state of some samples only (a boolean mask or indices over the batch), as a new object."""
        ...


@dataclass(frozen=True)
class CostParts:
    """Which modules (or parameters) make up each piece of one evaluation: their fvcore MACs are the piece's
    unit cost, and every parameter of the backbone lies under exactly one of them."""
    embed: tuple[str, ...]
    blocks: tuple[str, ...]                                   # one module per block, execution order
    branches: tuple[dict[str, str | None], ...]               # per block: module of "attn", "mlp", "fusion"
    head: tuple[str, ...]
    untraced_head_macs: float = 0.0                           # head MACs a tracer cannot see


@dataclass(frozen=True)
class Architecture:
    """What unit costs and exit estimators depend on: two networks with equal architectures cost the same."""
    in_chans: int
    img_size: int
    patch_size: int
    embed_dim: int
    num_blocks: int
    block_kinds: tuple[str, ...] = field(default=())


class Backbone:
    """Mixin of the networks the methods run piece by piece (see the module docstring).

    Subclasses set `in_chans`, `img_size`, `patch_size`, `embed_dim`, `num_classes`, `extras` (tokens
    before the patch tokens) and `block_kinds`, and implement the methods below.
    """
    in_chans: int
    img_size: int
    patch_size: int
    embed_dim: int
    num_classes: int
    extras: int
    block_kinds: tuple[str, ...]
    head_reads_state = True  # False: `head` (and its copies) ignore the block state, so callers may pass None

    @property
    def num_blocks(self) -> int:
        return len(self.block_kinds)

    @property
    def num_tokens(self) -> int:
        """Tokens per sample a block sees: the extras and one per patch."""
        return self.extras + (self.img_size // self.patch_size) ** 2

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.in_chans, self.img_size, self.patch_size, self.embed_dim, self.num_blocks,
                            tuple(self.block_kinds))

    @property
    def has_long_skips(self) -> bool:
        return any(self.skip_partner(i) is not None for i in range(self.num_blocks))

    def begin(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, BlockState]:
        """Embed the input: (tokens, the state the blocks share)."""
        raise NotImplementedError

    def run_block(self, index: int, tokens: torch.Tensor, state: BlockState,
                  branch: BranchHook | None = None) -> torch.Tensor:
        """Block `index` (execution order) on `tokens`; `branch` intercepts its residual branches."""
        raise NotImplementedError

    def bypass_block(self, index: int, tokens: torch.Tensor, state: BlockState,
                     fuse_skip: bool = False) -> torch.Tensor:
        """Block `index` does not run: keep `state` as if it had returned `tokens`, and return the tokens.

        On U-ViT an in-block's long skip is then `tokens`, an out-block's skip is consumed (and fused into
        the tokens with the block's `skip_linear` when `fuse_skip`, as ASE keeps it); elsewhere a no-op.
        """
        raise NotImplementedError

    def head(self, tokens: torch.Tensor, state: BlockState) -> torch.Tensor:
        """Tokens after the last block that ran -> eps image."""
        raise NotImplementedError

    def full_depth(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """eps with every block run: the network's plain forward, piece by piece."""
        tokens, state = self.begin(x, t, y)
        for index in range(self.num_blocks):
            tokens = self.run_block(index, tokens, state)
        return self.head(tokens, state)

    def copy_head(self) -> torch.nn.Module:
        """A trainable copy of the final head, called as `head(tokens, state)` (an early exit's own head)."""
        raise NotImplementedError

    def skip_partner(self, index: int) -> int | None:
        """The later block that reads block `index`'s output through a long skip (None: no such block)."""
        return None

    def cost_parts(self) -> CostParts:
        raise NotImplementedError

    def dummy_inputs(self) -> tuple[torch.Tensor, ...]:
        """One sample's (x, t[, y]) on the CPU, for tracing the costs."""
        x = torch.zeros(1, self.in_chans, self.img_size, self.img_size)
        return (x, torch.zeros(1)) if self.num_classes <= 0 else (x, torch.zeros(1), torch.zeros(1, dtype=torch.long))


# ---- helpers shared by patch-based backbones and their per-pixel estimators ------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin] halves."""
    half = dim // 2
    args = timesteps[:, None].float() * _frequencies(half, max_period, timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


_FREQUENCIES: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """exp(-log(max_period) * k / half) for k < half (float32), made once per device: every network call embeds
    its timesteps, and at small batches these four ops were a fifth of the embedding's time. (A plain tensor even
    when first asked for under inference mode, so that training may use it later.)"""
    key = (half, max_period, device)
    if key not in _FREQUENCIES:
        with torch.inference_mode(False), torch.no_grad():
            steps = torch.arange(half, dtype=torch.float32, device=device)
            _FREQUENCIES[key] = torch.exp(-math.log(max_period) * steps / half)
    return _FREQUENCIES[key]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B C (h p) (w p) -> B (h w) (p p C)."""
    b, c, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    x = images.reshape(b, c, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch_size * patch_size * c)


def unpatchify(tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """B (h w) (p p C) -> B C (h p) (w p); the inverse of `patchify`."""
    b, num_tokens, patch_dim = (int(n) for n in tokens.shape)
    patch_size = math.isqrt(patch_dim // channels)
    h = w = math.isqrt(num_tokens)
    if h * w != num_tokens or patch_size * patch_size * channels != patch_dim:
        raise ValueError(f"cannot unpatchify tokens of shape {tuple(tokens.shape)} into {channels} channels")
    x = tokens.reshape(b, h, w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch_size, w * patch_size)
