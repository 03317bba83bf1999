"""Noise schedule, diffusers solvers and the sampling loop.

The schedule is the discrete DDPM one: 1,000 steps, betas linear in 1e-4..0.02, eps prediction. It
is the discretisation of the VP-SDE with beta_min = 0.1, beta_max = 20 that U-ViT's pixel models use
(beta_i = beta(t_i) / N with N = 1000). Solvers are diffusers' schedulers; this module never writes
a solver step itself.

Randomness: sample i draws its initial noise, its label and every solver noise from its own
`torch.Generator`, seeded from (seed, i) alone, so batch size and process count never change it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from .device import autocast, to_device

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02

_SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                 beta_schedule="linear", prediction_type="epsilon")

# name -> (diffusers class, options beyond the shared schedule)
SOLVER_SETTINGS = {
    "ddpm": (DDPMScheduler, dict(variance_type="fixed_small", clip_sample=False, timestep_spacing="trailing")),
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")),
    "dpm-solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                       lower_order_final=True)),
    "euler": (EulerDiscreteScheduler, dict(timestep_spacing="linspace")),
}



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


def make_scheduler(solver: str, num_steps: int):
    """A fresh diffusers scheduler for `solver`, set to `num_steps` steps."""
    cls, options = SOLVER_SETTINGS[solver]
    scheduler = cls(**_SCHEDULE, **options)
    scheduler.set_timesteps(num_steps)
    return scheduler


def solver_timesteps(solver: str, num_steps: int) -> np.ndarray:
    """The model timesteps a solver visits, in order (what the step log's timestep axis holds)."""
    return make_scheduler(solver, num_steps).timesteps.double().numpy()


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


@torch.no_grad()
def sample(denoiser: Denoiser, solver: str, num_steps: int, image_shape: tuple[int, ...],
           indices: Sequence[int], seed: int, num_classes: int = 0,
           on_step: Callable[[SamplingContext], None] | None = None,
           device: torch.device | str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """Draw the samples `indices` of run `seed`; returns float32 images in model space ([-1, 1] ideally), on `device`.

    Each network evaluation gets a `SamplingContext`; `on_step(ctx)` is called before it (the step log hooks in).
    Noise and labels are drawn by each sample's CPU generator and then moved to `device`, so they never depend
    on it. The network runs under autocast at `precision`; the solver's arithmetic stays in float32.
    """
    device = torch.device(device)
    generators = sample_generators(seed, indices)
    x = to_device(initial_noise(generators, image_shape), device)
    y = to_device(sample_labels(generators, num_classes), device)
    scheduler = make_scheduler(solver, num_steps)
    timesteps, rows = scheduler.timesteps.double().numpy(), np.asarray(indices)
    x = x * scheduler.init_noise_sigma
    for step_index, t in enumerate(scheduler.timesteps):
        ctx = SamplingContext(step_index, timesteps, rows, generators)
        if on_step is not None:
            on_step(ctx)
        model_input = scheduler.scale_model_input(x, t)
        with autocast(device, precision):
            eps = denoiser(model_input, to_device(t.expand(len(x)), device), y, ctx)
        x = scheduler.step(eps.float(), t, x, generator=generators).prev_sample
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
