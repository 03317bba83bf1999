"""What a finished training shows without a probe script: a grid of samples and the eps loss per timestep.

Written next to the exported checkpoint `<name>.pt` by `adadiff-bench train` (`--no-end-report` turns it off):
- `<name>_samples.png`: `GRID_SAMPLES` samples of the trained network in `GRID_STEPS` steps on the schedule it
  was trained on (DPM-Solver++, or DPM-Solver on the continuous VP), sample i seeded by (train.seed, i) as a run
  seeds it; an under-trained model shows as noise here.
- `<name>_loss_by_timestep.csv`: columns t_start, t_end, exit, full_depth, images, num_images, eps_mse: the
  mean ||eps_theta(x_t, t) - eps||^2 over `EVAL_IMAGES` images in each bucket of `BUCKET_WIDTH` timesteps, for
  every exit of an early-exit network (exit 1 after the first block; the last is full depth, a plain network's
  only one). The images are a fixed seeded draw from the held-out split (`[train] holdout` > 0: `images` is
  "held-out") or else from the training data ("training"); t and eps are drawn per image and bucket. A discrete
  schedule noises at timestep t; the continuous VP at time (t + 0.5) / 1000, which the network reads as about t.
- `<name>_loss_by_timestep.png`: that table as a plot.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import to_uint8
from .diffusion import NUM_TRAIN_TIMESTEPS, sample
from .schedules import DEFAULT_SCHEDULE, get_schedule
from .results import atomic_write_bytes, write_csv

GRID_SAMPLES = 16
GRID_STEPS = 10
GRID_SOLVERS = {"discrete": "dpm-solver++", "continuous": "dpm-solver-fast"}  # by the schedule's kind
EVAL_IMAGES = 64
BUCKET_WIDTH = 100
MIN_TILE_PIXELS = 32  # small images are enlarged (nearest neighbour) to at least this side in the grid

# eps predictions of the trained (EMA) module at (x_t, t, y), one per exit, full depth last
Predictions = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], list[torch.Tensor]]


def full_depth(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> list[torch.Tensor]:
    """A plain denoiser's one prediction."""
    return [module(x, t, y)]


@dataclass
class EvalBatch:
    """A fixed draw for the loss table: for each timestep bucket, images x0 (and labels), t and eps."""
    x0: torch.Tensor               # (N, C, H, W) in model range
    y: torch.Tensor | None
    t: torch.Tensor                # (buckets, N) int64
    eps: torch.Tensor              # (buckets, N, C, H, W)


def eval_batch(images: torch.Tensor, labels: torch.Tensor | None, seed: int, num_images: int = EVAL_IMAGES,
               bucket_width: int = BUCKET_WIDTH) -> EvalBatch:
    """Images drawn without replacement, and per bucket a uniform t in it and Gaussian eps, all from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(images), generator=generator)[:num_images]
    x0 = images[rows]
    starts = torch.arange(0, NUM_TRAIN_TIMESTEPS, bucket_width)
    t = starts[:, None] + torch.randint(bucket_width, (len(starts), len(x0)), generator=generator)
    eps = torch.randn((len(starts), *x0.shape), generator=generator)
    return EvalBatch(x0, None if labels is None else labels[rows], t.clamp(max=NUM_TRAIN_TIMESTEPS - 1), eps)


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the network's time input, x_t = alpha x0 + sigma eps) at bucket timesteps `t` (0..999) of `schedule`."""
    noise_schedule = get_schedule(schedule)
    times = t if noise_schedule.kind == "discrete" else (t.double() + 0.5) / NUM_TRAIN_TIMESTEPS
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in noise_schedule.alpha_sigma(times))
    network_time = noise_schedule.network_time(times)
    return (network_time if noise_schedule.kind == "discrete" else network_time.float(),
            (alpha * x0.double() + sigma * eps.double()).float())


