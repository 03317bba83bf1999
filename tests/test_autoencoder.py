"""The latent decoder: a random diffusers AutoencoderKL written out in SD's original key layout (by this
test's own key map), read back through diffusers' single-file helpers, decodes identically; the suite
undoes the latents' scale; decoding's MACs agree with torch's dispatch-level count."""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKL

from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops
from adadiff_bench.models.autoencoder import LatentDecoder, load_autoencoder

# a small KL autoencoder: two levels (2x down/upsampling), one resnet per level, width 32 (GroupNorm's 32 groups)
SMALL = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
             num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def random_small_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], latent_channels=4,
                        layers_per_block=1).eval()
    with torch.no_grad():  # every parameter random, norms included, so a misplaced tensor shows
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return vae


def to_original_layout(state: dict, num_levels: int) -> dict:
    """diffusers AutoencoderKL names -> the original SD (CompVis) names, written from the two layouts."""
    renames = [
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.", r"\1.mid.attn_1.q."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.", r"\1.mid.attn_1.k."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.", r"\1.mid.attn_1.v."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        # the decoder's up blocks run in the opposite order of SD's `up` list
        (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.",
         lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    original = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # SD's attention projections are 1x1 convolutions
        original[key] = value.clone()
    return original


@pytest.fixture
def small_release(tmp_path):
    vae = random_small_vae()
    original = to_original_layout(vae.state_dict(), num_levels=2)
    assert any(key.startswith("decoder.up.1.upsample.") for key in original)  # the map did rename
    path = tmp_path / "autoencoder_kl.pth"
    torch.save(original, path)
    return vae, path


def test_original_layout_converted_by_diffusers_decodes_identically(small_release):
    vae, path = small_release
    loaded = load_autoencoder(str(path), scale_factor=0.5, ddconfig=SMALL)
    assert list(loaded.config.block_out_channels) == [32, 64]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents).sample, vae.decode(latents).sample)
        assert torch.equal(loaded.encode(images).latent_dist.mean, vae.encode(images).latent_dist.mean)


@pytest.mark.parametrize("scale_factor", [0.18215, 0.23010])
def test_the_suite_undoes_the_scale_and_decodes_in_batches(small_release, scale_factor):
    vae, path = small_release
    decoder = LatentDecoder(load_autoencoder(str(path), scale_factor, SMALL), scale_factor)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vae.decode(latents / scale_factor).sample  # diffusers' decode takes unscaled latents
    assert torch.allclose(decoder.decode(latents, batch_size=2), expected, atol=1e-5)


def test_decode_macs_agree_with_the_dispatch_count(small_release):
    vae, path = small_release
    decoder = LatentDecoder(load_autoencoder(str(path), 0.18215, SMALL), 0.18215)
    latents = torch.randn(1, 4, 8, 8)
    flops = dispatch_flops(lambda: decoder.decode(latents, 1))
    assert decoder.macs_per_image((4, 8, 8)) == pytest.approx(flops / 2, rel=0.02)


def test_a_file_of_another_layout_is_one_line(tmp_path):
    path = tmp_path / "autoencoder_kl.pth"
    torch.save({"decoder.conv_in.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError) as error:
        load_autoencoder(str(path), 0.18215, SMALL)
    assert len(str(error.value).splitlines()) == 1 and "autoencoder_kl.pth" in str(error.value)


def test_the_decode_stage_keeps_uint8_images_and_says_when_a_value_was_not_finite(small_release):
    from adadiff_bench.data import to_uint8
    from adadiff_bench.models.autoencoder import decode_stage

    _, path = small_release
    decoder = LatentDecoder(load_autoencoder(str(path), 0.18215, SMALL), 0.18215)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        samples, finite, info = decode_stage(decoder, latents, batch_size=2)
        expected = to_uint8(decoder.decode(latents, batch_size=2))  # decoded whole in float, then converted
    assert samples.dtype == torch.uint8 and finite and torch.equal(samples, expected)
    assert info["decode_time_per_image_s"] > 0
    latents[3, 0, 0, 0] = float("nan")  # one bad latent in the second batch
    with torch.no_grad():
        assert decode_stage(decoder, latents, batch_size=2)[1] is False
