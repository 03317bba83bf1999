"""On a CUDA device: the same noise and (for `full`) the same step log as on the CPU, images within float
rounding; `adadiff-bench run` records the GPU; bf16 autocasts and stays close to fp32; peak memory, CUDA-event
timing and deterministic kernels. Every test skips without a GPU (`bash benchmarks/gpu.sh` runs them on one).

The CPU side of the device settings is tested in tests/test_device.py."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench import timing
from adadiff_bench.checkpoints import load_model
from adadiff_bench.cli import main
from adadiff_bench.device import autocast
from adadiff_bench.diffusion import initial_noise, sample_generators
from adadiff_bench.flops import unit_costs
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.memory import PeakMemory
from conftest import REPO, write_run_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
ADADIFF = (("checkpoint", "checkpoints/adadiff_digits_finetuned.pt"), ("threshold", 0.2))
LOG_ARRAYS = ("blocks_run", "exit_point", "embed_calls", "head_calls", "extra_macs")


@pytest.fixture(autouse=True)
def run_from_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # knobs name shipped files by repository-relative paths


@pytest.fixture(scope="module")
def models():
    """The digits model on the CPU and a copy on the GPU."""
    model = load_model(REPO / "checkpoints" / "uvit_digits.pt").eval()
    return model, copy.deepcopy(model).to(CUDA)


@pytest.fixture
def full_fp32():
    """No TF32 in matmuls or convolutions while the test runs: fp32 on the GPU as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FirstInput:
    """A method that keeps the x its first network evaluation received (the initial noise, as the solver scaled it)."""

    def __init__(self, method):
        self.method, self.first = method, None

    def __getattr__(self, name):
        return getattr(self.method, name)

    def __call__(self, x, t, y, ctx):
        if ctx.step == 0 and self.first is None:
            self.first = x.clone()
        return self.method(x, t, y, ctx)


def sample_on(model, cell: Cell, num_samples: int = 16):
    """(images on the CPU, step log, the first network input) of one batch of `cell` on the model's device."""
    method = FirstInput(build_method(cell, model))
    images, log = generate(cell, model, num_samples, num_samples, method=method)
    return images, log, method.first


# ---- the same samples as on the CPU -----------------------------------------------------------------------

@needs_cuda
def test_full_on_cuda_draws_the_cpus_noise_and_gives_its_images_and_step_log(models, full_fp32):
    cell = Cell("full", (), "dpm-solver++", 10, 0)
    cpu_images, cpu_log, cpu_first = sample_on(models[0], cell)
    cuda_images, cuda_log, cuda_first = sample_on(models[1], cell)
    assert cuda_first.device.type == "cuda" and cuda_images.device.type == "cpu"
    assert torch.equal(cuda_first.cpu(), cpu_first)
    assert torch.equal(cpu_first, initial_noise(sample_generators(0, range(16)), (1, 8, 8)))  # DPM-Solver's scale is 1
    torch.testing.assert_close(cuda_images, cpu_images, atol=1e-3, rtol=1e-3)  # fp64 vs fp32 differ by ~3e-6 here
    for name in LOG_ARRAYS:
        assert np.array_equal(getattr(cuda_log, name), getattr(cpu_log, name)), name


@needs_cuda
def test_adadiff_on_cuda_exits_as_on_the_cpu(models, full_fp32):
    """An exit decision may flip where an uncertainty lies within rounding of the threshold; few may, and the
    samples whose exits all agree must agree in their images too."""
    cell = Cell("adadiff", ADADIFF, "dpm-solver++", 25, 0)
    cpu_images, cpu_log, cpu_first = sample_on(models[0], cell)
    cuda_images, cuda_log, cuda_first = sample_on(models[1], cell)
    assert torch.equal(cuda_first.cpu(), cpu_first)
    assert cpu_log.layer_ratio() < 0.95  # samples do exit early at this threshold
    assert abs(cuda_log.layer_ratio() - cpu_log.layer_ratio()) < 0.01
    same_exits = (cuda_log.exit_point == cpu_log.exit_point).all(axis=1)
    assert same_exits.sum() >= 12, f"only {same_exits.sum()} of 16 samples exited alike at every step"
    torch.testing.assert_close(cuda_images[same_exits], cpu_images[same_exits], atol=1e-3, rtol=1e-3)


@needs_cuda
def test_unit_costs_of_a_model_on_cuda_are_the_cpus(models):
    """The FLOPs of a run on the GPU: the cost trace works where the model lives and counts the same MACs."""
    on_cpu, on_cuda = unit_costs(models[0]), unit_costs(models[1])
    assert on_cuda.embed == on_cpu.embed and on_cuda.head == on_cpu.head
    assert np.array_equal(on_cuda.blocks, on_cpu.blocks)


# ---- a run on the GPU ----------------------------------------------------------------------------------------

