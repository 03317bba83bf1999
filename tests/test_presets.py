"""Published U-ViT presets: full-size parameter names and shapes (facts from the public code, written out
here) load strictly on the meta device; release files (U-ViT's and AdaDiff's) load straight from a
config at real widths with the depth cut to 2, and run end to end; a missing file is one line."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

from adadiff_bench.checkpoints import build_model, sha256_file
from adadiff_bench.cli import main
from adadiff_bench.config import ModelConfig, load_run_config
from adadiff_bench.errors import UserError
from adadiff_bench.models import presets
from adadiff_bench.models.official import check_model_table, load_run_model
from adadiff_bench.models.presets import PRESETS, preset_for_state
from conftest import REPO
from test_autoencoder import to_original_layout
from test_metrics import random_inception_weights  # noqa: F401 (a fixture)

# The official configs (baofff/U-ViT and Tangshengku/AdaDiff, configs/*.py): every release has mlp_ratio 4,
# no qkv bias and no time MLP; what differs is below.
OFFICIAL = {
    "cifar10_uvit_s2": dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12),
    "celeba64_uvit_s4": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12),
    "imagenet256_uvit_l2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_classes=1001),
    "imagenet256_uvit_h2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_classes=1001,
                                conv=False),
    "mscoco256_uvit_s2_t2i": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=12, clip_dim=768,
                                  num_clip_token=77),
}
PAPER_MILLIONS = {  # parameter counts in the U-ViT paper (Bao et al., CVPR 2023, Tables 1 and 6)
    "cifar10_uvit_s2": 44, "celeba64_uvit_s4": 44, "imagenet256_uvit_l2": 287, "imagenet256_uvit_h2": 501,
    "mscoco256_uvit_s2_t2i": 45,
}


def official_shapes(img_size, patch_size, in_chans, embed_dim, depth, num_classes=-1, conv=True, clip_dim=None,
                    num_clip_token=0) -> dict[str, tuple[int, ...]]:
    """The state dict of the reference `libs/uvit.py` / `libs/uvit_t2i.py`, by name and shape."""
    e, hidden, patch_dim = embed_dim, 4 * embed_dim, patch_size ** 2 * in_chans
    extras = 1 + num_clip_token if clip_dim else 2 if num_classes > 0 else 1
    shapes = {"pos_embed": (1, extras + (img_size // patch_size) ** 2, e),
              "patch_embed.proj.weight": (e, in_chans, patch_size, patch_size), "patch_embed.proj.bias": (e,)}
    if num_classes > 0:
        shapes["label_emb.weight"] = (num_classes, e)
    if clip_dim:
        shapes.update({"context_embed.weight": (e, clip_dim), "context_embed.bias": (e,)})

    def block(prefix, skip):
        shapes.update({f"{prefix}.norm1.weight": (e,), f"{prefix}.norm1.bias": (e,),
                       f"{prefix}.attn.qkv.weight": (3 * e, e),  # qkv_bias=False: no qkv.bias
                       f"{prefix}.attn.proj.weight": (e, e), f"{prefix}.attn.proj.bias": (e,),
                       f"{prefix}.norm2.weight": (e,), f"{prefix}.norm2.bias": (e,),
                       f"{prefix}.mlp.fc1.weight": (hidden, e), f"{prefix}.mlp.fc1.bias": (hidden,),
                       f"{prefix}.mlp.fc2.weight": (e, hidden), f"{prefix}.mlp.fc2.bias": (e,)})
        if skip:
            shapes.update({f"{prefix}.skip_linear.weight": (e, 2 * e), f"{prefix}.skip_linear.bias": (e,)})

    for i in range(depth // 2):
        block(f"in_blocks.{i}", False)
    block("mid_block", False)
    for i in range(depth // 2):
        block(f"out_blocks.{i}", True)
    shapes.update({"norm.weight": (e,), "norm.bias": (e,), "decoder_pred.weight": (patch_dim, e),
                   "decoder_pred.bias": (patch_dim,)})
    if conv:
        shapes.update({"final_layer.weight": (in_chans, in_chans, 3, 3), "final_layer.bias": (in_chans,)})
    return shapes


def cut_depth(name: str, depth: int = 2) -> dict:
    """The official facts of a preset at real widths, with `depth` blocks on each side of the middle."""
    return {**OFFICIAL[name], "depth": depth}


def random_release(facts: dict, seed: int = 0, adadiff: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in the official layout (an AdaDiff release adds lte_classifer.{i}.lte per block)."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in official_shapes(**facts).items()}
    for key in state:
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = torch.ones_like(state[key])
    if adadiff:
        patch_dim, width = facts["patch_size"] ** 2 * facts["in_chans"], facts["embed_dim"]
        for i in range(facts["depth"] + 1):
            state[f"lte_classifer.{i}.lte.weight"] = torch.randn(patch_dim, width, generator=generator)
            state[f"lte_classifer.{i}.lte.bias"] = torch.randn(patch_dim, generator=generator)
    return state


@pytest.fixture
def shallow_presets(monkeypatch):
    """Every preset at real widths with its depth cut to 2 (what a test can afford to run)."""
    for name, preset in PRESETS.items():
        cut = {"num_layers": 2} if preset.is_dit else {"depth": 2}
        monkeypatch.setitem(PRESETS, name, dataclasses.replace(preset, network=dataclasses.replace(preset.network, **cut)))


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_full_size_official_state_dict_loads_strictly_on_meta(name):
    facts = official_shapes(**OFFICIAL[name])
    with torch.device("meta"):
        model = build_model(PRESETS[name].network)
        state = {key: torch.empty(shape) for key, shape in facts.items()}
    model.load_state_dict(state, strict=True, assign=True)  # names and shapes, no memory
    assert round(sum(v.numel() for v in state.values()) / 1e6) == PAPER_MILLIONS[name]
    assert preset_for_state(state) is PRESETS[name]  # an AdaDiff release finds its U-ViT by shapes alone


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_uvit_and_adadiff_releases_load_straight_from_the_model_table(name, shallow_presets, tmp_path):
    facts = cut_depth(name)
    for adadiff in (False, True):
        state = random_release(facts, seed=int(adadiff), adadiff=adadiff)
        path = tmp_path / f"nnet_ema_{adadiff}.pth"
        torch.save(state, path)
        latent = PRESETS[name].latent
        model_table = ModelConfig(name, str(path), str(tmp_path / "ae.pth") if latent else "")
        config = type("Run", (), {"model": model_table, "checkpoint": ""})
        if latent:
            (tmp_path / "ae.pth").write_bytes(b"")  # only its presence is checked here
        model = load_run_model(config)
        loaded = model.state_dict()
        assert set(loaded) == {k for k in state if not k.startswith("lte_classifer.")}
        assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_text_to_image_context_tokens_sit_between_time_and_patches(shallow_presets):
    torch.manual_seed(0)
    model = build_model(PRESETS["mscoco256_uvit_s2_t2i"].network).eval()
    x, t, context = torch.randn(2, 4, 32, 32), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 768)
    tokens = model.embed(x, t, context)
    assert tokens.shape == (2, 1 + 77 + 256, 512)
    projected = context @ model.context_embed.weight.T + model.context_embed.bias
    assert torch.allclose(tokens[:, 1:78], projected + model.pos_embed[:, 1:78], atol=1e-5)
    with pytest.raises(ValueError, match="context tokens"):
        model.embed(x, t, None)
    # another prompt changes the prediction; the head drops all 78 extra tokens
    with torch.no_grad():
        assert model(x, t, context).shape == x.shape
        assert not torch.allclose(model(x, t, context), model(x, t, torch.randn(2, 77, 768)))


def test_a_missing_release_is_one_line_naming_where_it_is_published(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'name = "p"\nresults_dir = "{tmp_path / "results"}"\n[model]\npreset = "cifar10_uvit_s2"\n'
                      f'checkpoint = "{tmp_path / "nnet_ema.pth"}"\n[[methods]]\nname = "full"\n')
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "nnet_ema.pth" in error and "github.com/baofff/U-ViT" in error
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("table, message", [
    ('preset = "cifar10_uvit_s3"\ncheckpoint = "a.pth"', "did you mean 'cifar10_uvit_s2'"),
    ('preset = "cifar10_uvit_s2"', "needs `checkpoint`"),
    ('preset = "imagenet256_uvit_l2"\ncheckpoint = "a.pth"', "needs `autoencoder`"),
    ('preset = "cifar10_uvit_s2"\ncheckpoint = "a.pth"\nautoencoder = "b.pth"', "remove `autoencoder`"),
    ('checkpoint = "a.pth"', "need a `preset`"),
])
def test_bad_model_table_is_one_line(tmp_path, table, message):
    config = tmp_path / "run.toml"
    config.write_text(f"[model]\n{table}\n")
    with pytest.raises(UserError, match=message):
        check_model_table(load_run_config(config).model, "run.toml")


def write_pixel_run(tmp_path, name: str, checkpoint, inception: str | None, methods: str) -> str:
    """A run of 2 samples, 2 steps; Inception metrics with `inception` weights, FID against published-style
    statistics (None: metrics off)."""
    np.savez(tmp_path / "fid_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    channels, size, _ = PRESETS[name].image_shape
    images = np.random.default_rng(0).integers(0, 256, (6, size, size, channels), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images)
    config = tmp_path / "run.toml"
    config.write_text(
        f'name = "e2e"\nresults_dir = "{tmp_path / "results"}"\n'
        f'[model]\npreset = "{name}"\ncheckpoint = "{checkpoint}"\n'
        f'[data]\nname = "npz"\npath = "{tmp_path / "data.npz"}"\n'
        '[sampling]\nschedule = "vp"\nsolver = "euler-maruyama"\nnum_steps = 2\nnum_samples = 2\nbatch_size = 2\n'
        + (f'[metrics]\ninception = "require"\ninception_weights = "{inception}"\nkid_subset_size = 2\n'
           f'isc_splits = 1\nprc = false\nreference_stats = "{tmp_path / "fid_stats.npz"}"\n' if inception else '[metrics]\ninception = "off"\n')
        + '[timing]\nenabled = false\n' + methods)
    return str(config)


@pytest.mark.parametrize("name", ["cifar10_uvit_s2", "celeba64_uvit_s4"])
def test_pixel_presets_end_to_end_with_the_adadiff_release(name, shallow_presets, tmp_path, monkeypatch,
                                                            random_inception_weights):  # noqa: F811
    monkeypatch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)  # speed only
    release = tmp_path / "nnet_ema.pth"
    torch.save(random_release(cut_depth(name), adadiff=True), release)
    methods = ('[[methods]]\nname = "full"\n[[methods]]\nname = "adadiff"\n'
               f'checkpoint = "{release}"\nthreshold = 0.5\nthreshold_kind = "official-certainty"\n'
               'rule = "per-batch"\npatience = true\n')
    inception = random_inception_weights if name == "cifar10_uvit_s2" else None  # one FID at 2048-d is enough
    config = write_pixel_run(tmp_path, name, release, inception, methods)
    assert main(["run", "--config", config, "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "results" / "e2e" / "results.csv")
    assert list(frame["method"]) == ["full", "adadiff"] and frame["valid"].all()
    if inception:
        assert np.isfinite(frame["fid_inception"]).all() and np.isfinite(frame["is_inception_mean"]).all()
        assert (frame["fid_reference_stats"] == str(tmp_path / "fid_stats.npz")).all()
    assert frame["macs_per_image"].iloc[1] <= frame["macs_per_image"].iloc[0]
    with np.load(tmp_path / "results" / "e2e" / "cells" / frame["cell_id"].iloc[0] / "samples.npz") as archive:
        assert archive["arr_0"].shape == (2, *PRESETS[name].image_shape[1:], 3)


def test_presets_match_the_official_architectures():
    for name, facts in OFFICIAL.items():
        config = PRESETS[name].network
        for key, value in facts.items():
            assert getattr(config, key) == value, (name, key)
        assert config.mlp_ratio == 4 and not config.qkv_bias and not config.mlp_time_embed
        assert presets.get_preset(name).name == name


# SD's autoencoder shape (4 levels: 8x upsampling, 4 latent channels) at a small width
NARROW_SD = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 2],
                 num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def narrow_autoencoder_release(path) -> None:
    """A random narrow SD autoencoder saved in the original key layout (what U-ViT publishes)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[32, 64, 64, 64], latent_channels=4, layers_per_block=1)
    torch.save(to_original_layout(vae.state_dict(), num_levels=4), path)


