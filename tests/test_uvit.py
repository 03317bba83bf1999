"""The U-ViT backbone: reference-compatible names and shapes, and its output against a plain re-computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adadiff_bench.checkpoints import build_model, load_model, load_state_dict_strict
from adadiff_bench.config import UViTConfig
from adadiff_bench.errors import UserError
from adadiff_bench.models.uvit import patchify, unpatchify


def reference_state_dict_shapes(c: UViTConfig) -> dict[str, tuple]:
    """Parameter names and shapes of the reference U-ViT (baofff/U-ViT libs/uvit.py), written out by hand."""
    d, hidden, patch_dim = c.embed_dim, int(c.embed_dim * c.mlp_ratio), c.patch_size ** 2 * c.in_chans
    tokens = (c.img_size // c.patch_size) ** 2 + (2 if c.num_classes > 0 else 1)
    shapes = {"pos_embed": (1, tokens, d), "patch_embed.proj.weight": (d, c.in_chans, c.patch_size, c.patch_size),
              "patch_embed.proj.bias": (d,)}
    if c.mlp_time_embed:
        shapes.update({"time_embed.0.weight": (4 * d, d), "time_embed.0.bias": (4 * d,),
                       "time_embed.2.weight": (d, 4 * d), "time_embed.2.bias": (d,)})
    if c.num_classes > 0:
        shapes["label_emb.weight"] = (c.num_classes, d)

    def block(prefix, skip):
        out = {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
               f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
               f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
               f"{prefix}.mlp.fc1.weight": (hidden, d), f"{prefix}.mlp.fc1.bias": (hidden,),
               f"{prefix}.mlp.fc2.weight": (d, hidden), f"{prefix}.mlp.fc2.bias": (d,)}
        if c.qkv_bias:
            out[f"{prefix}.attn.qkv.bias"] = (3 * d,)
        if skip:
            out.update({f"{prefix}.skip_linear.weight": (d, 2 * d), f"{prefix}.skip_linear.bias": (d,)})
        return out

    for i in range(c.depth // 2):
        shapes.update(block(f"in_blocks.{i}", False))
        shapes.update(block(f"out_blocks.{i}", c.skip))
    shapes.update(block("mid_block", False))
    shapes.update({"norm.weight": (d,), "norm.bias": (d,), "decoder_pred.weight": (patch_dim, d),
                   "decoder_pred.bias": (patch_dim,)})
    if c.conv:
        shapes.update({"final_layer.weight": (c.in_chans, c.in_chans, 3, 3), "final_layer.bias": (c.in_chans,)})
    return shapes


CONFIGS = [
    UViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2),
    UViTConfig(img_size=8, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3, qkv_bias=True,
               mlp_time_embed=True, num_classes=10, conv=False, mlp_ratio=2.0),
    # CIFAR-10's published U-ViT-S/2 (13 blocks) has these arguments
    UViTConfig(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
               qkv_bias=False, mlp_time_embed=False, num_classes=-1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["digits-tiny", "conditional", "cifar10-uvit-s2"])
def test_parameter_names_and_shapes_match_reference(config):
    model = build_model(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference_state_dict_shapes(config)


def test_reference_format_state_dict_loads_strictly_and_gives_same_output():
    config = CONFIGS[1]
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=generator) * 0.1 for k, shape in reference_state_dict_shapes(config).items()}
    model = build_model(config)
    load_state_dict_strict(model, state, "constructed")
    x = torch.randn(3, 3, 8, 8, generator=generator)
    t = torch.tensor([0.0, 500.0, 999.0])
    y = torch.tensor([1, 5, 9])
    assert torch.allclose(model.eval()(x, t, y), plain_uvit(state, config, x, t, y), atol=1e-5, rtol=1e-4)


def plain_uvit(p: dict, c: UViTConfig, x, t, y=None):
    """A straightforward re-computation of U-ViT's forward from raw parameters (explicit softmax attention)."""
    def linear(h, name, bias=True):
        out = h @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if bias else out

    def layer_norm(h, name):
        return F.layer_norm(h, (h.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    def block(h, name, skip=None):
        if skip is not None:
            h = linear(torch.cat([h, skip], -1), f"{name}.skip_linear")
        a = layer_norm(h, f"{name}.norm1")
        qkv = linear(a, f"{name}.attn.qkv", bias=c.qkv_bias)
        b, n, _ = qkv.shape
        head_dim = c.embed_dim // c.num_heads
        q, k, v = qkv.view(b, n, 3, c.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(b, n, c.embed_dim)
        h = h + linear(a, f"{name}.attn.proj")
        m = layer_norm(h, f"{name}.norm2")
        return h + linear(F.gelu(linear(m, f"{name}.mlp.fc1")), f"{name}.mlp.fc2")

    tokens = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=c.patch_size)
    tokens = tokens.flatten(2).transpose(1, 2)
    half = c.embed_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(angles), torch.sin(angles)], -1)
    if c.mlp_time_embed:
        temb = linear(F.silu(linear(temb, "time_embed.0")), "time_embed.2")
    h = torch.cat([temb[:, None], tokens], 1)
    if y is not None:
        h = torch.cat([p["label_emb.weight"][y][:, None], h], 1)
    h = h + p["pos_embed"]
    skips = []
    for i in range(c.depth // 2):
        h = block(h, f"in_blocks.{i}")
        skips.append(h)
    h = block(h, "mid_block")
    for i in range(c.depth // 2):
        h = block(h, f"out_blocks.{i}", skips.pop() if c.skip else None)
    h = linear(layer_norm(h, "norm"), "decoder_pred")[:, (2 if y is not None else 1):]
    side = c.img_size // c.patch_size
    img = h.view(len(x), side, side, c.patch_size, c.patch_size, c.in_chans)
    img = img.permute(0, 5, 1, 3, 2, 4).reshape(len(x), c.in_chans, c.img_size, c.img_size)
    return F.conv2d(img, p["final_layer.weight"], p["final_layer.bias"], padding=1) if c.conv else img


def test_forward_matches_plain_recomputation(tiny_model):
    from conftest import TINY
    state = tiny_model.state_dict()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 250, 600, 999])
    with torch.no_grad():
        ours = tiny_model(x, t)
    assert torch.allclose(ours, plain_uvit(state, TINY, x, t), atol=1e-5, rtol=1e-4)
    assert ours.abs().mean() > 1e-3  # not a trivially zero output


def test_patchify_round_trip():
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(images, 2), 3), images)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path, tiny_model):
    from conftest import TINY
    state = tiny_model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.weight"]
    torch.save(state, tmp_path / "raw.pt")
    with pytest.raises(UserError, match=r"missing: norm.weight.*unexpected: extra.weight"):
        load_model(tmp_path / "raw.pt", config=TINY)


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_model(broken)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_checkpoint_round_trip_in_half_precision(tmp_path, tiny_model):
    from adadiff_bench.checkpoints import save_checkpoint
    from conftest import TINY
    save_checkpoint(tmp_path / "half.pt", tiny_model, TINY, half=True)
    loaded = load_model(tmp_path / "half.pt")
    for name, value in tiny_model.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], value, atol=1e-3, rtol=1e-3)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
