"""The end of `adadiff-bench train`: a sample grid and the eps loss per timestep bucket beside the exported
checkpoint, named in the last lines; the loss table checked against a per-image recomputation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adadiff_bench.checkpoints import load_model
from adadiff_bench.cli import main
from adadiff_bench.config import DataConfig
from adadiff_bench.data import load_dataset
from adadiff_bench.diffusion import alphas_cumprod
from adadiff_bench.methods.adadiff import load_adadiff
from adadiff_bench.training_report import BUCKET_WIDTH, EVAL_IMAGES, eval_batch, report_paths, sample_grid
from conftest import tiny_training_toml

def train_base(tmp_path, *flags) -> tuple[list[str], str]:
    config = tmp_path / "train.toml"
    config.write_text(tiny_training_toml(tmp_path / "run", export=f'"{tmp_path / "models" / "uvit.pt"}"'))
    return ["train", "--config", str(config), "--no-progress", *flags], str(tmp_path / "models" / "uvit.pt")


def digits_model_input():
    data = load_dataset(DataConfig())
    return data.as_model_input(), data.labels


def brute_force_losses(network, seed: int, rows=None) -> np.ndarray:
    """eps MSE per bucket, one image at a time from the same draw (of the digits `rows`, default all): (buckets,)."""
    images, labels = digits_model_input()
    if rows is not None:
        images, labels = images[rows], labels[rows]
    batch = eval_batch(images, labels, seed)
    alpha_bar = alphas_cumprod()
    losses = np.zeros(len(batch.t))
    with torch.no_grad():
        for bucket in range(len(batch.t)):
            per_image = []
            for i in range(len(batch.x0)):
                t, eps = batch.t[bucket, i], batch.eps[bucket, i]
                x_t = alpha_bar[t].sqrt() * batch.x0[i].double() + (1 - alpha_bar[t]).sqrt() * eps.double()
                eps_hat = network(x_t.float()[None], t[None], None)[0]
                per_image.append((eps_hat - eps).pow(2).mean().item())
            losses[bucket] = np.mean(per_image)
    return losses


def test_a_base_training_writes_the_grid_and_the_loss_table_beside_the_export(tmp_path, capsys):
    args, export = train_base(tmp_path)
    assert main(args) == 0
    grid, table, plot = report_paths(export)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"samples: {grid}; eps loss by timestep: {table} (plot {plot})"
    assert grid.parent == tmp_path / "models" and plot.stat().st_size > 0

    # 16 samples of 8x8: a 4 x 4 grid of tiles enlarged 4x to 32 px, 1 px between and around them
    assert Image.open(grid).size == (4 * 33 + 1, 4 * 33 + 1)

    frame = pd.read_csv(table)
    assert list(frame.columns) == ["t_start", "t_end", "exit", "full_depth", "images", "num_images", "eps_mse"]
    assert (frame["images"] == "training").all()
    assert list(frame["t_start"]) == list(range(0, 1000, BUCKET_WIDTH))
    assert (frame["t_end"] == frame["t_start"] + BUCKET_WIDTH - 1).all()
    assert (frame["num_images"] == EVAL_IMAGES).all() and frame["full_depth"].all() and (frame["exit"] == 1).all()
    expected = brute_force_losses(load_model(tmp_path / "run" / "ema.pt"), seed=0)  # the fp32 EMA weights
    np.testing.assert_allclose(frame["eps_mse"], expected, rtol=1e-4)


def test_with_a_held_out_split_the_table_is_computed_on_it(tmp_path):
    from adadiff_bench.recipe import split_holdout
    args, export = train_base(tmp_path)
    config = tmp_path / "train.toml"
    config.write_text(config.read_text() + "holdout = 0.1\neval_every = 1\n")
    assert main(args) == 0
    frame = pd.read_csv(report_paths(export)[1])
    assert (frame["images"] == "held-out").all()
    _, held = split_holdout(len(digits_model_input()[0]), 0.1, seed=0)
    expected = brute_force_losses(load_model(tmp_path / "run" / "ema.pt"), seed=0, rows=held)
    np.testing.assert_allclose(frame["eps_mse"], expected, rtol=1e-4)


def test_no_end_report_writes_none_of_it(tmp_path, capsys):
    args, export = train_base(tmp_path, "--no-end-report")
    assert main(args) == 0
    assert not any(path.exists() for path in report_paths(export))
    assert "samples:" not in capsys.readouterr().out


def test_an_adadiff_training_reports_every_exit(tmp_path, tiny_checkpoint, capsys):
    config = tmp_path / "adadiff.toml"
    config.write_text(f'[data]\nname = "digits"\n\n[adadiff]\nbase_checkpoint = "{tiny_checkpoint}"\n\n'
                      f'[train]\nsteps = 2\nbatch_size = 8\nwarmup_steps = 1\nthreads = 1\n'
                      f'out_dir = "{tmp_path / "run"}"\n')
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    frame = pd.read_csv(report_paths(tmp_path / "run" / "ema.pt")[1])
    network = load_adadiff(tmp_path / "run" / "ema.pt")
    assert sorted(frame["exit"].unique()) == list(range(1, network.num_exits + 1))
    assert len(frame) == network.num_exits * 1000 // BUCKET_WIDTH
    full = frame[frame["full_depth"]].sort_values("t_start")
    assert (full["exit"] == network.num_exits).all()
    # the frozen backbone's own head is the last exit: its loss is the base model's
    np.testing.assert_allclose(full["eps_mse"], brute_force_losses(load_model(tiny_checkpoint), seed=0), rtol=1e-4)


def test_the_evaluation_draw_stays_inside_its_buckets_and_uses_distinct_images():
    images, labels = digits_model_input()
    batch = eval_batch(images, labels, seed=3)
    starts = torch.arange(0, 1000, BUCKET_WIDTH)[:, None]
    assert ((batch.t >= starts) & (batch.t < starts + BUCKET_WIDTH)).all()
    assert len({row.numpy().tobytes() for row in batch.x0}) == EVAL_IMAGES  # (the digits hold no duplicates here)
    assert torch.equal(eval_batch(images, labels, seed=3).eps, batch.eps)


@pytest.mark.parametrize("count, channels", [(16, 1), (5, 3)])
def test_the_grid_places_each_tile(count, channels):
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (count, channels, 8, 8), dtype=torch.uint8, generator=generator)
    grid = sample_grid(tiles)
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    assert grid.shape == (rows * 33 + 1, cols * 33 + 1, channels)
    for i in range(count):
        top, left = 1 + (i // cols) * 33, 1 + (i % cols) * 33
        # each 4x4 block of the enlarged tile holds one source pixel
        np.testing.assert_array_equal(grid[top:top + 32:4, left:left + 32:4], tiles[i].permute(1, 2, 0).numpy())


def closed_form_noising(schedule: str, t: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(alpha, sigma, network time) at bucket timestep t, from each schedule's definition written out here."""
    if schedule == "vp":  # beta(s) = 0.1 + 19.9 s on [0, 1]; the report noises at s = (t + 0.5) / 1000
        s = (t.double() + 0.5) / 1000
        alpha = torch.exp(-0.5 * (0.1 * s + 0.5 * 19.9 * s ** 2))
        return alpha, (1 - alpha ** 2).sqrt(), (999 * s).float()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled-linear
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), t + 1  # (the network reads t + 1)


