"""Published networks by name (U-ViT's and AdaDiff's releases, and DiT-XL/2): each release's architecture and
where its files are published (`models.official` loads them for a run).

    [model]
    preset = "cifar10_uvit_s2"
    checkpoint = "assets/cifar10_uvit_small.pth"     # U-ViT's release, or AdaDiff's fine-tuned nnet_ema.pth
    autoencoder = "assets/stable-diffusion/autoencoder_kl.pth"   # latent presets only

The architectures are the configs of the official repositories (baofff/U-ViT `configs/*.py`,
Tangshengku/AdaDiff `configs/*.py`); the releases are plain state dicts whose parameter names are
this suite's U-ViT's own, so they load strictly with no conversion. An AdaDiff release adds
`lte_classifer.*` (its estimators): the backbone takes the rest, and the `adadiff` method reads the
same file into its official estimator (its U-ViT found by `preset_for_state`).

DiT-XL/2 (Peebles & Xie, ICCV 2023) is published as a diffusers folder (`facebook/DiT-XL-2-256`): `checkpoint`
names that folder (or its `transformer/`), `autoencoder` a diffusers AutoencoderKL folder (the DiT paper's FID
decodes with `stabilityai/sd-vae-ft-ema`). Both are read as config.json plus safetensors: nothing runs code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import DiTConfig, UViTConfig, UViTT2IConfig
from ..errors import unknown_choice
from .dit import DiT
from .uvit import UViT

UVIT_RELEASES = "the U-ViT README's table of pretrained models (https://github.com/baofff/U-ViT#pretrained-models)"
ADADIFF_RELEASES = ("AdaDiff's fine-tuned weights (https://github.com/Tangshengku/AdaDiff, README: "
                    "'Models after AdaDiff Finetuning')")
UVIT_ASSETS = ("U-ViT's assets folder (https://drive.google.com/drive/folders/1yo-XhqbPue3rp5P57j6QbA5QZx6KybvP, "
               "linked from the U-ViT README)")
DIT_RELEASE = ("the diffusers folder facebook/DiT-XL-2-256 on the Hugging Face Hub (the pipeline's folder, or its "
               "transformer/)")
SD_VAE_FT_EMA = "the diffusers folder stabilityai/sd-vae-ft-ema on the Hugging Face Hub (what DiT's FID decodes with)"
ADM_REFERENCE = ("VIRTUAL_imagenet256_labeled.npz, ADM's ImageNet 256 reference batch (openai/guided-diffusion, "
                 "evaluations/README.md), whose mu and sigma DiT's FID is measured against")
OFFICIAL_ESTIMATOR_PREFIX = "lte_classifer."
# SD's first-stage ddconfig, as U-ViT's `libs/autoencoder.get_model` gives it (embed_dim = z_channels = 4)
SD_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                   ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@dataclass(frozen=True)
class Latent:
    """A latent model's decoder: SD's KL autoencoder (8x upsampling to RGB) and the latents' scale factor."""
    scale_factor: float
    autoencoder: str                   # the file's name in U-ViT's `stable-diffusion/` folder
    ddconfig: dict = field(default_factory=lambda: dict(SD_DDCONFIG))
    published: str = ""                # where it is published, when not in U-ViT's assets

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)


@dataclass(frozen=True)
class Preset:
    name: str
    network: UViTConfig | DiTConfig    # the architecture
    release: str                       # the U-ViT release's file name (a DiT: its diffusers folder's name)
    fid_stats: str                     # U-ViT's reference statistics for this data set (in `fid_stats/`)
    schedule: str                      # the noise schedule and time input it was trained with (`schedules`)
    latent: Latent | None = None
    adadiff_release: bool = True       # AdaDiff published fine-tuned weights for it
    null_label: int | None = None      # the label row of guidance's unconditional pass (never drawn)
    published: str = ""                # where the weights are published, when not in U-ViT's release table
    stats_published: str = ""          # where the reference statistics are, when not in U-ViT's assets

    @property
    def is_dit(self) -> bool:
        return isinstance(self.network, DiTConfig)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """What the run's images are: the network's own, or the decoder's RGB for a latent model."""
        size = self.network.img_size
        return (3, size * self.latent.downsampling, size * self.latent.downsampling) if self.latent \
            else (self.network.in_chans, size, size)


