"""Sampling: one generator per sample (batch size never changes an image), the step log and FLOPs accounting."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.diffusion import alphas_cumprod, make_scheduler, sample_seed, solver_timesteps
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.data import to_uint8


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm-solver++", "euler"])
def test_batch_size_never_changes_an_image(tiny_model, solver):
    cell = Cell("full", (), solver, 4, seed=3)
    images = [generate(cell, tiny_model, 64, batch_size)[0] for batch_size in (1, 7, 64)]
    for other in images[1:]:
        assert torch.equal(other, images[0])  # bit for bit, floats included
        assert torch.equal(to_uint8(other), to_uint8(images[0]))


def test_samples_depend_on_seed_and_index_only(tiny_model):
    first = generate(Cell("full", (), "ddpm", 3, seed=0), tiny_model, 8, 8)[0]
    again = generate(Cell("full", (), "ddpm", 3, seed=0), tiny_model, 8, 8)[0]
    other_seed = generate(Cell("full", (), "ddpm", 3, seed=1), tiny_model, 8, 8)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed)
    assert len({sample_seed(0, i) for i in range(1000)} | {sample_seed(1, i) for i in range(1000)}) == 2000


def test_schedule_is_linear_ddpm_and_matches_the_vp_sde():
    alpha_bar = alphas_cumprod()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(alpha_bar, torch.cumprod(1 - betas, 0), rtol=1e-6)
    # VP-SDE with beta(t) = 0.1 + 19.9 t: alpha_bar(t) = exp(-(0.1 t + 19.9 t^2 / 2)); beta_i = beta(t_i) / 1000
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    continuous = torch.exp(-(0.1 * t + 19.9 * t ** 2 / 2))
    assert torch.allclose(alpha_bar, continuous, atol=2e-3)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm-solver++", "euler"])
def test_solvers_are_diffusers_schedulers_with_the_requested_steps(solver):
    scheduler = make_scheduler(solver, 10)
    assert type(scheduler).__module__.startswith("diffusers.")
    assert len(solver_timesteps(solver, 10)) == 10
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"


def test_full_step_log_and_macs_agree_with_a_dispatch_level_count(tiny_model):
    cell = Cell("full", (), "ddim", 3, seed=0)
    n = 6
    flops = dispatch_flops(lambda: generate(cell, tiny_model, n, 4))
    _, log = generate(cell, tiny_model, n, 4)
    costs = unit_costs(tiny_model)
    assert log.blocks_run.all() and log.layer_ratio() == 1.0
    assert (log.exit_point == tiny_model.num_blocks).all()
    per_eval = costs.embed + costs.blocks.sum() + costs.head
    assert log.macs_per_image(costs) == pytest.approx(3 * per_eval)
    assert log.macs_per_image(costs) == pytest.approx(flops / 2 / n, rel=0.01)
    hist = log.timestep_exit_histogram()
    assert hist.shape == (3, tiny_model.num_blocks + 1) and (hist[:, -1] == n).all()
    assert np.array_equal(log.timesteps, solver_timesteps("ddim", 3))


@pytest.mark.parametrize("solver", ["ddim", "dpm-solver++"])
def test_the_denoiser_gets_a_sampling_context_with_every_call(tiny_model, solver):
    from adadiff_bench.diffusion import SamplingContext, sample
    seen, announced = [], []

    def denoiser(x, t, y, ctx):
        assert isinstance(ctx, SamplingContext) and announced[-1] is ctx  # on_step saw it just before
        seen.append((ctx.step, float(t[0]), ctx))
        with torch.no_grad():
            return tiny_model(x, t, y)

    indices = [10, 11, 12]
    images = sample(denoiser, solver, 4, (1, 8, 8), indices, seed=3, on_step=announced.append)
    expected_timesteps = solver_timesteps(solver, 4)
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    for step, t, ctx in seen:
        assert ctx.timesteps.dtype == np.float64 and np.array_equal(ctx.timesteps, expected_timesteps)
        assert t == pytest.approx(ctx.timesteps[ctx.step])  # the model timestep of this evaluation
        assert ctx.rows.tolist() == indices and len(ctx.generators) == 3 and ctx.num_steps == 4
        assert ctx.is_last_step == (step == 3)
    # the same samples through the harness's loop (batch of 3 starting at sample 10 of a 13-sample run)
    full, _ = generate(Cell("full", (), solver, 4, seed=3), tiny_model, 13, 10)
    assert torch.equal(images, full[10:])