def latent_run(tmp_path, run: str, preset: str, release, autoencoder, sampling: str, methods: str = "") -> Path:
    """A run config of a latent preset over 4 random labelled 256 px reference images: 2 samples, `full` and
    `methods`, no Inception, no timing."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8),
             labels=rng.integers(0, 1000, 4))
    config = tmp_path / "run.toml"
    config.write_text(
        f'name = "{run}"\nresults_dir = "{tmp_path / "results"}"\n'
        f'[model]\npreset = "{preset}"\ncheckpoint = "{release}"\nautoencoder = "{autoencoder}"\n'
        f'[data]\nname = "npz"\npath = "{tmp_path / "data.npz"}"\n'
        f'[sampling]\n{sampling}\nnum_samples = 2\nbatch_size = 2\n'
        '[metrics]\ninception = "off"\n[timing]\nenabled = false\n[[methods]]\nname = "full"\n' + methods)
    return config


def test_latent_preset_end_to_end_decodes_as_its_own_stage(shallow_presets, tmp_path, monkeypatch):
    name = "imagenet256_uvit_l2"
    preset = PRESETS[name]
    monkeypatch.setitem(PRESETS, name, dataclasses.replace(
        preset, latent=dataclasses.replace(preset.latent, ddconfig=NARROW_SD)))
    release, autoencoder = tmp_path / "nnet_ema.pth", tmp_path / "autoencoder_kl.pth"
    torch.save(random_release(cut_depth(name)), release)
    narrow_autoencoder_release(autoencoder)
    config = latent_run(tmp_path, "latent", name, release, autoencoder,
                        'schedule = "vp"\nsolver = "dpm-solver-fast"\nnum_steps = 3\nguidance = 1.4')
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    row = pd.read_csv(tmp_path / "results" / "latent" / "results.csv").iloc[0]
    from adadiff_bench.models.autoencoder import LatentDecoder, load_autoencoder
    decoder = LatentDecoder(load_autoencoder(str(autoencoder), 0.18215, NARROW_SD), 0.18215)
    assert row["decode_macs_per_image"] == pytest.approx(decoder.macs_per_image((4, 32, 32)))
    assert row["total_macs_per_image"] == pytest.approx(row["macs_per_image"] + row["decode_macs_per_image"])
    assert row["decode_time_per_image_s"] > 0 and row["decode_peak_mem_mb"] > 0
    with np.load(tmp_path / "results" / "latent" / "cells" / row["cell_id"] / "samples.npz") as archive:
        assert archive["arr_0"].shape == (2, 256, 256, 3)
    info = json.loads((tmp_path / "results" / "latent" / "run.json").read_text())
    assert info["autoencoder"] == {"path": str(autoencoder), "sha256": sha256_file(autoencoder)}
    assert info["checkpoint"] == {"path": str(release), "sha256": sha256_file(release)}


PAPER_CONFIGS = ["cifar10_uvit_s2", "celeba64_uvit_s4", "imagenet256_uvit_l2", "imagenet256_uvit_h2",
                 "mscoco256_uvit_s2_t2i", "imagenet256_dit_xl2"]
OFFICIAL_THRESHOLDS = {"cifar10_uvit_s2": 0.92, "celeba64_uvit_s4": 0.95, "imagenet256_uvit_l2": 0.92,
                       "mscoco256_uvit_s2_t2i": 0.87}  # AdaDiff's eval_*.sh exit_threshold


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_stops_at_its_first_missing_file_and_plans_once_files_exist(name, tmp_path, monkeypatch, capsys):
    from adadiff_bench.harness import plan_curves
    path = REPO / "configs" / "paper" / f"{name}.toml"
    config = load_run_config(path)
    assert config.model.preset == name and config.sampling.num_samples == 50000
    assert config.sampling.schedule == PRESETS[name].schedule
    monkeypatch.chdir(tmp_path)  # its relative paths name nothing here
    assert main(["run", "--config", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and config.model.checkpoint in error and "published" in error
    assert list(tmp_path.iterdir()) == []  # nothing written
    for named in {config.model.checkpoint, config.model.autoencoder, config.metrics.reference_stats,
                  config.sampling.prompts} - {""}:
        (tmp_path / named).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / named).touch()  # present (empty): every knob and solver of every entry validates
    cells = plan_curves(config, str(path))
    assert {cell.method for cell in cells} >= {"full", "static-exit"}
    adadiff = [entry for entry in config.methods if entry.name == "adadiff"]
    assert len(adadiff) == int(PRESETS[name].adadiff_release)
    for entry in adadiff:
        assert entry.params["threshold_kind"] == "official-certainty" and entry.params["patience"] is True
        assert entry.params["checkpoint"] == config.model.checkpoint
        assert entry.params["threshold"] == OFFICIAL_THRESHOLDS[name]


# ---- DiT-XL/2: a diffusers folder for the network and another for SD's autoencoder ---------------------------

NARROW_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000)  # DiT-XL/2's geometry, narrow and shallow


@pytest.fixture
def narrow_dit_preset(monkeypatch, tmp_path):
    """The DiT-XL/2 preset narrowed (its latents, classes and learned sigma kept), and its two release folders
    written by diffusers' own save_pretrained: the pipeline's transformer/ and a narrow SD autoencoder."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    from adadiff_bench.config import DiTConfig
    from adadiff_bench.models.autoencoder import ldm_config
    from adadiff_bench.models.dit import DiT
    name = "imagenet256_dit_xl2"
    preset = PRESETS[name]
    monkeypatch.setitem(PRESETS, name, dataclasses.replace(
        preset, network=DiTConfig(**NARROW_DIT), latent=dataclasses.replace(preset.latent, ddconfig=NARROW_SD)))
    torch.manual_seed(0)
    DiT.from_config(**NARROW_DIT).transformer.save_pretrained(tmp_path / "DiT-XL-2-256" / "transformer")
    AutoencoderKL(**create_vae_diffusers_config_from_ldm(ldm_config(NARROW_SD, 0.18215), {})).save_pretrained(
        tmp_path / "sd-vae-ft-ema")
    return tmp_path / "DiT-XL-2-256", tmp_path / "sd-vae-ft-ema"


