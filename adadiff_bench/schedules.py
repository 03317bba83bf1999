"""Noise schedules and the network's time-input conventions, as named options (`[sampling] schedule`).

A schedule says how much signal and noise x_t = alpha_t x_0 + sigma_t eps holds at each of the solver's
times, which solvers run it, and what the network was trained to read as its time input:

    name            solver's time t                   alpha_t^2                          network's time input
    linear          diffusers timestep 0..999         prod(1 - beta), beta linear 1e-4..0.02     t       (DDPM)
    scaled-linear   diffusers timestep 0..999         prod(1 - beta), sqrt(beta) linear           t + 1   (SD; U-ViT's
                                                      in sqrt(0.00085)..sqrt(0.012)                        latent models)
    vp              continuous t in [eps, 1]          exp(-(0.1 t + 19.9 t^2 / 2))               999 t   (U-ViT's and
                                                                                                          AdaDiff's pixel code)

`network_time` is the one place where the solver's time becomes the network's input: the sampling loop
calls it once per evaluation, before any method sees `t`, so every network a method runs (its own
checkpoints included) reads the convention it was trained with, and no method knows about it.

The schedule belongs to the trained network (a checkpoint trained on one schedule is meaningless on
another), so the run records it per row; a model preset that knows its schedule should set it, and a
checkpoint trained by `adadiff-bench train` records it (`[train] schedule`; sampling it with another is
refused). Training draws its examples from the same objects: `training_times` draws the solver's time
(uniform over the discrete timesteps; uniform in [0, 1) on the VP SDE, as U-ViT's `sde.sample`),
`alpha_sigma` gives the noise level there and `network_time` the network's input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError, did_you_mean

DIFFUSERS_SOLVERS = ("ddpm", "ddpm-learned", "ddim", "dpm-solver++", "euler")  # discrete schedules: diffusers' schedulers
DISCRETE_SOLVERS = DIFFUSERS_SOLVERS + ("dpm-solver++-fast",)  # ... and U-ViT's DPM-Solver++ (this package's)
CONTINUOUS_SOLVERS = ("euler-maruyama", "dpm-solver-fast")    # continuous VP: this package's own


@dataclass(frozen=True)
class DiscreteSchedule:
    """A DDPM-style schedule of `num_train_timesteps` betas, run by diffusers' schedulers."""
    name: str
    beta_schedule: str        # diffusers' name of the beta spacing
    beta_start: float
    beta_end: float
    time_offset: int = 0      # network's time input = diffusers timestep + time_offset
    num_train_timesteps: int = 1000
    solvers: tuple[str, ...] = DISCRETE_SOLVERS
    kind: str = "discrete"

    def diffusers_config(self) -> dict:
        """The arguments every diffusers scheduler of this schedule shares (eps prediction)."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, beta_schedule=self.beta_schedule, prediction_type="epsilon")

    def betas(self) -> torch.Tensor:
        """beta_0..beta_{N-1} in float64, computed here from the definition (not through diffusers)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        # scaled_linear: linear in sqrt(beta), as Stable Diffusion and U-ViT's latent models train
        return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float64) ** 2

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas(), 0)

    def training_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps uniform in 0..N-1 (int64, drawn on the CPU by `generator`): DDPM's training draw."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device="cpu")

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """Solver's timestep -> the network's time input (the same tensor when the offset is 0)."""
        return t if self.time_offset == 0 else t + self.time_offset

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64 at diffusers timesteps `t`; a fractional t (Euler's) interpolates
        log(sigma / alpha) linearly between integer steps, as diffusers' Euler scheduler does."""
        alpha_bar = self.alphas_cumprod()
        log_ratio = 0.5 * torch.log((1 - alpha_bar) / alpha_bar)  # log(sigma / alpha)
        t = t.double().clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        ratio = torch.exp((1 - w) * log_ratio[low] + w * log_ratio[low + 1])
        alpha = torch.rsqrt(1 + ratio ** 2)
        return alpha, ratio * alpha


@dataclass(frozen=True)
class ContinuousVP:
    """The variance-preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max -
    beta_min), t in [0, 1] (Song et al. 2021), with the network reading `time_scale` t (U-ViT's 999 t)."""
    name: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    time_scale: float = 999.0
    solvers: tuple[str, ...] = CONTINUOUS_SOLVERS
    kind: str = "continuous"

    def beta(self, t: float | torch.Tensor):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: float | torch.Tensor):
        """log alpha_t = -1/2 of the integral of beta from 0 to t."""
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2)

    def training_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Times uniform in [0, 1) (float64, on the CPU), as U-ViT's `sde.sample` draws them for L_simple."""
        return torch.rand(batch, generator=generator, dtype=torch.float64, device="cpu")

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_scale * t

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_alpha(t.double())
        return log_alpha.exp(), torch.sqrt(-torch.expm1(2 * log_alpha))

    def sigma(self, t: float) -> float:
        return math.sqrt(-math.expm1(2 * self.log_alpha(t)))

    def half_log_snr(self, t: float) -> float:
        """lambda_t = log(alpha_t / sigma_t), decreasing in t."""
        return self.log_alpha(t) - math.log(self.sigma(t))

    def time_of_half_log_snr(self, lam: float) -> float:
        """The t with lambda_t = lam: log alpha_t = -log(1 + e^(-2 lam)) / 2 is a quadratic in t, solved stably."""
        c = 0.5 * math.log1p(math.exp(-2 * lam))           # beta_min t / 2 + (beta_max - beta_min) t^2 / 4 = c
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return 2 * c / (b + math.sqrt(b * b + 4 * a * c))


Schedule = DiscreteSchedule | ContinuousVP

SCHEDULES: dict[str, Schedule] = {
    "linear": DiscreteSchedule("linear", "linear", 1e-4, 0.02),
    "scaled-linear": DiscreteSchedule("scaled-linear", "scaled_linear", 0.00085, 0.012, time_offset=1),
    "vp": ContinuousVP(),
}
DEFAULT_SCHEDULE = "linear"


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}{did_you_mean(name, SCHEDULES)}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def check_schedule_name(schedule: str, where: str) -> None:
    if schedule not in SCHEDULES:
        raise UserError(f"{where}: unknown schedule {schedule!r}{did_you_mean(schedule, SCHEDULES)}; "
                        f"valid: {', '.join(SCHEDULES)}")


def check_schedule_and_solver(schedule: str, solver: str, where: str) -> None:
    """A solver runs only the schedules it was written for (diffusers': discrete; Euler-Maruyama: continuous VP)."""
    check_schedule_name(schedule, where)
    valid = SCHEDULES[schedule].solvers
    if solver not in valid:
        raise UserError(f"{where}: solver {solver!r} does not run schedule {schedule!r}; "
                        f"with this schedule use one of {', '.join(valid)}")


def check_trained_schedule(trained: str | None, sampled: str, what: str, where: str) -> None:
    """A network is sampled with the schedule it was trained with (`trained` None: not recorded, not checked)."""
    if trained is not None and trained != sampled:
        raise UserError(f"{where}: [sampling] schedule is {sampled!r} but {what} was trained with {trained!r}; "
                        f"set schedule = \"{trained}\" (or retrain it with [train] schedule = \"{sampled}\")")
