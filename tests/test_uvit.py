"""The U-ViT backbone: reference-compatible names and shapes, its output against a plain re-computation, the
backbone interface it implements (begin / run_block / bypass_block / head, skip partners, block state, costs),
and the checkpoint format registry."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from adadiff_bench.checkpoints import build_model, load_model, load_state_dict_strict
from adadiff_bench.config import UViTConfig
from adadiff_bench.errors import UserError
from adadiff_bench.models.backbone import patchify, timestep_embedding, unpatchify
from adadiff_bench.models.uvit import FinalConv2d
from conftest import TINY, plain_blocks


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
    state = tiny_model.state_dict()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 250, 600, 999])
    with torch.no_grad():
        ours = tiny_model(x, t)
    assert torch.allclose(ours, plain_uvit(state, TINY, x, t), atol=1e-5, rtol=1e-4)
    assert ours.abs().mean() > 1e-3  # not a trivially zero output


def test_final_conv_sums_shifted_copies_on_the_cpu_and_convolves_elsewhere():
    """The CPU's batch-independent sum of shifted copies computes the convolution; off the CPU (here "meta", as
    on a GPU) the layer runs nn.Conv2d's one convolution instead."""
    layer = build_model(TINY).final_layer
    x = torch.randn(3, TINY.in_chans, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mock.patch.object(torch.nn.Conv2d, "_conv_forward",
                                            autospec=True, side_effect=torch.nn.Conv2d._conv_forward) as conv:
        summed = layer(x)
        assert conv.call_count == 0
        assert torch.allclose(summed, F.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-6, rtol=1e-5)
        assert torch.equal(layer(x[1:2]), summed[1:2])  # batch independent on the CPU
        assert layer.to("meta")(x.to("meta")).shape == x.shape and conv.call_count == 1


def sequential_conv(layer: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Brute force in the layer's order: bias, then tap (0, 0), (0, 1), ... each summed over input channels in
    order, one output pixel at a time, in float32."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.empty(len(x), weight.shape[0], *x.shape[-2:])
    for b in range(len(x)):
        for o in range(weight.shape[0]):
            for row in range(x.shape[-2]):
                for col in range(x.shape[-1]):
                    total = bias[o]
                    for i in range(3):
                        for j in range(3):
                            tap = padded[b, 0, row + i, col + j] * weight[o, 0, i, j]
                            for c in range(1, x.shape[1]):
                                tap = tap + padded[b, c, row + i, col + j] * weight[o, c, i, j]
                            total = total + tap
                    out[b, o, row, col] = total
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_final_conv_gives_the_same_bits_with_and_without_gradients(channels):
    """Sampling (no gradients) takes every tap from one windowed product, training a slice per tap: the same
    outputs bit for bit, each the brute-force sum in the layer's order, and none depends on its batch."""
    torch.manual_seed(channels)
    layer = FinalConv2d(channels, channels, 3, padding=1)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(4, channels, 6, 6)
    with mock.patch.object(FinalConv2d, "_taps_by_windows", autospec=True,
                           side_effect=FinalConv2d._taps_by_windows) as windows:
        with torch.no_grad():
            sampled, alone = layer(x), layer(x[2:3])
        assert windows.call_count == 2
        trained = layer(x.clone().requires_grad_())
        assert windows.call_count == 2  # the gradient path cut slices
    assert torch.equal(sampled, trained.detach()) and torch.equal(alone, sampled[2:3])
    assert torch.equal(sampled, sequential_conv(layer, x))
    trained.square().sum().backward()
    reference = torch.nn.Conv2d(channels, channels, 3, padding=1)
    reference.load_state_dict(layer.state_dict())
    F.conv2d(x, reference.weight, reference.bias, padding=1).square().sum().backward()
    assert torch.allclose(layer.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)


def test_timestep_frequencies_are_made_once_with_the_same_bits(monkeypatch):
    from adadiff_bench.models import backbone
    monkeypatch.setattr(backbone, "_FREQUENCIES", {})  # made here, first under inference mode
    t = torch.tensor([0.0, 1.5, 250.0, 999.0])
    half = 32
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    with torch.inference_mode():  # the cached frequencies must still serve training afterwards
        assert torch.equal(timestep_embedding(t, 2 * half), expected)
    grad_t = t.clone().requires_grad_()
    embedded = timestep_embedding(grad_t, 2 * half)
    assert torch.equal(embedded.detach(), expected)
    embedded.sum().backward()
    angles = t[:, None] * freqs
    assert torch.allclose(grad_t.grad, (torch.cos(angles) * freqs - torch.sin(angles) * freqs).sum(1))


def test_patchify_round_trip():
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(images, 2), 3), images)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path, tiny_model):
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
    save_checkpoint(tmp_path / "half.pt", tiny_model, TINY, half=True)
    loaded = load_model(tmp_path / "half.pt")
    for name, value in tiny_model.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], value, atol=1e-3, rtol=1e-3)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