def test_dit_preset_runs_end_to_end_from_its_diffusers_folders(narrow_dit_preset, tmp_path):
    """The paper config's path: both folders load, 2 DDPM steps with the learned variance and the 3-channel
    guidance rule, decoded."""
    release, autoencoder = narrow_dit_preset
    config = latent_run(tmp_path, "dit", "imagenet256_dit_xl2", release, autoencoder,
                        'schedule = "linear"\nsolver = "ddpm-learned"\nnum_steps = 2\nguidance = 1.5\n'
                        'guidance_channels = 3', '[[methods]]\nname = "static-exit"\nk = 1\n')
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "results" / "dit" / "results.csv")
    assert sorted(frame["method"]) == ["full", "static-exit"] and (frame["guidance_channels"] == 3).all()
    with np.load(tmp_path / "results" / "dit" / "cells" / frame["cell_id"].iloc[0] / "samples.npz") as archive:
        assert archive["arr_0"].shape == (2, 256, 256, 3)
    info = json.loads((tmp_path / "results" / "dit" / "run.json").read_text())
    assert info["autoencoder"] == {"path": str(autoencoder), "sha256": sha256_file(autoencoder)}


@pytest.mark.parametrize("folder, change, message", [
    ("vae", {"block_out_channels": [64, 64, 64, 64]}, r"not SD's KL autoencoder \(block_out_channels differ\)"),
    ("vae", {"_class_name": "VQModel"}, "does not describe an AutoencoderKL"),
    ("dit", {"num_layers": 3}, r"not imagenet256_dit_xl2's architecture \(num_layers = 3\)"),
])
def test_a_dit_preset_folder_of_another_architecture_is_refused_in_one_line(narrow_dit_preset, folder, change,
                                                                            message):
    from adadiff_bench.models.official import load_run_decoder
    release, autoencoder = narrow_dit_preset
    path = autoencoder / "config.json" if folder == "vae" else release / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    config = type("Run", (), {"model": ModelConfig("imagenet256_dit_xl2", str(release), str(autoencoder)),
                              "checkpoint": ""})
    with pytest.raises(UserError, match=message) as caught:
        load_run_model(config) if folder == "dit" else load_run_decoder(config, "cpu")
    assert "\n" not in str(caught.value)
