"""The latent presets' decoder: Stable Diffusion's KL autoencoder as diffusers' `AutoencoderKL`.

U-ViT's release (`stable-diffusion/autoencoder_kl.pth`, `autoencoder_kl_ema.pth`) is a plain state
dict in SD's original layout (`encoder.down.0.block.0...`, `quant_conv`, `post_quant_conv`). It is
converted by diffusers' own single-file helpers (`convert_ldm_vae_checkpoint`, with the config from
`create_vae_diffusers_config_from_ldm` fed the ddconfig below, so nothing is fetched from the Hub)
and loaded strictly. A diffusers folder (`save_pretrained` layout, e.g. `stabilityai/sd-vae-ft-ema`, which DiT's
FID decodes with) is read as its config.json, checked against SD's architecture, and its safetensors (or
weights-only .bin), loaded strictly into that architecture. `AutoencoderKL.decode` does not undo the latents'
scale: `LatentDecoder` does (z / scale_factor, U-ViT's `decode`). Decoding is its own stage with its own cost (MACs measured once
with fvcore, as the network's), time and memory.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

from ..checkpoints import (diffusers_weights_file, load_state_dict_strict, read_checkpoint, read_diffusers_config,
                           read_diffusers_weights)
from ..errors import UserError
from .presets import SD_DDCONFIG



def ldm_config(ddconfig: dict, scale_factor: float) -> dict:
    """The part of an LDM yaml config that diffusers' VAE helpers read."""
    return {"model": {"params": {"scale_factor": scale_factor, "first_stage_config": {
        "params": {"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig}}}}}


def autoencoder_from_ldm_state(state: dict, path: str, scale_factor: float,
                               ddconfig: dict = SD_DDCONFIG) -> AutoencoderKL:
    """A float32 AutoencoderKL in eval mode from a state dict in SD's original layout (strict)."""
    config = create_vae_diffusers_config_from_ldm(ldm_config(ddconfig, scale_factor), state)
    try:
        converted = convert_ldm_vae_checkpoint(state, config)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"autoencoder {path!r} is not in SD's KL-autoencoder layout ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); use U-ViT's stable-diffusion/autoencoder_kl.pth") from None
    vae = AutoencoderKL(**config)
    load_state_dict_strict(vae, converted, path)
    return vae.float().eval()


def load_autoencoder(path: str, scale_factor: float, ddconfig: dict = SD_DDCONFIG) -> AutoencoderKL:
    """U-ViT's released autoencoder file (opened with weights_only=True), or a diffusers folder, as an
    AutoencoderKL."""
    if Path(path).is_dir():
        return load_diffusers_autoencoder(Path(path), scale_factor, ddconfig)
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise UserError(f"autoencoder {path!r} is not a state dict; use U-ViT's stable-diffusion/autoencoder_kl.pth")
    return autoencoder_from_ldm_state(state, path, scale_factor, ddconfig)


# what a diffusers folder's config.json must agree on with SD's architecture (the rest is taken from ddconfig)
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                     "down_block_types", "up_block_types")


def load_diffusers_autoencoder(folder: Path, scale_factor: float, ddconfig: dict = SD_DDCONFIG) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder, built as SD's architecture (`ddconfig`) and loaded strictly: its
    config.json only has to agree with that architecture, so a hostile one cannot size anything."""
    weights = diffusers_weights_file(folder)
    if not (folder / "config.json").is_file() or weights is None:
        raise UserError(f"autoencoder {str(folder)!r} is not a diffusers AutoencoderKL folder: it needs config.json "
                        "and diffusion_pytorch_model.safetensors (the layout `save_pretrained` writes)")
    table = read_diffusers_config(folder / "config.json")
    expected = create_vae_diffusers_config_from_ldm(ldm_config(ddconfig, scale_factor), {})
    if table.get("_class_name") != "AutoencoderKL":
        raise UserError(f"autoencoder {str(folder)!r}: config.json does not describe an AutoencoderKL; point "
                        "`autoencoder` at SD's KL autoencoder folder")
    differs = [key for key in ARCHITECTURE_KEYS if key in table and table[key] != expected[key]]
    if differs:
        raise UserError(f"autoencoder {str(folder)!r} is not SD's KL autoencoder ({', '.join(differs)} differ); point "
                        "`autoencoder` at stabilityai/sd-vae-ft-ema or another SD VAE folder")
    vae = AutoencoderKL(**expected)
    load_state_dict_strict(vae, read_diffusers_weights(weights), str(folder))
    return vae.float().eval()


class _Decode(torch.nn.Module):
    """Scaled latents -> images: what one decode costs (post_quant_conv and the decoder)."""

    def __init__(self, vae: AutoencoderKL, scale_factor: float):
        super().__init__()
        self.vae, self.scale_factor = vae, scale_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale_factor).sample


@dataclass
class LatentDecoder:
    """A latent model's decoding stage: latents as the sampler leaves them -> images in [-1, 1]."""
    vae: AutoencoderKL
    scale_factor: float

    def to(self, device: torch.device | str) -> LatentDecoder:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Decode in batches on the decoder's device; float32 images on the CPU."""
        device = next(self.vae.parameters()).device
        decode = _Decode(self.vae, self.scale_factor)
        return torch.cat([decode(part.to(device).float()).cpu() for part in latents.split(batch_size)])

    def macs_per_image(self, latent_shape: tuple[int, ...]) -> float:
        """MACs of decoding one latent (fvcore, the network's convention: norms and activations not counted)."""
        from ..flops import count_macs
        module = _Decode(self.vae, self.scale_factor)
        if next(self.vae.parameters()).device.type != "cpu":  # costs depend on shapes: trace a CPU copy
            module = _Decode(AutoencoderKL.from_config(self.vae.config), self.scale_factor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(count_macs(module.eval(), (torch.zeros(1, *latent_shape),)).total())


def decode_stage(decoder: LatentDecoder, latents: torch.Tensor, batch_size: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, bool, dict]:
    """A cell's latents decoded as a stage of its own: (uint8 NHWC-ready images, whether every decoded value was
    finite, its wall-clock time per image and peak memory). Each batch becomes uint8 as soon as it is decoded, so
    a cell holds 1 byte per image value, not float32's 4 (50,000 images at 256 px: 9 GiB, not 37)."""
    from ..data import to_uint8
    from ..memory import PeakMemory
    parts, finite = [], True
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        for part in latents.split(batch_size):
            images = decoder.decode(part, batch_size)  # ends with a copy to the CPU: the device is done
            finite = finite and bool(torch.isfinite(images).all())
            parts.append(to_uint8(torch.nan_to_num(images)))
        seconds = time.perf_counter() - start
    info = {"decode_time_per_image_s": seconds / max(len(latents), 1), "decode_peak_mem_mb": peak.mb}
    return torch.cat(parts), finite, info
