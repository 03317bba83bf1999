"""Noise schedules, the network's time-input conventions, and the solvers against closed forms.

On Gaussian data x_0 ~ N(m, s^2) the marginal at every time is Gaussian, x_t ~ N(alpha_t m, alpha_t^2 s^2 +
sigma_t^2), so the true noise prediction is known in closed form:
    eps*(x_t, t) = sigma_t (x_t - alpha_t m) / (alpha_t^2 s^2 + sigma_t^2).
A solver fed with it must return samples whose mean and variance are the data's.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from adadiff_bench.diffusion import (DPM_SOLVER_FAST_END, dpm_solver_fast_plan, initial_noise, sample,
                                     sample_generators, solver_timesteps)
from adadiff_bench.errors import UserError
from adadiff_bench.schedules import SCHEDULES, check_schedule_and_solver, get_schedule

DATA_MEAN, DATA_STD = 0.3, 0.5
SHAPE = (1, 16, 16)
NUM_SAMPLES = 48  # 12,288 pixel values: the mean's standard error is 0.0045, the variance's about 1.3%


def gaussian_eps(schedule_name: str):
    """The exact eps of Gaussian data, read at the solver's own time (ctx.timesteps)."""
    schedule = get_schedule(schedule_name)

    def denoiser(x, t, y, ctx):
        alpha, sigma = (v.float().item() for v in schedule.alpha_sigma(torch.tensor([ctx.timesteps[ctx.step]])))
        return sigma * (x - alpha * DATA_MEAN) / (alpha ** 2 * DATA_STD ** 2 + sigma ** 2)

    return denoiser


def assert_matches_data(images: torch.Tensor, mean_tol: float = 0.02, var_rtol: float = 0.06) -> None:
    assert images.mean().item() == pytest.approx(DATA_MEAN, abs=mean_tol)
    assert images.var().item() == pytest.approx(DATA_STD ** 2, rel=var_rtol)


# ---- the schedules themselves -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "scaled-linear"])
def test_discrete_schedules_are_diffusers_own(name):
    schedule = get_schedule(name)
    ours = schedule.alphas_cumprod()
    theirs = DDPMScheduler(**schedule.diffusers_config()).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-5)
    alpha, sigma = schedule.alpha_sigma(torch.arange(1000))
    assert torch.allclose(alpha ** 2, ours, rtol=1e-9) and torch.allclose(alpha ** 2 + sigma ** 2, torch.ones(1000).double())


def test_scaled_linear_is_stable_diffusions():
    betas = get_schedule("scaled-linear").betas()
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999))  # linear in sqrt(beta)


def test_vp_schedule_closed_form():
    vp = get_schedule("vp")
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    alpha, sigma = vp.alpha_sigma(t)
    assert torch.allclose(alpha ** 2, torch.exp(-(0.1 * t + 19.9 * t ** 2 / 2)))
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    # d log alpha / dt = -beta(t) / 2
    h = 1e-6
    slope = (vp.log_alpha(t + h) - vp.log_alpha(t - h)) / (2 * h)
    assert torch.allclose(slope, -vp.beta(t) / 2, atol=1e-6)


# ---- the time-input conventions, seen by a network that returns its time input --------------------