# ---- the backbone interface on U-ViT ----------------------------------------------------------------

def interface_inputs(config: UViTConfig, batch: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_chans, config.img_size, config.img_size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator) if config.num_classes > 0 else None
    return x, t, y


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["digits-tiny", "conditional"])
def test_begin_run_block_head_equal_forward_and_plain_module_calls_bit_for_bit(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    x, t, y = interface_inputs(config)
    with torch.no_grad():
        tokens, state = model.begin(x, t, y)
        for index in range(model.num_blocks):
            tokens = model.run_block(index, tokens, state)
        eps = model.head(tokens, state)
        assert state.skips == []  # every in-block's skip was popped by its out-block
        # the same pieces, independent of the interface: embed, plain block calls, an explicit skip list
        skips = []
        plain = plain_blocks(model, model.embed(x, t, y), range(len(model.block_list())), skips)
        assert torch.equal(eps, model(x, t, y))
        assert torch.equal(eps, model.head(plain, None))
    assert model.num_blocks == config.depth + 1


def test_block_kinds_tokens_and_architecture_describe_the_model():
    model = build_model(TINY)
    assert model.block_kinds == ("in", "in", "mid", "out", "out") and model.num_blocks == 5
    assert model.num_tokens == 1 + 16
    assert build_model(CONFIGS[1]).num_tokens == 2 + 4  # label and time tokens, 2x2 patches
    arch = model.architecture
    assert (arch.in_chans, arch.img_size, arch.patch_size, arch.embed_dim, arch.num_blocks) == (1, 8, 2, 32, 5)
    assert arch.block_kinds == model.block_kinds
    assert build_model(TINY).architecture == arch
    assert build_model(UViTConfig(**{**TINY.__dict__, "depth": 2})).architecture != arch


def test_skip_partner_pairs_in_block_i_with_out_block_n_minus_1_minus_i():
    model = build_model(CONFIGS[2])  # 13 blocks: in 0-5, mid 6, out 7-12
    n = model.num_blocks
    assert [model.skip_partner(i) for i in range(n)] == [12, 11, 10, 9, 8, 7] + [None] * 7
    assert model.has_long_skips
    # each out-block really fuses its partner's output: the skip it pops is that in-block's
    x, t, _ = interface_inputs(CONFIGS[2], batch=1)
    with torch.no_grad():
        tokens, state = model.begin(x, t, None)
        outputs = {}
        for index in range(n):
            if model.block_kinds[index] == "out":
                popped = state.skips[-1]
                assert popped is outputs[[i for i in range(n) if model.skip_partner(i) == index][0]]
            tokens = outputs[index] = model.run_block(index, tokens, state)
    no_skips = build_model(UViTConfig(**{**TINY.__dict__, "skip": False}))
    assert [no_skips.skip_partner(i) for i in range(no_skips.num_blocks)] == [None] * 5
    assert not no_skips.has_long_skips


def test_a_branch_hook_that_returns_compute_changes_nothing_and_sees_each_branch_once(tiny_model):
    x, t, _ = interface_inputs(TINY)
    seen = []

    def hook_of(index):
        def branch(name, compute):
            seen.append((index, name))
            return compute()
        return branch

    with torch.no_grad():
        tokens, state = tiny_model.begin(x, t, None)
        for index in range(tiny_model.num_blocks):
            tokens = tiny_model.run_block(index, tokens, state, branch=hook_of(index))
        assert torch.equal(tiny_model.head(tokens, state), tiny_model(x, t))
    assert seen == [(index, name) for index in range(5) for name in ("attn", "mlp")]


def test_what_a_branch_hook_returns_is_what_the_block_adds(tiny_model):
    x, t, _ = interface_inputs(TINY)
    with torch.no_grad():
        tokens, state = tiny_model.begin(x, t, None)
        for index in range(3):
            tokens = tiny_model.run_block(index, tokens, state)
        block_input, skip = tokens, state.skips[-1]
        # out-block 3 with its attention replaced by zeros and its MLP by a constant
        constant = torch.full_like(block_input, 0.25)
        out = tiny_model.run_block(3, tokens, state,
                                   branch=lambda name, compute: torch.zeros_like(constant) if name == "attn"
                                   else constant)
        block = tiny_model.out_blocks[0]
        fused = block.skip_linear(torch.cat([block_input, skip], dim=-1))
        assert torch.equal(out, fused + 0.25)
        assert len(state.skips) == 1  # the out-block popped its skip all the same


def test_bypass_block_keeps_the_skip_stack_aligned(tiny_model):
    x, t, _ = interface_inputs(TINY)
    with torch.no_grad():
        tokens, state = tiny_model.begin(x, t, None)
        tokens = tiny_model.run_block(0, tokens, state)
        # a bypassed in-block pushes the tokens it was given as its skip, and returns them unchanged
        bypassed = tiny_model.bypass_block(1, tokens, state)
        assert bypassed is tokens and len(state.skips) == 2 and state.skips[-1] is tokens
        # the mid-block: nothing to keep
        assert tiny_model.bypass_block(2, tokens, state) is tokens and len(state.skips) == 2
        # an out-block pops its skip; without fuse_skip the tokens pass through unchanged
        assert tiny_model.bypass_block(3, tokens, state) is tokens and len(state.skips) == 1
        # with fuse_skip it applies its skip_linear to cat(tokens, skip)
        skip = state.skips[-1]
        fused = tiny_model.bypass_block(4, tokens, state, fuse_skip=True)
        assert torch.equal(fused, tiny_model.out_blocks[1].skip_linear(torch.cat([tokens, skip], dim=-1)))
        assert state.skips == []
        # the forward with in-block 1 bypassed equals a plain computation where that block is the identity
        tokens, state = tiny_model.begin(x, t, None)
        for index in range(5):
            tokens = (tiny_model.bypass_block if index == 1 else tiny_model.run_block)(index, tokens, state)
        blocks = tiny_model.block_list()
        h0 = blocks[0](tiny_model.embed(x, t))
        h = blocks[2](h0)
        h = blocks[4](blocks[3](h, h0), h0)
        assert torch.equal(tokens, h)


def test_state_subset_takes_rows_of_every_skip_as_a_new_object(tiny_model):
    x, t, _ = interface_inputs(TINY, batch=5)
    with torch.no_grad():
        tokens, state = tiny_model.begin(x, t, None)
        for index in range(2):
            tokens = tiny_model.run_block(index, tokens, state)
    mask = torch.tensor([True, False, True, False, True])
    for rows in (mask, torch.tensor([4, 0])):
        sub = state.subset(rows)
        assert sub is not state and len(sub.skips) == 2
        assert all(torch.equal(a, b[rows]) for a, b in zip(sub.skips, state.skips))
        sub.skips.pop()
        assert len(state.skips) == 2  # the original is untouched
    # a subset runs the rest of the network as those rows of the whole batch would
    with torch.no_grad():
        sub, rest = state.subset(mask), tokens[mask]
        whole = tokens
        for index in range(2, 5):
            rest = tiny_model.run_block(index, rest, sub)
            whole = tiny_model.run_block(index, whole, state)
        assert torch.allclose(rest, whole[mask], atol=1e-6)


def test_copy_head_is_a_separate_copy_that_computes_the_head(tiny_model):
    head = tiny_model.copy_head()
    tokens = torch.randn(3, tiny_model.num_tokens, TINY.embed_dim)
    with torch.no_grad():
        assert torch.equal(head(tokens, None), tiny_model.head(tokens, None))
        next(head.parameters()).add_(1.0)
        assert not torch.equal(head(tokens, None), tiny_model.head(tokens, None))
    own = {id(p) for p in tiny_model.parameters()}
    assert not any(id(p) in own for p in head.parameters())


@pytest.mark.parametrize("config", CONFIGS, ids=["digits-tiny", "conditional", "cifar10-uvit-s2"])
def test_cost_parts_cover_every_parameter_exactly_once(config):
    model = build_model(config)
    parts = model.cost_parts()
    names = [*parts.embed, *parts.blocks, *parts.head]
    owners = {}
    for param_name, _ in model.named_parameters():
        owner = [n for n in names if param_name == n or param_name.startswith(n + ".")]
        assert len(owner) == 1, (param_name, owner)
        owners[param_name] = owner[0]
    assert len(parts.blocks) == len(parts.branches) == model.num_blocks
    for block_name, branches, kind in zip(parts.blocks, parts.branches, model.block_kinds):
        assert branches["attn"] == f"{block_name}.attn" and branches["mlp"] == f"{block_name}.mlp"
        assert (branches["fusion"] is not None) == (kind == "out" and config.skip)
    conv_macs = config.in_chans ** 2 * 9 * config.img_size ** 2 if config.conv else 0
    assert parts.untraced_head_macs == conv_macs


def test_patchify_and_unpatchify_live_in_the_backbone_module():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # patch (row 0, col 1) of sample 0 holds pixels [0:2, 2:4] of every channel, channel last
    expected = images[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], expected)
    with pytest.raises(ValueError, match="cannot unpatchify"):
        unpatchify(torch.zeros(1, 5, 12), 3)


