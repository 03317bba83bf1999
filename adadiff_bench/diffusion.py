"""Noise schedules' solvers and the sampling loop.

The default schedule is the discrete DDPM one: 1,000 steps, betas linear in 1e-4..0.02, eps prediction.
It is the discretisation of the VP-SDE with beta_min = 0.1, beta_max = 20 that U-ViT's pixel models use
(beta_i = beta(t_i) / N with N = 1000). Other schedules and the network's time input they go with are
named options (`schedules`). Discrete schedules run diffusers' schedulers; the continuous VP runs the
two samplers of U-ViT's and AdaDiff's official code, written here since diffusers has none that matches
them: Euler-Maruyama on the reverse SDE (`euler_maruyama`) and DPM-Solver-fast (`dpm_solver_fast`).
On discrete schedules `dpm_solver_pp_fast` is U-ViT's DPM-Solver++ for its latent models (diffusers'
`dpm-solver++` is the multistep variant on integer timesteps).

Randomness: sample i draws its initial noise, its label and every solver noise from its own
`torch.Generator`, seeded from (seed, i) alone, so batch size and process count never change it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from .device import autocast, to_device
from .models import variance
from .schedules import DEFAULT_SCHEDULE, ContinuousVP, DiscreteSchedule, check_schedule_and_solver, get_schedule

NUM_TRAIN_TIMESTEPS = 1000
EULER_MARUYAMA_END = 1e-3     # smallest time of Euler-Maruyama's grid (U-ViT's sde.euler_maruyama default)
DPM_SOLVER_FAST_END = 1e-4    # DPM-Solver-fast's end time (U-ViT's eval_ldm.py for its continuous-time models)
BETA_START, BETA_END = 1e-4, 0.02

_SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                 beta_schedule="linear", prediction_type="epsilon")

# name -> (diffusers class, options beyond the shared schedule)
SOLVER_SETTINGS = {
    "ddpm": (DDPMScheduler, dict(variance_type="fixed_small", clip_sample=False, timestep_spacing="trailing")),
    # the DiT paper's sampler: each step's variance interpolates (log) between beta_tilde and beta by the network's
    # variance output (a learned-sigma model's second half of channels, collected by `models.variance`), on ADM's
    # respaced grid (n timesteps evenly spaced from 0 to 999, rounded: diffusers' "linspace")
    "ddpm-learned": (DDPMScheduler, dict(variance_type="learned_range", clip_sample=False,
                                         timestep_spacing="linspace")),
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")),
    "dpm-solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                       lower_order_final=True)),
    "euler": (EulerDiscreteScheduler, dict(timestep_spacing="linspace")),
}

LEARNED_VARIANCE_SOLVERS = tuple(name for name, (_, options) in SOLVER_SETTINGS.items()
                                 if options.get("variance_type") == "learned_range")


@dataclass(frozen=True)
class SamplingContext:
    """What the sampling loop hands the denoiser with every call (as k-diffusion's samplers hand their callbacks)."""
    step: int                              # index of this network evaluation in the solver's schedule
    timesteps: np.ndarray                  # every model timestep the solver visits, in order (float64)
    rows: np.ndarray                       # run-wide indices of the batch's samples
    generators: Sequence[torch.Generator]  # each sample's own generator (randomness depends on (seed, row) only)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def is_last_step(self) -> bool:
        return self.step == len(self.timesteps) - 1


# eps = denoiser(x, t, y, ctx)
Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", SamplingContext], torch.Tensor]


def make_scheduler(solver: str, num_steps: int, schedule: str = DEFAULT_SCHEDULE):
    """A fresh diffusers scheduler for `solver` on a discrete `schedule`, set to `num_steps` steps."""
    cls, options = SOLVER_SETTINGS[solver]
    scheduler = cls(**get_schedule(schedule).diffusers_config(), **options)
    scheduler.set_timesteps(num_steps)
    return scheduler


def solver_timesteps(solver: str, num_steps: int, schedule: str = DEFAULT_SCHEDULE) -> np.ndarray:
    """The solver's times at which the network is evaluated, in order (what the step log's timestep axis holds):
    diffusers timesteps on a discrete schedule, continuous times in (0, 1] on the VP one."""
    noise_schedule = get_schedule(schedule)
    if solver == "euler-maruyama":
        return euler_maruyama_grid(num_steps)[:0:-1].copy()
    if solver == "dpm-solver-fast":
        return np.array([time for s, t, order in dpm_solver_fast_plan(noise_schedule, num_steps)
                         for time in dpm_solver_stage_times(noise_schedule, s, t, order)])
    if solver == "dpm-solver++-fast":
        return pp_fast_timesteps(noise_schedule, num_steps)[:-1].copy()
    return make_scheduler(solver, num_steps, schedule).timesteps.double().numpy()


def solver_options(solver: str) -> dict:
    """What run.json records of a solver: a diffusers scheduler's options, or a continuous solver's end time."""
    if solver in SOLVER_SETTINGS:
        return SOLVER_SETTINGS[solver][1]
    if solver == "dpm-solver++-fast":
        return {"grid": "time-uniform, t = 1 to 1/N", "orders": "fast (third)", "source": "adadiff_bench.diffusion"}
    end = DPM_SOLVER_FAST_END if solver == "dpm-solver-fast" else EULER_MARUYAMA_END
    return {"end_time": end, "source": "adadiff_bench.diffusion"}


def alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t for t = 0..999 (float64)."""
    return DDPMScheduler(**_SCHEDULE).alphas_cumprod.double()


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends only on (run seed, sample index)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(sample_seed(seed, i)) for i in indices]


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device="cpu") for g in generators])


def sample_labels(generators: Sequence[torch.Generator], num_classes: int) -> torch.Tensor | None:
    if num_classes <= 0:
        return None
    return torch.stack([torch.randint(num_classes, (), generator=g, device="cpu") for g in generators])


# eps = eps_at(step index, x, solver's time): one network evaluation, as the solvers below call it
NetworkCall = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(denoiser: Denoiser, solver: str, num_steps: int, image_shape: tuple[int, ...],
           indices: Sequence[int], seed: int, num_classes: int = 0,
           on_step: Callable[[SamplingContext], None] | None = None,
           device: torch.device | str = "cpu", precision: str = "fp32",
           schedule: str = DEFAULT_SCHEDULE, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Draw the samples `indices` of run `seed`; returns float32 images in model space ([-1, 1] ideally), on `device`.

    Each network evaluation gets a `SamplingContext`; `on_step(ctx)` is called before it (the step log hooks in).
    The denoiser's `t` is the network's time input under `schedule` (see `schedules`); `ctx.timesteps` holds
    the solver's own times. Noise and labels are drawn by each sample's CPU generator and then moved to
    `device`, so they never depend on it. The network runs under autocast at `precision`; the solver's
    arithmetic stays in float32. `condition` (one row per sample, e.g. each one's prompt tokens) replaces the
    drawn labels.
    """
    check_schedule_and_solver(schedule, solver, "sample")
    device = torch.device(device)
    generators = sample_generators(seed, indices)
    x = to_device(initial_noise(generators, image_shape), device)
    y = to_device(sample_labels(generators, num_classes) if condition is None else condition, device)
    rows = np.asarray(indices)
    if solver in SOLVER_SETTINGS:
        scheduler = make_scheduler(solver, num_steps, schedule)
        eps_at = network_edge(denoiser, schedule, scheduler.timesteps.double().numpy(), rows, generators, y,
                              on_step, device, precision, learned_variance=solver in LEARNED_VARIANCE_SOLVERS)
        return diffusers_sampler(eps_at, scheduler, x, generators)
    noise_schedule = get_schedule(schedule)
    eps_at = network_edge(denoiser, schedule, solver_timesteps(solver, num_steps, schedule), rows, generators, y,
                          on_step, device, precision)
    if solver == "dpm-solver++-fast":
        return dpm_solver_pp_fast(eps_at, x, noise_schedule, num_steps)
    if solver == "dpm-solver-fast":
        return dpm_solver_fast(eps_at, x, noise_schedule, num_steps)
    return euler_maruyama(eps_at, x, noise_schedule, num_steps, generators)


def network_edge(denoiser: Denoiser, schedule: str, timesteps: np.ndarray, rows: np.ndarray,
                 generators: Sequence[torch.Generator], y: torch.Tensor | None,
                 on_step: Callable[[SamplingContext], None] | None, device: torch.device,
                 precision: str, learned_variance: bool = False) -> NetworkCall:
    """What a solver calls for eps: builds the step's context, maps the solver's time to the network's time
    input (the only place where that happens), and runs the denoiser under autocast. With `learned_variance`
    it returns eps and the network's variance output side by side (channels), as diffusers' learned-range
    DDPM reads them."""
    network_time = get_schedule(schedule).network_time
    sink = variance.VarianceSink(len(rows)) if learned_variance else None

    def eps_at(step_index: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = SamplingContext(step_index, timesteps, rows, generators)
        if on_step is not None:
            on_step(ctx)
        with autocast(device, precision), variance.collecting(sink):
            eps = denoiser(x, to_device(network_time(t).expand(len(x)), device), y, ctx)
        return eps.float() if sink is None else torch.cat([eps.float(), sink.read()], dim=1)

    return eps_at


def diffusers_sampler(eps_at: NetworkCall, scheduler, x: torch.Tensor,
                      generators: Sequence[torch.Generator]) -> torch.Tensor:
    """A diffusers scheduler's loop; its random steps draw from each sample's generator."""
    x = x * scheduler.init_noise_sigma
    for step_index, t in enumerate(scheduler.timesteps):
        eps = eps_at(step_index, scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    return x


def euler_maruyama_grid(num_steps: int) -> np.ndarray:
    """U-ViT's grid: 0 followed by `num_steps` times evenly spaced from 1e-3 to 1 (float64, increasing)."""
    return np.append(0.0, np.linspace(EULER_MARUYAMA_END, 1.0, num_steps))


def euler_maruyama(eps_at: NetworkCall, x: torch.Tensor, vp: ContinuousVP, num_steps: int,
                   generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Euler-Maruyama on the reverse VP-SDE dx = [-beta x / 2 - beta score] dt + sqrt(beta) dw (Song et al. 2021),
    as U-ViT's `sde.euler_maruyama`: from t = 1 down the grid, fresh noise at every step except the last,
    noiseless one from eps to 0. One network evaluation per step; noise comes from each sample's generator."""
    grid = euler_maruyama_grid(num_steps)
    for step_index, (t, s) in enumerate(zip(grid[:0:-1], grid[-2::-1])):
        eps = eps_at(step_index, x, torch.tensor(t, dtype=torch.float32))
        beta, dt = vp.beta(t), s - t
        # reverse drift with score = -eps / sigma_t; dt < 0
        x = x + (-0.5 * beta * x + (beta / vp.sigma(t)) * eps) * dt
        if s > 0:
            x = x + math.sqrt(-beta * dt) * to_device(initial_noise(generators, tuple(x.shape[1:])), x.device)
    return x


def dpm_solver_fast_plan(vp: ContinuousVP, num_steps: int) -> list[tuple[float, float, int]]:
    """DPM-Solver-fast's steps (Lu et al. 2022, sec. 3.4) as (from s, to t, order): num_steps // 3 + 1 intervals
    evenly spaced in half-log-SNR from t = 1 to 1e-4, third order but for a last second- and/or first-order
    one, so that the orders add up to `num_steps` network evaluations."""
    orders = fast_orders(num_steps)
    lambdas = np.linspace(vp.half_log_snr(1.0), vp.half_log_snr(DPM_SOLVER_FAST_END), len(orders) + 1)
    times = [vp.time_of_half_log_snr(lam) for lam in lambdas]
    return [(times[i], times[i + 1], order) for i, order in enumerate(orders)]


def fast_orders(num_steps: int) -> list[int]:
    """DPM-Solver-fast's orders: third order but for a last second- and/or first-order step, adding up to
    `num_steps` network evaluations over num_steps // 3 + 1 steps."""
    steps = num_steps // 3 + 1
    return [3] * (steps - 2) + [2, 1] if num_steps % 3 == 0 else [3] * (steps - 1) + [num_steps % 3]


DPM_SOLVER_RATIOS = {1: (0.0,), 2: (0.0, 0.5), 3: (0.0, 1 / 3, 2 / 3)}  # where in [lambda_s, lambda_t] a stage evaluates


def dpm_solver_stage_times(vp: ContinuousVP, s: float, t: float, order: int) -> list[float]:
    """The times at which a DPM-Solver step of `order` from s to t evaluates the network."""
    lam_s, h = vp.half_log_snr(s), vp.half_log_snr(t) - vp.half_log_snr(s)
    return [s if r == 0 else vp.time_of_half_log_snr(lam_s + r * h) for r in DPM_SOLVER_RATIOS[order]]


def dpm_solver_fast(eps_at: NetworkCall, x: torch.Tensor, vp: ContinuousVP, num_steps: int) -> torch.Tensor:
    """DPM-Solver-fast with noise prediction (Lu et al. 2022, algorithms 1 and 2: DPM-Solver-1, -2 with r1 = 1/2,
    -3 with r1 = 1/3, r2 = 2/3), as the official solver's `fast_version` that U-ViT's and AdaDiff's ImageNet
    evaluation runs; no final denoising step. Coefficients in float64, the sample in float32."""
    step_index = 0

    def eps(x_in: torch.Tensor, time: float) -> torch.Tensor:
        nonlocal step_index
        out = eps_at(step_index, x_in, torch.tensor(time, dtype=torch.float32))
        step_index += 1
        return out

    def first_order(x_s, s, t, eps_s):  # x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s
        h = vp.half_log_snr(t) - vp.half_log_snr(s)
        return math.exp(vp.log_alpha(t) - vp.log_alpha(s)) * x_s - vp.sigma(t) * math.expm1(h) * eps_s

    for s, t, order in dpm_solver_fast_plan(vp, num_steps):
        times = dpm_solver_stage_times(vp, s, t, order)
        h = vp.half_log_snr(t) - vp.half_log_snr(s)
        eps_s = eps(x, s)
        if order == 1:
            x = first_order(x, s, t, eps_s)
        elif order == 2:
            eps_1 = eps(first_order(x, s, times[1], eps_s), times[1])
            x = first_order(x, s, t, eps_s) - vp.sigma(t) * math.expm1(h) * (eps_1 - eps_s)  # 0.5 / r1 = 1
        else:
            r1, r2 = DPM_SOLVER_RATIOS[3][1:]
            eps_1 = eps(first_order(x, s, times[1], eps_s), times[1])
            # u2 = first-order to s2, corrected by the first difference (phi_2 terms of algorithm 2)
            phi_2_at_s2 = math.expm1(r2 * h) / (r2 * h) - 1
            u2 = first_order(x, s, times[2], eps_s) - (r2 / r1) * vp.sigma(times[2]) * phi_2_at_s2 * (eps_1 - eps_s)
            eps_2 = eps(u2, times[2])
            phi_2 = math.expm1(h) / h - 1
            x = first_order(x, s, t, eps_s) - (1 / r2) * vp.sigma(t) * phi_2 * (eps_2 - eps_s)
    return x


def pp_fast_timesteps(schedule: DiscreteSchedule, num_steps: int) -> np.ndarray:
    """U-ViT's grid for DPM-Solver++ on a discrete schedule: continuous time t = (index + 1) / N evenly spaced from
    1 to 1 / N (`num_steps` + 1 points), as fractional diffusers indices N t - 1 (999 down to 0)."""
    n = schedule.num_train_timesteps
    return np.linspace(1.0, 1.0 / n, num_steps + 1) * n - 1


def dpm_solver_pp_fast(eps_at: NetworkCall, x: torch.Tensor, schedule: DiscreteSchedule,
                       num_steps: int) -> torch.Tensor:
    """DPM-Solver++ with data prediction (Lu et al. 2022b), singlestep, the fast orders on a time-uniform grid whose
    points are also the intermediate stages: U-ViT's `dpm_solver_pp` as its discrete-time (SD-schedule) models
    sample, `sample(steps, eps=1/N, T=1)` with its defaults. Between the schedule's steps log alpha is linear in
    time, as there. No final denoising step; coefficients in float64, the sample in float32."""
    n = schedule.num_train_timesteps
    grid = pp_fast_timesteps(schedule, num_steps)
    log_alpha = np.interp(grid, np.arange(n), 0.5 * np.log(schedule.alphas_cumprod().numpy()))
    alpha, sigma = np.exp(log_alpha), np.sqrt(-np.expm1(2 * log_alpha))
    lam = log_alpha - np.log(sigma)

    def data_prediction(i: int, x_i: torch.Tensor) -> torch.Tensor:  # x0 = (x - sigma eps) / alpha at grid point i
        eps = eps_at(i, x_i, torch.tensor(grid[i], dtype=torch.float32))
        return (x_i - sigma[i] * eps) / alpha[i]

    def first_order(x_s, s, t, x0_s):  # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s
        return (sigma[t] / sigma[s]) * x_s - alpha[t] * math.expm1(-(lam[t] - lam[s])) * x0_s

    s = 0
    for order in fast_orders(num_steps):
        t, h = s + order, lam[s + order] - lam[s]
        x0_s = data_prediction(s, x)
        if order == 1:
            x = first_order(x, s, t, x0_s)
        elif order == 2:
            r1 = (lam[s + 1] - lam[s]) / h
            x0_1 = data_prediction(s + 1, first_order(x, s, s + 1, x0_s))
            x = first_order(x, s, t, x0_s) - (0.5 / r1) * alpha[t] * math.expm1(-h) * (x0_1 - x0_s)
        else:
            r1, r2 = (lam[s + 1] - lam[s]) / h, (lam[s + 2] - lam[s]) / h
            x0_1 = data_prediction(s + 1, first_order(x, s, s + 1, x0_s))
            phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1
            u2 = first_order(x, s, s + 2, x0_s) + (r2 / r1) * alpha[s + 2] * phi_22 * (x0_1 - x0_s)
            x0_2 = data_prediction(s + 2, u2)
            x = first_order(x, s, t, x0_s) + (1 / r2) * alpha[t] * (math.expm1(-h) / h + 1) * (x0_2 - x0_s)
        s = t
    return x


def add_noise(x0: torch.Tensor, generator: torch.Generator,
              alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, eps, x_t) with t uniform in 0..999 and x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.

    `generator` is a CPU generator: t and eps are drawn on the CPU, then moved to x0's device."""
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=generator, device="cpu")
    eps = to_device(torch.randn(x0.shape, generator=generator, device="cpu"), x0.device)
    a = alpha_bar[t].float().view(-1, 1, 1, 1).to(x0.device)
    t = to_device(t, x0.device)
    return t, eps, a.sqrt() * x0 + (1 - a).sqrt() * eps


def training_loss(model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
                  alpha_bar: torch.Tensor) -> torch.Tensor:
    """L_simple: ||eps - eps_theta(x_t, t)||^2."""
    t, eps, xt = add_noise(x0, generator, alpha_bar)
    return (model(xt, t, y) - eps).pow(2).mean()


@functools.lru_cache(maxsize=None)
def schedule_alphas_cumprod(schedule: str) -> torch.Tensor:
    """alpha_bar of a discrete schedule as diffusers' schedulers hold it (float32 betas): what they sample with."""
    return DDPMScheduler(**get_schedule(schedule).diffusers_config()).alphas_cumprod.double()


def add_schedule_noise(x0: torch.Tensor, generator: torch.Generator,
                       schedule: str = DEFAULT_SCHEDULE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network's time input, eps, x_t) at a random time of `schedule`, drawn on the CPU by `generator`.

    Discrete schedules draw as `add_noise` (the linear one is exactly it); the network reads t + offset.
    The continuous VP draws t uniform in [0, 1) and x_t = alpha_t x0 + sigma_t eps; the network reads 999 t."""
    noise_schedule = get_schedule(schedule)
    if noise_schedule.kind == "discrete":
        t, eps, xt = add_noise(x0, generator, schedule_alphas_cumprod(schedule))
        return noise_schedule.network_time(t), eps, xt
    t = noise_schedule.training_times(len(x0), generator)
    eps = to_device(torch.randn(x0.shape, generator=generator, device="cpu"), x0.device)
    alpha, sigma = (v.float().view(-1, 1, 1, 1).to(x0.device) for v in noise_schedule.alpha_sigma(t))
    return to_device(noise_schedule.network_time(t).float(), x0.device), eps, alpha * x0 + sigma * eps


def schedule_training_loss(model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor | None,
                           generator: torch.Generator, schedule: str = DEFAULT_SCHEDULE) -> torch.Tensor:
    """L_simple on `schedule`, the network reading its time input as sampling will feed it."""
    t, eps, xt = add_schedule_noise(x0, generator, schedule)
    return (model(xt, t, y) - eps).pow(2).mean()