def tiny_config(tmp_path, checkpoint, top: str = "", **sections):
    """conftest's small run config with top-level settings in front (`device = "cuda"` ...)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_run_config(tmp_path, checkpoint, **sections)
    path.write_text(top + path.read_text())
    return path


@needs_cuda
def test_run_on_cuda_records_the_gpu_the_precision_and_cuda_measurements(tmp_path, tiny_checkpoint):
    config = tiny_config(tmp_path, tiny_checkpoint, 'device = "cuda"\nprecision = "bf16"\n',
                         extra_methods='[[methods]]\nname = "random-exit"\nlayer_ratio = 0.6\n')
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    run_dir = tmp_path / "results" / "tiny"
    rows = pd.read_csv(run_dir / "results.csv")
    gpu = torch.cuda.get_device_name(0)
    assert rows["device"].str.startswith("cuda").all() and (rows["device_name"] == gpu).all()
    assert (rows["precision"] == "bf16").all() and rows["valid"].all()
    assert (rows["peak_mem_kind"] == "cuda peak allocated").all() and (rows["peak_mem_mb"] > 0).all()
    assert (rows["time_per_image_s"] > 0).all() and np.isfinite(rows["fid_digits_cnn"]).all()
    machine = json.loads((run_dir / "run.json").read_text())["machine"]
    assert machine["gpu_name"] == gpu and machine["device"].startswith("cuda") and machine["precision"] == "bf16"


@needs_cuda
def test_deterministic_runs_give_identical_samples(tmp_path, tiny_checkpoint):
    """Two `adadiff-bench run --device cuda` processes with deterministic = true (each process sets up cuBLAS
    afresh, as a user's run does): the same samples, exits and metrics."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    runs = []
    for name in ("first", "second"):
        config = tiny_config(tmp_path / name, tiny_checkpoint, "deterministic = true\n", timing="enabled = false",
                             extra_methods='[[methods]]\nname = "random-exit"\nlayer_ratio = 0.6\n')
        done = subprocess.run([sys.executable, "-m", "adadiff_bench", "run", "--config", str(config), "--device",
                               "cuda", "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(tmp_path / name / "results" / "tiny")
    first, second = (pd.read_csv(run / "results.csv") for run in runs)
    metrics = [c for c in first.columns if c.startswith(("fid_", "is_", "kid_", "layer_ratio"))]
    pd.testing.assert_frame_equal(first[["cell_id", *metrics]], second[["cell_id", *metrics]])
    for cell in first["cell_id"]:
        samples = [np.load(run / "cells" / cell / "samples.npz")["arr_0"] for run in runs]
        assert np.array_equal(*samples), cell
    with np.load(runs[0] / "exits.npz") as a, np.load(runs[1] / "exits.npz") as b:
        assert all(np.array_equal(a[key], b[key]) for key in a.files)
    determinism = json.loads((runs[0] / "run.json").read_text())["machine"]["determinism"]
    assert determinism["use_deterministic_algorithms"] and determinism["cublas_workspace_config"] == ":4096:8"


# ---- precision, memory, time ---------------------------------------------------------------------------------

@needs_cuda
def test_bf16_autocasts_the_network_and_stays_close_to_fp32(models):
    model = models[1]
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    dtypes = []
    hook = linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator).to(CUDA)
    t = torch.randint(0, 1000, (64,), generator=generator).to(CUDA)
    with torch.no_grad():
        exact = model(x, t, None)
        with autocast(CUDA, "bf16"):
            reduced = model(x, t, None)
    hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16]
    relative = ((reduced.float() - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()
    assert 1e-5 < relative < 0.03, relative  # on the CPU bf16 gives 3e-3

    cell = Cell("full", (), "dpm-solver++", 10, 0)
    fp32, _ = generate(cell, model, 32, 32)
    bf16, _ = generate(cell, model, 32, 32, precision="bf16")
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    difference = (bf16 - fp32).pow(2).mean().sqrt().item()
    assert 0 < difference < 0.05, difference  # rounded, not broken (the CPU: RMS 4e-3 at 25 steps)


@needs_cuda
def test_peak_memory_is_cuda_allocated_memory():
    with PeakMemory(CUDA) as peak:
        block = torch.empty(64 * 2**20, dtype=torch.uint8, device=CUDA)
        del block
    assert peak.kind == "cuda peak allocated" and peak.mb >= 64


@needs_cuda
def test_time_once_times_with_cuda_events(monkeypatch):
    """A kernel that keeps the GPU busy for ~25 ms after the host has returned is timed by two CUDA events."""
    made, event = [], torch.cuda.Event
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: made.append(kwargs) or event(**kwargs))
    seconds = timing.time_once(lambda: torch.cuda._sleep(50_000_000), 1, CUDA)
    assert len(made) == 2 and all(kwargs.get("enable_timing") for kwargs in made)
    assert 0.005 < seconds < 5, seconds


@needs_cuda
@pytest.mark.parametrize("method", [("full", ()), ("static-exit", (("k", 2),))])
def test_a_learned_sigma_dit_on_cuda_samples_as_on_the_cpu_with_its_learned_variance(full_fp32, method):
    """The DiT backbone's GPU path: DiT-XL/2's sampler (learned variance, guidance on 3 of 4 channels) on a small
    learned-sigma DiT, against the same run on the CPU."""
    from test_dit import tiny_dit
    model = tiny_dit(std=0.05, in_channels=4, out_channels=8)
    cell = Cell(method[0], method[1], "ddpm-learned", 6, 0, guidance=1.5, guidance_channels=3)
    cpu_images, cpu_log = generate(cell, model, 4, 4)
    cuda_images, cuda_log = generate(cell, copy.deepcopy(model).to(CUDA), 4, 4)
    assert cuda_images.device.type == "cpu"
    torch.testing.assert_close(cuda_images, cpu_images, atol=1e-3, rtol=1e-3)
    assert np.array_equal(cuda_log.blocks_run, cpu_log.blocks_run)
