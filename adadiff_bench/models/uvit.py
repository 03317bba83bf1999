"""U-ViT backbone (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023).

Constructor arguments, parameter names and shapes and the forward `(x, timesteps, y=None) -> eps`
follow the reference implementation (repository baofff/U-ViT, `libs/uvit.py`), so its published
checkpoints load with `load_state_dict(strict=True)`. Attention goes through
`scaled_dot_product_attention`, in float32 as the reference's "flash" mode does.

Beyond the reference, U-ViT implements the backbone interface (`models.backbone`): `begin`,
`run_block` and `head` run it piece by piece, the long-skip stack is the blocks' shared state, and
`skip_partner` names the out-block that reads each in-block's skip.

With `clip_dim` set it is the reference's text-to-image variant (`libs/uvit_t2i.py`): `y` holds each
sample's context tokens (`num_clip_token` x `clip_dim`, CLIP text features), projected by
`context_embed` and placed between the time token and the patches; there is no label embedding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone, BranchHook, CostParts, timestep_embedding, unpatchify


class Mlp(nn.Module):
    """Two-layer GELU MLP with the parameter names of timm's `Mlp` (fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        # B L (3 H D) -> 3 B H L D
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, length, dim).to(x.dtype)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse the long skip with `skip_linear`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, norm_layer=nn.LayerNorm, skip: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalConv2d(nn.Conv2d):
    """The output 3x3 convolution as a sum of shifted, weighted copies of the input (stride 1).

    Same parameters as `nn.Conv2d`. oneDNN's convolution and small matmuls round differently at
    different batch sizes (~1e-8, amplified to ~1e-4 over a sampling run); elementwise products
    summed in a fixed order do not, so a sample's image never depends on its batch. Off the CPU it is
    the plain convolution: one kernel instead of 27 for every head call (an early exit calls the head
    once per exit event), and batch independence is not promised on a GPU anyway (cuBLAS picks kernels
    by shape).

    Each output is bias + tap (0, 0) + tap (0, 1) + ... in that order, where a tap is its input channels'
    products summed by one `sum`. Without gradients every tap's products come from one multiplication of
    a windowed view (about 17 ops instead of 45: a head runs at every sampling step, and at batch 1 its
    ops are most of its time); with them, each tap is its own slice, so training's gradients keep the
    rounding the shipped checkpoints were trained with. Both give the same outputs bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        pad_h, pad_w = self.padding
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)).unsqueeze(1)  # B 1 C_in H W
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.weight, self.bias))
        taps = (self._taps_by_slices if needs_grad else self._taps_by_windows)(padded, x.shape[-2:])
        out = self.bias.view(1, -1, 1, 1)
        for tap in taps:
            out = out + tap
        return out

    def _taps_by_windows(self, padded: torch.Tensor, size: torch.Size) -> tuple[torch.Tensor, ...]:
        """Every tap's B C_out H W sum, from one product of the input's windows (a view) and the weights."""
        height, width = size
        windows = padded.unfold(3, height, 1).unfold(4, width, 1)  # B 1 C_in rows cols H W
        products = windows * self.weight.view(1, *self.weight.shape, 1, 1)
        return products.sum(dim=2).flatten(2, 3).unbind(2)

    def _taps_by_slices(self, padded: torch.Tensor, size: torch.Size) -> list[torch.Tensor]:
        """The same sums, a slice of the input per tap."""
        height, width = size
        rows, cols = self.kernel_size
        # every tap's weights as 1 C_out C_in 1 1, cut in one call
        weights = self.weight.permute(2, 3, 0, 1).reshape(rows * cols, 1, *self.weight.shape[:2], 1, 1).unbind(0)
        return [(padded[..., i:i + height, j:j + width] * weights[i * cols + j]).sum(dim=2)
                for i in range(rows) for j in range(cols)]


class UViT(nn.Module, Backbone):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm,
                 mlp_time_embed=False, num_classes=-1, use_checkpoint=False, conv=True, skip=True,
                 clip_dim=None, num_clip_token=0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()
        self.clip_dim, self.num_clip_token = clip_dim, num_clip_token
        if clip_dim:  # text-to-image: context tokens projected to the width
            self.context_embed = nn.Linear(clip_dim, embed_dim)
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        self.extras = 1 + num_clip_token if clip_dim else 2 if num_classes > 0 else 1  # time (+ context or label)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        def block(with_skip=False):
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, norm_layer, skip=with_skip)

        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip) for _ in range(depth // 2)])
        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = FinalConv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)

    # ---- the backbone interface (models.backbone) ------------------------------------------------
    head_reads_state = False  # the long skips are all fused before the head

    @property
    def block_kinds(self) -> tuple[str, ...]:
        """in-blocks, the mid-block, out-blocks (depth + 1 blocks in execution order)."""
        return ("in",) * len(self.in_blocks) + ("mid",) + ("out",) * len(self.out_blocks)

    def block_list(self) -> list[Block]:
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Image -> token sequence [label?, time, context?, patches] with positions added."""
        tokens = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim)).unsqueeze(1)
        if self.clip_dim:
            if y is None:
                raise ValueError("a text-to-image U-ViT needs its context tokens (y: B x tokens x clip_dim)")
            return torch.cat((time_token, self.context_embed(y), tokens), dim=1) + self.pos_embed
        tokens = torch.cat((time_token, tokens), dim=1)
        if y is not None:
            tokens = torch.cat((self.label_emb(y).unsqueeze(1), tokens), dim=1)
        return tokens + self.pos_embed

    def begin(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, SkipStack]:
        return self.embed(x, t, y), SkipStack([])

    def _block(self, index: int) -> tuple[Block, str]:
        """Block `index` in execution order, and its kind."""
        num_in = len(self.in_blocks)
        if index < num_in:
            return self.in_blocks[index], "in"
        if index == num_in:
            return self.mid_block, "mid"
        return self.out_blocks[index - num_in - 1], "out"

    def run_block(self, index: int, tokens: torch.Tensor, state: SkipStack,
                  branch: BranchHook | None = None) -> torch.Tensor:
        """Block `index`; in-blocks push their output onto the skip stack, out-blocks pop and fuse one."""
        block, kind = self._block(index)
        skip = state.skips.pop() if kind == "out" else None
        tokens = block(tokens, skip) if branch is None else _with_branches(block, tokens, skip, branch)
        if kind == "in":
            state.skips.append(tokens)
        return tokens

    def bypass_block(self, index: int, tokens: torch.Tensor, state: SkipStack, fuse_skip: bool = False) -> torch.Tensor:
        block, kind = self._block(index)
        if kind == "in":
            state.skips.append(tokens)
        elif kind == "out":
            skip = state.skips.pop()
            if fuse_skip and block.skip_linear is not None:
                tokens = block.skip_linear(torch.cat([tokens, skip], dim=-1))
        return tokens

    def head(self, tokens: torch.Tensor, state: SkipStack | None = None) -> torch.Tensor:
        """Token sequence -> eps image (norm, decoder_pred, drop extras, unpatchify, conv)."""
        patches = self.decoder_pred(self.norm(tokens))[:, self.extras:, :]
        return self.final_layer(unpatchify(patches, self.in_chans))

    def copy_head(self) -> UViTHead:
        """A trainable copy of the final head (an early exit's own head)."""
        return UViTHead(self)

    def skip_partner(self, index: int) -> int | None:
        """In-block i's output is fused by out-block num_blocks - 1 - i (when the model has skip fusions)."""
        fused = self.out_blocks[0].skip_linear is not None
        return self.num_blocks - 1 - index if fused and self._block(index)[1] == "in" else None

    def cost_parts(self) -> CostParts:
        names = ([f"in_blocks.{i}" for i in range(len(self.in_blocks))] + ["mid_block"]
                 + [f"out_blocks.{i}" for i in range(len(self.out_blocks))])
        branches = tuple({"attn": f"{name}.attn", "mlp": f"{name}.mlp",
                          "fusion": f"{name}.skip_linear" if block.skip_linear is not None else None}
                         for name, block in zip(names, self.block_list()))
        conv = self.final_layer  # runs as elementwise products (batch-invariant), which tracers do not see
        untraced = conv.weight.numel() * self.img_size * self.img_size if isinstance(conv, nn.Conv2d) else 0
        return CostParts(embed=("patch_embed", "time_embed", "label_emb", "context_embed", "pos_embed"),
                         blocks=tuple(names),
                         branches=branches, head=("norm", "decoder_pred", "final_layer"),
                         untraced_head_macs=float(untraced))

    def dummy_inputs(self) -> tuple[torch.Tensor, ...]:
        """One sample's (x, t[, y]) on the CPU; a text-to-image model's y is one prompt's context tokens."""
        if not self.clip_dim:
            return super().dummy_inputs()
        x = torch.zeros(1, self.in_chans, self.img_size, self.img_size)
        return x, torch.zeros(1), torch.zeros(1, self.num_clip_token, self.clip_dim)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.full_depth(x, timesteps, y)