def _small(img_size: int, patch_size: int, **changes) -> UViTConfig:
    """U-ViT-S: width 512, 13 blocks (depth 12), 8 heads, no qkv bias (the official small configs)."""
    values = dict(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                  mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False, num_classes=-1)
    return UViTConfig(**{**values, **changes})


PRESETS: dict[str, Preset] = {
    "cifar10_uvit_s2": Preset("cifar10_uvit_s2", _small(32, 2), "cifar10_uvit_small.pth",
                              "fid_stats_cifar10_train_pytorch.npz", "vp"),
    "celeba64_uvit_s4": Preset("celeba64_uvit_s4", _small(64, 4), "celeba64_uvit_small.pth",
                               "fid_stats_celeba64_train_50000_ddim.npz", "vp"),
    # ImageNet 256 latents are 4 x 32 x 32; 1001 labels, the last one the null label of guidance
    "imagenet256_uvit_l2": Preset("imagenet256_uvit_l2", UViTConfig(
        img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4.0,
        qkv_bias=False, mlp_time_embed=False, num_classes=1001), "imagenet256_uvit_large.pth",
        "fid_stats_imagenet256_guided_diffusion.npz", "vp", Latent(0.18215, "autoencoder_kl.pth"), null_label=1000),
    "imagenet256_uvit_h2": Preset("imagenet256_uvit_h2", UViTConfig(
        img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16, mlp_ratio=4.0,
        qkv_bias=False, mlp_time_embed=False, num_classes=1001, conv=False), "imagenet256_uvit_huge.pth",
        "fid_stats_imagenet256_guided_diffusion.npz", "scaled-linear", Latent(0.18215, "autoencoder_kl_ema.pth"),
        adadiff_release=False, null_label=1000),
    # DiT-XL/2 at 256 px (facebook/DiT-XL-2-256's transformer config): 4 x 32 x 32 latents, learned sigma, 1000
    # classes and the null label 1000; trained on the linear DDPM schedule (1e-4..0.02, 1000 steps)
    "imagenet256_dit_xl2": Preset("imagenet256_dit_xl2", DiTConfig(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
        patch_size=2, num_embeds_ada_norm=1000), "DiT-XL-2-256", "VIRTUAL_imagenet256_labeled.npz", "linear",
        Latent(0.18215, "sd-vae-ft-ema", published=SD_VAE_FT_EMA), adadiff_release=False, null_label=1000,
        published=DIT_RELEASE, stats_published=ADM_REFERENCE),
    "mscoco256_uvit_s2_t2i": Preset("mscoco256_uvit_s2_t2i", UViTT2IConfig(
        img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4.0,
        qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77), "mscoco_uvit_small.pth",
        "fid_stats_mscoco256_val.npz", "scaled-linear", Latent(0.23010, "autoencoder_kl.pth")),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise unknown_choice("model preset", name, PRESETS)
    return PRESETS[name]


def published_at(preset: Preset) -> str:
    """Where a preset's network weights are published (one clause)."""
    if preset.published:
        return preset.published
    where = f"U-ViT's {preset.release} in {UVIT_RELEASES}"
    return where + (f", or {ADADIFF_RELEASES}" if preset.adadiff_release else "")


def backbone_state(state: dict) -> dict:
    """A release's U-ViT parameters: an AdaDiff release's estimators (`lte_classifer.*`) left out."""
    return {key: value for key, value in state.items() if not str(key).startswith(OFFICIAL_ESTIMATOR_PREFIX)}


def meta_shapes(config: UViTConfig | DiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the network `config` describes, built on the meta device (no memory); a
    DiT's as its diffusers folder names them (no `transformer.` prefix)."""
    with torch.device("meta"):
        if isinstance(config, DiTConfig):
            state = DiT.from_config(**dataclasses.asdict(config)).transformer.state_dict()
        else:
            state = UViT(**dataclasses.asdict(config)).state_dict()
    return {key: tuple(value.shape) for key, value in state.items()}


def preset_for_state(state: dict) -> Preset | None:
    """The U-ViT preset whose network has exactly this state dict's parameter names and shapes (estimators left
    out): an official AdaDiff release is a U-ViT state dict."""
    shapes = {str(k): tuple(v.shape) for k, v in backbone_state(state).items() if isinstance(v, torch.Tensor)}
    return next((preset for preset in PRESETS.values()
                 if not preset.is_dit and meta_shapes(preset.network) == shapes), None)
