"""Published releases into a run: a preset's network from U-ViT's or AdaDiff's `nnet_ema.pth` (or a DiT's
diffusers folder), and the checks that every file a run names is on disk before anything is loaded or written.

Release files are plain state dicts with this suite's U-ViT parameter names (the reference's), so
no key map is needed for the network: an AdaDiff release's estimators (`lte_classifer.*`) are left
to the `adadiff` method, which maps them onto its official estimator (`methods.adadiff.network`).
Files are opened with `torch.load(weights_only=True)` (`checkpoints.read_checkpoint`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoints import (diffusers_dit_config, load_diffusers_dit, load_model, read_checkpoint, transformer_folder,
                           uvit_from_state)
from ..config import ModelConfig
from ..errors import UserError
from ..prompts import require_prompt_file
from .autoencoder import LatentDecoder, load_autoencoder
from ..schedules import check_trained_schedule
from .presets import UVIT_ASSETS, backbone_state, get_preset, published_at


def require_file(path: str, what: str, published: str, folder: bool = False) -> None:
    """One line naming a missing file (or with `folder`, a missing file or folder) and where it is published."""
    if not (Path(path).exists() if folder else Path(path).is_file()):
        raise UserError(f"{what} {path!r} not found; it is published as {published}: download it and point "
                        "the config at it")


def check_model_table(model: ModelConfig, where: str) -> None:
    """`[model]`: a known preset, and an autoencoder exactly when the preset is a latent model."""
    try:
        latent = get_preset(model.preset).latent is not None
    except UserError as exc:
        raise UserError(f"{where}: [model] {exc}") from None
    if latent and not model.autoencoder:
        raise UserError(f"{where}: [model] preset {model.preset!r} is a latent model and needs `autoencoder` "
                        "(the SD autoencoder that decodes its latents)")
    if model.autoencoder and not latent:
        raise UserError(f"{where}: [model] preset {model.preset!r} is a pixel model; remove `autoencoder`")


def check_model_files(model: ModelConfig, where: str) -> None:
    """Every file `[model]` names exists (before anything is loaded or written)."""
    check_model_table(model, where)
    preset = get_preset(model.preset)
    require_file(model.checkpoint, f"{where}: [model] checkpoint", published_at(preset), folder=preset.is_dit)
    if preset.latent is not None:
        require_file(model.autoencoder, f"{where}: [model] autoencoder",
                     preset.latent.published or f"stable-diffusion/{preset.latent.autoencoder} in {UVIT_ASSETS}",
                     folder=bool(preset.latent.published))


def load_preset_model(model: ModelConfig, where: str = "config"):
    """The run's network from a release (U-ViT's or AdaDiff's file, a DiT's diffusers folder), strictly, with the
    preset's architecture."""
    check_model_files(model, where)
    preset = get_preset(model.preset)
    if preset.is_dit:
        return load_preset_dit(model.checkpoint, preset, where)
    state = read_checkpoint(model.checkpoint)
    if not isinstance(state, dict):
        raise UserError(f"{where}: {model.checkpoint!r} is not a state dict; expected {published_at(preset)}")
    network = uvit_from_state(preset.network, backbone_state(state), model.checkpoint)
    if preset.null_label is not None:  # guidance's unconditional row: labels are drawn below it
        network.null_label = preset.null_label
    return network


def load_preset_dit(folder: str, preset, where: str):
    """A DiT release (a diffusers folder) whose config is the preset's architecture (checked before the weights
    are read)."""
    config_file = transformer_folder(folder) / "config.json"
    config = diffusers_dit_config(config_file) if config_file.is_file() else preset.network
    differs = [key for key, value in dataclasses.asdict(preset.network).items() if getattr(config, key) != value]
    if differs:
        found = ", ".join(f"{key} = {getattr(config, key)!r}" for key in differs)
        raise UserError(f"{where}: {folder!r} is not {preset.name}'s architecture ({found}); expected "
                        f"{published_at(preset)}")
    return load_diffusers_dit(folder)