@pytest.mark.parametrize("schedule", ["vp", "scaled-linear"])
def test_a_model_trained_on_another_schedule_is_reported_on_it(tmp_path, schedule):
    args, export = train_base(tmp_path)
    config = tmp_path / "train.toml"
    config.write_text(config.read_text() + f'schedule = "{schedule}"\n')
    assert main(args) == 0
    frame = pd.read_csv(report_paths(export)[1])
    network = load_model(tmp_path / "run" / "ema.pt")
    images, labels = digits_model_input()
    batch = eval_batch(images, labels, seed=0)
    expected = []
    with torch.no_grad():
        for bucket in range(len(batch.t)):
            per_image = []
            for i in range(len(batch.x0)):
                alpha, sigma, time = closed_form_noising(schedule, batch.t[bucket, i])
                eps = batch.eps[bucket, i]
                x_t = (alpha * batch.x0[i].double() + sigma * eps.double()).float()
                per_image.append((network(x_t[None], time[None], None)[0] - eps).pow(2).mean().item())
            expected.append(np.mean(per_image))
    np.testing.assert_allclose(frame["eps_mse"], expected, rtol=1e-4)
    assert Image.open(report_paths(export)[0]).size == (4 * 33 + 1, 4 * 33 + 1)  # (sampled on its own schedule)