def time_inputs(schedule: str, solver: str, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(the network's time inputs, the solver's times) of one sampling run, step by step."""
    seen, solver_times = [], []

    def time_echo(x, t, y, ctx):
        seen.append(t.double().numpy().copy())
        solver_times.append(ctx.timesteps[ctx.step])
        return torch.zeros_like(x) + t.float().view(-1, 1, 1, 1) * 0
    sample(time_echo, solver, num_steps, (1, 2, 2), [0, 1], seed=0, schedule=schedule)
    assert all((row == row[0]).all() for row in seen)  # one time per step for the whole batch
    return np.array([row[0] for row in seen]), np.array(solver_times)


@pytest.mark.parametrize("solver", ["ddpm", "dpm-solver++", "euler"])
def test_linear_network_time_is_the_diffusers_timestep(solver):
    network, times = time_inputs("linear", solver, 10)
    assert np.array_equal(network, times)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm-solver++", "euler"])
def test_scaled_linear_network_time_is_one_more(solver):
    network, times = time_inputs("scaled-linear", solver, 10)
    assert np.allclose(network, times + 1)


def test_scaled_linear_full_schedule_reads_1_to_1000():
    network, _ = time_inputs("scaled-linear", "ddpm", 1000)
    assert network.max() == 1000 and network.min() == 1 and len(np.unique(network)) == 1000


def test_vp_network_time_is_999_t_on_eulers_grid():
    network, times = time_inputs("vp", "euler-maruyama", 5)
    assert np.allclose(times, [1.0, 0.75025, 0.5005, 0.25075, 0.001])  # linspace(1e-3, 1, 5), from 1 down
    assert np.allclose(network, 999 * times, rtol=1e-6)
    assert np.allclose(solver_timesteps("euler-maruyama", 5, "vp"), times)


def test_solvers_refuse_schedules_they_were_not_written_for():
    with pytest.raises(UserError, match="does not run schedule 'vp'"):
        check_schedule_and_solver("vp", "ddim", "config")
    with pytest.raises(UserError, match="solver 'euler-maruyama' does not run schedule 'linear'"):
        check_schedule_and_solver("linear", "euler-maruyama", "config")
    with pytest.raises(UserError, match="did you mean 'scaled-linear'"):
        check_schedule_and_solver("scaled_linear", "ddim", "config")
    assert set(SCHEDULES) == {"linear", "scaled-linear", "vp"}


# ---- solvers on Gaussian data -----------------------------------------------------------------

def test_euler_maruyama_on_vp_samples_the_data_distribution():
    images = sample(gaussian_eps("vp"), "euler-maruyama", 1000, SHAPE, range(NUM_SAMPLES), seed=1, schedule="vp")
    assert_matches_data(images)


def test_euler_maruyama_with_too_few_steps_is_visibly_off():
    """The check above can fail: 3 steps of Euler-Maruyama do not reach the data's variance."""
    images = sample(gaussian_eps("vp"), "euler-maruyama", 3, SHAPE, range(NUM_SAMPLES), seed=1, schedule="vp")
    assert abs(images.var().item() - DATA_STD ** 2) > 0.1 * DATA_STD ** 2


def test_euler_maruyama_draws_noise_at_every_step_but_the_last():
    """Each sample's generator draws the initial noise and one noise per step except the final, noiseless one."""
    num_steps, indices = 7, [4, 9]
    generators = sample_generators(2, indices)
    sample(gaussian_eps("vp"), "euler-maruyama", num_steps, SHAPE, indices, seed=2, schedule="vp")
    for _ in range(num_steps):  # initial noise + (num_steps - 1) step noises
        initial_noise(generators, SHAPE)
    expected_next = initial_noise(generators, SHAPE)
    replay = sample_generators(2, indices)
    for _ in range(num_steps):
        initial_noise(replay, SHAPE)
    assert torch.equal(initial_noise(replay, SHAPE), expected_next)
    # and a run that drew one fewer noise would leave the generators elsewhere
    short = sample_generators(2, indices)
    for _ in range(num_steps - 1):
        initial_noise(short, SHAPE)
    assert not torch.equal(initial_noise(short, SHAPE), expected_next)


def test_euler_maruyama_consumes_exactly_the_generators_noise():
    """Rebuilding the run by hand from the same generators (noise in the same order) gives the same images."""
    vp, num_steps, indices = get_schedule("vp"), 6, [0, 3]
    denoiser = gaussian_eps("vp")
    images = sample(denoiser, "euler-maruyama", num_steps, SHAPE, indices, seed=5, schedule="vp")
    generators = sample_generators(5, indices)
    x = initial_noise(generators, SHAPE).double()
    grid = [0.0] + list(np.linspace(1e-3, 1, num_steps))
    times = list(reversed(grid))  # 1, ..., eps, 0
    for t, s in zip(times[:-1], times[1:]):
        alpha, sigma = math.exp(vp.log_alpha(t)), vp.sigma(t)
        eps = sigma * (x - alpha * DATA_MEAN) / (alpha ** 2 * DATA_STD ** 2 + sigma ** 2)
        beta = vp.beta(t)
        x = x + (s - t) * (-0.5 * beta * x + beta * eps / sigma)
        if s > 0:
            x = x + math.sqrt(beta * (t - s)) * initial_noise(generators, SHAPE).double()
    assert torch.allclose(images.double(), x, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "scaled-linear"])