class UViTHead(nn.Module):
    """A copy of U-ViT's final head (norm, decoder_pred, unpatchify, conv), called as head(tokens, state)."""

    def __init__(self, backbone: UViT):
        super().__init__()
        self.norm = copy.deepcopy(backbone.norm)
        self.decoder_pred = copy.deepcopy(backbone.decoder_pred)
        self.final_layer = copy.deepcopy(backbone.final_layer)
        self.extras, self.in_chans = backbone.extras, backbone.in_chans

    def forward(self, tokens: torch.Tensor, state: SkipStack | None = None) -> torch.Tensor:
        patches = self.decoder_pred(self.norm(tokens))[:, self.extras:, :]
        return self.final_layer(unpatchify(patches, self.in_chans))


@dataclass
class SkipStack:
    """U-ViT's block state: the in-blocks' outputs, waiting for the out-blocks that fuse them."""
    skips: list[torch.Tensor]

    def subset(self, rows: torch.Tensor) -> SkipStack:
        return SkipStack([skip[rows] for skip in self.skips])


def _with_branches(block: Block, x: torch.Tensor, skip: torch.Tensor | None, branch: BranchHook) -> torch.Tensor:
    """Block.forward with its attention and MLP branches passed through `branch` (see models.backbone)."""
    if block.skip_linear is not None:
        x = block.skip_linear(torch.cat([x, skip], dim=-1))
    x = x + branch("attn", lambda: block.attn(block.norm1(x)))
    return x + branch("mlp", lambda: block.mlp(block.norm2(x)))