# ---- the checkpoint format registry ---------------------------------------------------------------

def test_a_file_of_another_format_is_refused_in_one_line_naming_both(tmp_path, tiny_checkpoint):
    from adadiff_bench.checkpoints import load_checkpoint
    from adadiff_bench.methods.registry import baseline_module
    baseline_module("berxit")  # registers its format
    with pytest.raises(UserError) as error:
        load_checkpoint(tiny_checkpoint, "adadiff-bench/berxit", "methods[1]")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"methods[1]: '{tiny_checkpoint}' is a U-ViT (adadiff-bench/uvit), "
                              "not a BERxiT checkpoint")
    assert "train one with `adadiff-bench train --config configs/berxit_digits.toml`" in message
    # several accepted formats are all named
    with pytest.raises(UserError, match=r"is a U-ViT \(adadiff-bench/uvit\), not an AdaDiff network .* or an official"):
        load_checkpoint(tiny_checkpoint, ("adadiff-bench/adadiff", "adadiff-official"))
    assert isinstance(load_checkpoint(tiny_checkpoint, "adadiff-bench/uvit"), type(build_model(TINY)))


def test_a_file_with_an_unknown_format_value_is_refused(tmp_path, tiny_checkpoint):
    from adadiff_bench.checkpoints import load_checkpoint, open_checkpoint
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["format"] = "someone-else/model"
    torch.save(payload, tmp_path / "foreign.pt")
    for load in (open_checkpoint, load_checkpoint):
        with pytest.raises(UserError) as error:
            load(tmp_path / "foreign.pt")
        assert "\n" not in str(error.value)
        assert "not a checkpoint this suite knows (format 'someone-else/model'); known formats: " in str(error.value)
        assert "adadiff-bench/uvit" in str(error.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a checkpoint this suite knows; known formats"):
        open_checkpoint(tmp_path / "list.pt")


def test_load_model_refuses_a_file_with_an_unknown_format_value(tmp_path, tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["format"] = "someone-else/model"
    torch.save(payload, tmp_path / "foreign.pt")
    for config in (None, TINY):
        with pytest.raises(UserError, match=r"not a checkpoint this suite knows \(format 'someone-else/model'\)"):
            load_model(tmp_path / "foreign.pt", config=config)


def test_open_checkpoint_names_the_format_of_ours_and_of_published_state_dicts(tmp_path, tiny_model, tiny_checkpoint):
    from adadiff_bench.checkpoints import FORMAT, UVIT_STATE_DICT, checkpoint_format, open_checkpoint
    fmt, payload = open_checkpoint(tiny_checkpoint)
    assert fmt.name == FORMAT and payload["format"] == FORMAT
    torch.save(tiny_model.state_dict(), tmp_path / "published.pt")
    assert checkpoint_format(tmp_path / "published.pt").name == UVIT_STATE_DICT
    loaded = load_model(tmp_path / "published.pt", config=TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_model.state_dict().values()))
    with pytest.raises(UserError, match="plain state dict without a model config"):
        load_model(tmp_path / "published.pt")


def test_register_format_refuses_a_second_format_under_a_taken_name():
    from adadiff_bench.checkpoints import FORMAT, CheckpointFormat, register_format
    with pytest.raises(ValueError, match="already registered"):
        register_format(CheckpointFormat(FORMAT, "something else", lambda payload, path: payload))


def test_cached_checkpoint_is_shared_until_the_file_changes(tmp_path, tiny_model):
    import os
    from adadiff_bench.checkpoints import cached_checkpoint, save_checkpoint
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model, TINY)
    first = cached_checkpoint(path, "adadiff-bench/uvit")
    assert cached_checkpoint(path, "adadiff-bench/uvit") is first
    torch.manual_seed(11)
    other = build_model(TINY)
    before = os.stat(path).st_mtime_ns
    save_checkpoint(path, other, TINY)  # same size, new weights
    assert os.stat(path).st_mtime_ns != before
    second = cached_checkpoint(path, "adadiff-bench/uvit")
    assert second is not first
    assert torch.equal(second.pos_embed, other.pos_embed) and not torch.equal(first.pos_embed, other.pos_embed)
    assert cached_checkpoint(path, "adadiff-bench/uvit") is second