@pytest.mark.parametrize("solver,num_steps", [("ddpm", 500), ("ddim", 250), ("dpm-solver++", 100), ("euler", 250)])
def test_discrete_solvers_sample_the_data_distribution(schedule, solver, num_steps):
    """Enough steps that the discretisation error stays inside the tolerance (at 25 steps these solvers land
    10-20% below the data's variance on this data; SD's schedule, whose last time still holds alpha = 0.07 of
    signal, starts from pure noise and so lands about 0.01 below the data's mean)."""
    images = sample(gaussian_eps(schedule), solver, num_steps, SHAPE, range(NUM_SAMPLES), seed=1, schedule=schedule)
    assert_matches_data(images)


# ---- DPM-Solver-fast on the continuous VP ---------------------------------------------------------

def exact_ode_solution(x_1: torch.Tensor, t_end: float) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data keeps (x_t - alpha_t m) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed."""
    vp = get_schedule("vp")

    def spread(t):
        alpha, sigma = vp.alpha_sigma(torch.tensor(t))
        return alpha, torch.sqrt(alpha ** 2 * DATA_STD ** 2 + sigma ** 2)
    (alpha_1, v_1), (alpha_e, v_e) = spread(1.0), spread(t_end)
    return alpha_e * DATA_MEAN + v_e * (x_1.double() - alpha_1 * DATA_MEAN) / v_1


def dpm_solver_fast_error(num_steps: int) -> float:
    indices = range(8)
    images = sample(gaussian_eps("vp"), "dpm-solver-fast", num_steps, SHAPE, indices, seed=1, schedule="vp")
    x_1 = initial_noise(sample_generators(1, indices), SHAPE)
    return (images.double() - exact_ode_solution(x_1, DPM_SOLVER_FAST_END)).abs().max().item()


def test_dpm_solver_fast_solves_the_ode_to_third_order():
    """50 evaluations (the paper's ImageNet setting) land on the closed-form ODE solution; halving the step
    in half-log-SNR (9 -> 17 intervals) cuts the error by more than a second-order method could."""
    error_24, error_50 = dpm_solver_fast_error(24), dpm_solver_fast_error(50)
    assert error_50 < 2e-3
    assert error_24 / error_50 > (17 / 9) ** 2 * 1.3


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 5, 6, 7, 50])
def test_dpm_solver_fast_plan(num_steps):
    vp = get_schedule("vp")
    plan = dpm_solver_fast_plan(vp, num_steps)
    orders = [order for _, _, order in plan]
    assert sum(orders) == num_steps and len(plan) == num_steps // 3 + 1
    assert all(order == 3 for order in orders[:-2]) and all(order in (1, 2, 3) for order in orders)
    ends = [plan[0][0]] + [t for _, t, _ in plan]
    assert ends[0] == pytest.approx(1.0) and ends[-1] == pytest.approx(DPM_SOLVER_FAST_END)
    lambdas = np.array([vp.half_log_snr(t) for t in ends])
    assert np.allclose(np.diff(lambdas), np.diff(lambdas)[0])  # evenly spaced in half-log-SNR
    times = solver_timesteps("dpm-solver-fast", num_steps, "vp")
    assert len(times) == num_steps and times[0] == pytest.approx(1.0) and (np.diff(times) < 0).all()


def test_dpm_solver_fast_network_time_is_999_t():
    network, times = time_inputs("vp", "dpm-solver-fast", 8)
    assert np.allclose(times, solver_timesteps("dpm-solver-fast", 8, "vp"))
    assert np.allclose(network, 999 * times, rtol=1e-6)


def test_half_log_snr_inverse():
    vp = get_schedule("vp")
    for t in (1e-4, 1e-3, 0.2, 0.7, 1.0):
        assert vp.time_of_half_log_snr(vp.half_log_snr(t)) == pytest.approx(t, rel=1e-9)


# ---- U-ViT's DPM-Solver++ on the discrete schedules -------------------------------------------------

def discrete_ode_error(schedule_name: str, num_steps: int) -> float:
    """Max error against the closed-form ODE solution from index 999 to 0. Step counts that divide 999 keep every
    grid point on an integer index, where the test's eps and the solver's schedule agree exactly."""
    schedule, indices = get_schedule(schedule_name), range(8)

    def spread(index):
        alpha, sigma = schedule.alpha_sigma(torch.tensor([float(index)]))
        return alpha, torch.sqrt(alpha ** 2 * DATA_STD ** 2 + sigma ** 2)
    (alpha_1, v_1), (alpha_0, v_0) = spread(999), spread(0)
    x_1 = initial_noise(sample_generators(1, indices), SHAPE).double()
    exact = alpha_0 * DATA_MEAN + v_0 * (x_1 - alpha_1 * DATA_MEAN) / v_1
    images = sample(gaussian_eps(schedule_name), "dpm-solver++-fast", num_steps, SHAPE, indices, seed=1,
                    schedule=schedule_name)
    return (images.double() - exact).abs().max().item()


@pytest.mark.parametrize("schedule", ["linear", "scaled-linear"])
def test_dpm_solver_pp_fast_converges_to_the_ode_solution(schedule):
    errors = [discrete_ode_error(schedule, n) for n in (27, 111, 333)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3


def test_dpm_solver_pp_fast_grid_and_time_input():
    """U-ViT's grid for its SD-schedule models: t from 1 to 1/N evenly, read by the network as N t (1000 down to
    20 for 50 steps; the last grid point, 1, is where the solver ends, not evaluated)."""
    network, times = time_inputs("scaled-linear", "dpm-solver++-fast", 50)
    assert np.allclose(network, np.linspace(1000, 1, 51)[:-1], atol=1e-4)
    assert np.allclose(times, network - 1, atol=1e-4)


# ---- training on each schedule: the draws, the checkpoint's record, the check at sampling -------------------

def replayed_training_draw(name: str, x0: torch.Tensor, seed: int):
    """What one training draw must be, from the definitions: the time (DDPM: uniform integer timestep; VP: uniform
    in [0, 1)) and the noise from one CPU generator, alpha_t^2 = prod(1 - beta) (betas in float64) or exp(-(0.1 t
    + 19.9 t^2 / 2)), and the network input t, t + 1 or 999 t."""
    generator = torch.Generator().manual_seed(seed)
    if name == "vp":
        t = torch.rand(len(x0), generator=generator, dtype=torch.float64)
        alpha_sq = torch.exp(-(0.1 * t + 19.9 * t ** 2 / 2))
        network_t = 999 * t
    else:
        t = torch.randint(0, 1000, (len(x0),), generator=generator)
        start, end = (1e-4, 0.02) if name == "linear" else (0.00085, 0.012)
        betas = torch.linspace(start, end, 1000, dtype=torch.float64) if name == "linear" else \
            torch.linspace(start ** 0.5, end ** 0.5, 1000, dtype=torch.float64) ** 2
        alpha_sq = torch.cumprod(1 - betas, 0)[t]
        network_t = t + (1 if name == "scaled-linear" else 0)
    eps = torch.randn(x0.shape, generator=generator)
    alpha_sq = alpha_sq.view(-1, 1, 1, 1)
    return network_t.double(), eps, alpha_sq.sqrt() * x0 + (1 - alpha_sq).sqrt() * eps


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_training_draws_follow_each_schedule(name):
    from adadiff_bench.diffusion import add_schedule_noise
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t, eps, xt = add_schedule_noise(x0, torch.Generator().manual_seed(7), name)
    expected_t, expected_eps, expected_xt = replayed_training_draw(name, x0, 7)
    assert torch.allclose(t.double(), expected_t, rtol=1e-6)
    assert torch.equal(eps, expected_eps)
    assert torch.allclose(xt.double(), expected_xt, atol=2e-6)  # (diffusers' float32 betas, float32 images)


def test_training_on_the_linear_schedule_is_todays_loss_bit_for_bit(tiny_model):
    from adadiff_bench.diffusion import alphas_cumprod, schedule_training_loss, training_loss
    x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    today = training_loss(tiny_model, x0, None, torch.Generator().manual_seed(3), alphas_cumprod())
    assert torch.equal(schedule_training_loss(tiny_model, x0, None, torch.Generator().manual_seed(3)), today)


def write_train_config(tmp_path, schedule: str) -> Path:
    from conftest import TINY
    model = "".join(f"{key} = {getattr(TINY, key)}\n"
                    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"))
    path = tmp_path / f"train_{schedule}.toml"
    path.write_text(f'[model]\n{model}\n[train]\nsteps = 3\nbatch_size = 8\nwarmup_steps = 0\nthreads = 1\n'
                    f'checkpoint_every = 3\nschedule = "{schedule}"\nout_dir = "{tmp_path / schedule}"\n')
    return path


def sampling_run(tmp_path, checkpoint, schedule: str, solver: str) -> Path:
    from conftest import write_run_config
    return write_run_config(tmp_path, checkpoint, sampling=f'schedule = "{schedule}"\nsolver = "{solver}"\n'
                            'num_steps = 2\nnum_samples = 2\nbatch_size = 2', timing="enabled = false",
                            metrics='inception = "off"\nprc = false\nisc_splits = 2\nkid_subset_size = 2')


@pytest.mark.parametrize("schedule, solver, other, other_solver", [
    ("scaled-linear", "dpm-solver++-fast", "linear", "ddim"), ("vp", "euler-maruyama", "scaled-linear", "ddim")])
def test_train_on_a_schedule_records_it_and_sampling_checks_it(tmp_path, capsys, schedule, solver, other,
                                                               other_solver):
    from adadiff_bench.checkpoints import read_checkpoint
    from adadiff_bench.cli import main
    assert main(["train", "--config", str(write_train_config(tmp_path, schedule)), "--no-progress"]) == 0
    checkpoint = tmp_path / schedule / "ema.pt"
    meta = read_checkpoint(checkpoint)["meta"]
    assert meta["schedule"] == schedule and meta["train_config"]["train"]["schedule"] == schedule
    # sampled with the schedule it was trained on: a run; with another: one line, exit 2, nothing written
    assert main(["run", "--config", str(sampling_run(tmp_path, checkpoint, other, other_solver)),
                 "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and not (tmp_path / "results").exists()
    assert f"[sampling] schedule is '{other}' but checkpoint '{checkpoint}' was trained with '{schedule}'" in error
    assert main(["run", "--config", str(sampling_run(tmp_path, checkpoint, schedule, solver)), "--no-progress"]) == 0


def test_training_steps_on_the_vp_schedule_lower_its_loss(tiny_model, one_thread):
    """A few optimiser steps on the VP draws reduce L_simple on held-out draws (the loss is the schedule's)."""
    from adadiff_bench.diffusion import schedule_training_loss
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)

    def held_out() -> float:
        with torch.no_grad():
            return float(schedule_training_loss(tiny_model, x0, None, torch.Generator().manual_seed(99), "vp"))

    before = held_out()
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        optimizer.zero_grad()
        schedule_training_loss(tiny_model, x0, None, generator, "vp").backward()
        optimizer.step()
    assert held_out() < 0.9 * before


def test_an_unknown_training_schedule_and_a_method_task_off_linear_are_one_line(tmp_path):
    from adadiff_bench.training import load_train_config, training_task
    path = write_train_config(tmp_path, "cosine")
    with pytest.raises(UserError, match=r"\[train\]: unknown schedule 'cosine'.*valid: linear, scaled-linear, vp"):
        load_train_config(path)
    config = load_train_config(write_train_config(tmp_path, "vp"))
    config.task = "adadiff"
    with pytest.raises(UserError, match=r"schedule = 'vp' trains a U-ViT from scratch; \[adadiff\] trains on the "
                                        r"'linear' schedule only"):
        training_task(config, None)
