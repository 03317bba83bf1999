"""U-ViT backbone (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023).

Constructor arguments, parameter names and shapes and the forward `(x, timesteps, y=None) -> eps`
follow the reference implementation (repository baofff/U-ViT, `libs/uvit.py`), so its published
checkpoints load with `load_state_dict(strict=True)`. Attention goes through
`scaled_dot_product_attention`, in float32 as the reference's "flash" mode does.

Beyond the reference, the forward is split into `embed`, `blocks` and `head` so that the
exit-aware forward and the caching methods can run the network piece by piece.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


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
    summed in a fixed order do not, so a sample's image never depends on its batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = self.padding
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        out = self.bias.view(1, -1, 1, 1)
        for i in range(self.kernel_size[0]):
            for j in range(self.kernel_size[1]):
                window = padded[:, None, :, i:i + height, j:j + width]     # B 1 C_in H W
                taps = self.weight[None, :, :, i, j, None, None]            # 1 C_out C_in 1 1
                out = out + (window * taps).sum(dim=2)
        return out


class UViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm,
                 mlp_time_embed=False, num_classes=-1, use_checkpoint=False, conv=True, skip=True):
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
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        self.extras = 2 if num_classes > 0 else 1  # time token (+ label token)
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

    # ---- the network in pieces -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks in execution order: in-blocks, mid-block, out-blocks (depth + 1 of them)."""
        return len(self.in_blocks) + 1 + len(self.out_blocks)

    def block_list(self) -> list[Block]:
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Image -> token sequence [label?, time, patches] with positions added."""
        tokens = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim)).unsqueeze(1)
        tokens = torch.cat((time_token, tokens), dim=1)
        if y is not None:
            tokens = torch.cat((self.label_emb(y).unsqueeze(1), tokens), dim=1)
        return tokens + self.pos_embed

    def run_block(self, index: int, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Run block `index` (execution order); in-blocks push onto `skips`, out-blocks pop from it."""
        num_in = len(self.in_blocks)
        if index < num_in:
            tokens = self.in_blocks[index](tokens)
            skips.append(tokens)
            return tokens
        if index == num_in:
            return self.mid_block(tokens)
        return self.out_blocks[index - num_in - 1](tokens, skips.pop())

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token sequence -> eps image (norm, decoder_pred, drop extras, unpatchify, conv)."""
        patches = self.decoder_pred(self.norm(tokens))[:, self.extras:, :]
        return self.final_layer(unpatchify(patches, self.in_chans))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(x, timesteps, y)
        skips: list[torch.Tensor] = []
        for index in range(self.num_blocks):
            tokens = self.run_block(index, tokens, skips)
        return self.head(tokens)