@torch.no_grad()
def loss_by_timestep(module: torch.nn.Module, predictions: Predictions, batch: EvalBatch,
                     schedule: str = DEFAULT_SCHEDULE, images: str = "training",
                     bucket_width: int = BUCKET_WIDTH) -> pd.DataFrame:
    """Mean eps MSE per timestep bucket and exit (one row each), for `batch` noised as in training."""
    rows = []
    for bucket, (t, eps) in enumerate(zip(batch.t, batch.eps)):
        network_time, xt = noised(batch.x0, t, eps, schedule)
        outputs = predictions(module, xt, network_time, batch.y)
        t_end = min((bucket + 1) * bucket_width, NUM_TRAIN_TIMESTEPS) - 1
        for exit_point, eps_hat in enumerate(outputs, start=1):
            rows.append({"t_start": bucket * bucket_width, "t_end": t_end, "exit": exit_point,
                         "full_depth": exit_point == len(outputs), "images": images, "num_images": len(t),
                         "eps_mse": float((eps_hat.float() - eps).pow(2).mean())})
    return pd.DataFrame(rows)


def sample_grid(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (rows x cols) uint8 image, HWC, tiles enlarged to >= MIN_TILE_PIXELS, 1 px gaps."""
    count, channels, height, width = images.shape
    scale = max(1, math.ceil(MIN_TILE_PIXELS / max(height, width)))
    tiles = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    tile_h, tile_w = height * scale, width * scale
    grid = np.zeros((rows * (tile_h + 1) + 1, cols * (tile_w + 1) + 1, channels), np.uint8)
    for i, tile in enumerate(tiles):
        top, left = 1 + (i // cols) * (tile_h + 1), 1 + (i % cols) * (tile_w + 1)
        grid[top:top + tile_h, left:left + tile_w] = tile
    return grid


def draw_samples(module: torch.nn.Module, predictions: Predictions, image_shape: tuple[int, ...], seed: int,
                 num_classes: int, schedule: str = DEFAULT_SCHEDULE, count: int = GRID_SAMPLES) -> torch.Tensor:
    """`count` samples (uint8 NCHW) of the module's full-depth prediction in GRID_STEPS steps on `schedule`."""
    def denoiser(x, t, y, ctx):
        return predictions(module, x, t, y)[-1]
    solver = GRID_SOLVERS[get_schedule(schedule).kind]
    return to_uint8(sample(denoiser, solver, GRID_STEPS, image_shape, range(count), seed, num_classes,
                           schedule=schedule)).cpu()


def report_paths(checkpoint: Path) -> list[Path]:
    """The grid, the table and the plot written beside `checkpoint`."""
    stem = Path(checkpoint).with_suffix("")
    return [Path(f"{stem}_samples.png"), Path(f"{stem}_loss_by_timestep.csv"), Path(f"{stem}_loss_by_timestep.png")]


def write_training_report(checkpoint: Path, module: torch.nn.Module, predictions: Predictions | None,
                          images: torch.Tensor, labels: torch.Tensor | None, schedule: str,
                          seed: int, held_out: bool = False) -> list[Path]:
    """Write the grid, the table and its plot beside `checkpoint`; returns their paths. `module` (trained on
    `schedule`) is on the CPU; the loss table is computed on `images` (`held_out`: they are the held-out split,
    not the training data)."""
    predictions = predictions or full_depth
    module = module.eval()
    paths = report_paths(checkpoint)
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    grid = sample_grid(draw_samples(module, predictions, tuple(images.shape[1:]), seed, num_classes, schedule))
    _save_png(grid, paths[0])
    table = loss_by_timestep(module, predictions, eval_batch(images, labels, seed), schedule,
                             "held-out" if held_out else "training")
    write_csv(paths[1], table)
    _plot_losses(table, paths[2])
    return paths


def _save_png(grid: np.ndarray, path: Path) -> None:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _plot_losses(table: pd.DataFrame, path: Path) -> None:
    """eps MSE against the bucket's middle timestep, one line per exit (darker = deeper)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    exits = sorted(table["exit"].unique())
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for exit_point in exits:
        rows = table[table["exit"] == exit_point]
        shade = 0.2 + 0.8 * (exits.index(exit_point) + 1) / len(exits)
        ax.plot((rows["t_start"] + rows["t_end"]) / 2, rows["eps_mse"], marker="o", markersize=3,
                color=plt.cm.viridis(1 - shade), label=f"exit {exit_point}" if len(exits) > 1 else None)
    ax.set_xlabel("timestep t (bucket middle)")
    ax.set_ylabel("eps MSE")
    ax.set_yscale("log")
    if len(exits) > 1:
        ax.legend(fontsize=6, ncol=2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