# ---- the run's network (the harness calls these) ------------------------------------------------------

def run_checkpoint(config) -> str:
    """The file the run's network comes from: `[model] checkpoint` with a preset, else the run's `checkpoint`."""
    return config.model.checkpoint if config.model.preset else config.checkpoint


def check_run_files(config, where: str) -> None:
    """The published files a run names exist: one line naming the first missing one and where it is published."""
    if config.model.preset:
        check_model_files(config.model, where)
        check_schedule(config, where)
    stats = config.metrics.reference_stats
    if stats:
        preset = get_preset(config.model.preset) if config.model.preset else None
        published = ((preset.stats_published or f"fid_stats/{preset.fid_stats} in {UVIT_ASSETS}") if preset
                     else "a .npz with `mu` and `sigma` (Inception pool3 features, e.g. U-ViT's fid_stats or ADM's "
                          "reference batches)")
        require_file(stats, f"{where}: [metrics] reference_stats", published)
    if config.sampling.prompts:
        require_prompt_file(config.sampling.prompts, where)


def check_schedule(config, where: str) -> None:
    """The run samples with the schedule (and time input) the preset's network was trained with."""
    preset = get_preset(config.model.preset)
    if config.sampling.schedule != preset.schedule:
        raise UserError(f"{where}: [sampling] schedule is {config.sampling.schedule!r} but {preset.name} was trained "
                        f"with {preset.schedule!r}; set schedule = \"{preset.schedule}\"")


def load_run_model(config, where: str = "config"):
    """The run's U-ViT: a preset's release, or a checkpoint of this suite (or a published state dict it recognises)."""
    if config.model.preset:
        return load_preset_model(config.model, where)
    model = load_model(config.checkpoint)
    check_trained_schedule(recorded_schedule(config.checkpoint), config.sampling.schedule,
                           f"checkpoint {config.checkpoint!r}", where)
    return model


def recorded_schedule(path: str) -> str | None:
    """The schedule a checkpoint of this suite records (`adadiff-bench train` writes it; None: not recorded)."""
    if Path(path).is_dir():  # a diffusers folder records no schedule
        return None
    payload = read_checkpoint(path)  # (this suite's checkpoints are small: read again for their meta)
    meta = payload.get("meta") if isinstance(payload, dict) else None
    schedule = meta.get("schedule") if isinstance(meta, dict) else None
    return schedule if isinstance(schedule, str) else None


def run_image_shape(config, model) -> tuple[int, int, int]:
    """The images a run makes (C, H, W): the network's own, or its decoder's for a latent preset."""
    if config.model.preset:
        return get_preset(config.model.preset).image_shape
    return (model.in_chans, model.img_size, model.img_size)


def decoded_values(config) -> int | None:
    """Values of one decoded image of a latent preset (3 x 256 x 256 for the SD autoencoder); None for a pixel model."""
    preset = get_preset(config.model.preset) if config.model.preset else None
    if preset is None or preset.latent is None:
        return None
    channels, height, width = preset.image_shape
    return channels * height * width


def load_run_decoder(config, device) -> LatentDecoder | None:
    """A latent preset's decoding stage (its autoencoder on `device`); None for a pixel model."""
    latent = get_preset(config.model.preset).latent if config.model.preset else None
    if latent is None:
        return None
    vae = load_autoencoder(config.model.autoencoder, latent.scale_factor, latent.ddconfig)
    return LatentDecoder(vae, latent.scale_factor).to(device)


def published_files(config) -> dict[str, dict[str, str]]:
    """run.json's record of the other files a run read: the autoencoder, the FID statistics and the prompts
    (path, SHA-256)."""
    from ..checkpoints import sha256_file
    named = {"autoencoder": config.model.autoencoder, "reference_stats": config.metrics.reference_stats,
             "prompts": config.sampling.prompts}
    return {key: {"path": path, "sha256": sha256_file(path)} for key, path in named.items() if path}
