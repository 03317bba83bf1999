"""Cost per 1,000 samples of an AdaDiff paper config, from a timed CPU probe with random weights.

The network comes through the config's own path: a random release at the preset's full depth and width is
written in the official layout (a temporary file), `[model] checkpoint` points at it, and the run's model is
loaded, given its prompts (random CLIP-shaped tokens for the text-to-image preset) and sampled by the harness's
`generate` at the config's solver, schedule and guidance, with `--steps` steps instead of the config's. The
decoder of a latent preset is SD's autoencoder at full width with random weights (built in memory). CPU time
(user + system, all threads) is read around each stage, so the figures do not depend on what else the machine
runs; evaluations count both guidance passes. With `--device cuda` the probe runs on the GPU instead, at
`--samples` images in one batch (default 32 there), timed by wall clock between synchronisations after a warm-up,
and the figures are GPU seconds and hours (one GPU).

    python benchmarks/paper_cost.py configs/paper/mscoco256_uvit_s2_t2i.toml    # about 1 min, 3 GB of memory
    python benchmarks/paper_cost.py configs/paper/imagenet256_dit_xl2.toml      # DiT-XL/2: 2.7 GB folder, 8 GB
    python benchmarks/paper_cost.py configs/paper/imagenet256_dit_xl2.toml --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adadiff_bench.config import load_run_config
from adadiff_bench.device import check_precision_on, device_name, resolve_device
from adadiff_bench.diffusion import solver_timesteps
from adadiff_bench.errors import UserError
from adadiff_bench.flops import unit_costs
from adadiff_bench.guidance import NO_GUIDANCE
from adadiff_bench.harness import generate, reference_cell
from adadiff_bench.models.official import load_run_model
from adadiff_bench.models.presets import get_preset, meta_shapes
from adadiff_bench.prompts import attach_prompts


def random_release(preset, path: Path) -> None:
    """Random weights with the release's parameter names and shapes (layer norms at 1); a DiT's as a diffusers
    folder (diffusers' own initialisation, written by its save_pretrained)."""
    if preset.is_dit:
        from adadiff_bench.models.dit import DiT
        DiT.from_config(**dataclasses.asdict(preset.network)).transformer.save_pretrained(path)
        return
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in meta_shapes(preset.network).items()}
    state.update({key: torch.ones_like(value) for key, value in state.items() if key.endswith("norm1.weight")
                  or key.endswith("norm2.weight") or key == "norm.weight"})
    torch.save(state, path)


def random_prompts(preset, path: Path, count: int = 4) -> None:
    rng = np.random.default_rng(0)
    shape = (preset.network.num_clip_token, preset.network.clip_dim)
    np.savez(path, contexts=rng.standard_normal((count, *shape)).astype(np.float32),
             empty_context=rng.standard_normal(shape).astype(np.float32))


def device_seconds(work, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(seconds spent on `device`, wall seconds) that `work()` takes: on the CPU this process's CPU seconds
    (every core's), on a GPU the wall seconds between synchronisations (the GPU's time, not the host's)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    synchronize()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return (wall, wall) if device.type == "cuda" else (cpu, wall)


def decoder_seconds(preset, num_samples: int, device: torch.device) -> float:
    """CPU (on a GPU: wall) seconds per image of decoding with SD's autoencoder at full width (random weights)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    from adadiff_bench.models.autoencoder import LatentDecoder, ldm_config
    config = create_vae_diffusers_config_from_ldm(ldm_config(preset.latent.ddconfig, preset.latent.scale_factor), {})
    decoder = LatentDecoder(AutoencoderKL(**config).eval(), preset.latent.scale_factor).to(device)
    latents = torch.randn(num_samples, preset.network.in_chans, preset.network.img_size, preset.network.img_size)
    if device.type == "cuda":
        decoder.decode(latents, num_samples)  # warm-up (kernel selection, allocator)
    return device_seconds(lambda: decoder.decode(latents, num_samples), device)[0] / num_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--samples", type=int, help="images, sampled as one batch (default 2; 32 on a GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="the network's autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device, "--device")
        check_precision_on(args.precision, device, "--device")
    except UserError as error:
        parser.error(str(error))
    samples = args.samples if args.samples is not None else (32 if device.type == "cuda" else 2)
    if samples < 1 or args.steps < 1:
        parser.error(f"--samples and --steps must be positive (got {samples} and {args.steps})")
    config = load_run_config(args.config)
    preset = get_preset(config.model.preset)
    with tempfile.TemporaryDirectory() as folder:
        release = Path(folder) / ("transformer" if preset.is_dit else "nnet_ema.pth")
        random_release(preset, release)
        placeholder = Path(folder) / "autoencoder_kl.pth"  # (only its presence is checked; the decoder is below)
        placeholder.touch()
        config.model = dataclasses.replace(config.model, checkpoint=str(release),
                                           autoencoder=str(placeholder) if preset.latent else "")
        model = load_run_model(config, args.config)
        shutil.rmtree(release) if release.is_dir() else release.unlink()
        if config.sampling.prompts:
            random_prompts(preset, Path(folder) / "prompts.npz")
            attach_prompts(model, str(Path(folder) / "prompts.npz"), config.sampling.guidance != NO_GUIDANCE,
                           args.config)
    macs = unit_costs(model).full  # (traced on the CPU, before the model moves)
    model.to(device)
    cell = dataclasses.replace(reference_cell(config), num_steps=args.steps)
    passes = 1 if config.sampling.guidance == NO_GUIDANCE else 2
    evaluations = len(solver_timesteps(cell.solver, args.steps, cell.schedule)) * passes
    on_gpu = device.type == "cuda"
    unit = f"GPU s ({device_name(device)}, {args.precision})" if on_gpu else "CPU s"
    with torch.no_grad():
        generate(cell, model, samples if on_gpu else 1, samples if on_gpu else 1, precision=args.precision)  # warm-up
        spent, wall = device_seconds(lambda: generate(cell, model, samples, samples, precision=args.precision),
                                     device)
    per_evaluation = spent / (samples * evaluations)
    full_evaluations = len(solver_timesteps(cell.solver, config.sampling.num_steps, cell.schedule)) * passes
    hours = per_evaluation * full_evaluations * 1000 / 3600
    print(f"{preset.name}: {macs / 1e9:.1f} G MACs per evaluation; {cell.solver}, {args.steps} "
          f"steps x {passes} pass(es) = {evaluations} evaluations per sample, {samples} samples: {spent:.1f} {unit} "
          f"({wall:.1f} s wall, {args.threads} threads)")
    print(f"{unit} per evaluation per sample: {per_evaluation:.4f}; at the config's {full_evaluations} evaluations: "
          f"{hours:.2f} {unit.split()[0]} hours per 1,000 samples"
          + ("" if on_gpu else f", {hours / args.threads:.1f} h on {args.threads} cores fully used"))
    if preset.latent is not None:
        decode = decoder_seconds(preset, samples, device) * 1000 / 3600
        print(f"SD decoder: {decode * 3.6:.4f} {unit} per image, +{decode:.2f} {unit.split()[0]} hours per 1,000 "
              "samples" + ("" if on_gpu else f", +{decode / args.threads:.1f} h on {args.threads} cores"))


if __name__ == "__main__":
    main()
