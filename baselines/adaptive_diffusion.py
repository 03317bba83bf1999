"""`adaptive-diffusion`: skip a step's noise prediction where the latent trajectory is smooth.

AdaptiveDiffusion (Ye, Yuan, Xia, Yan, Chen, Yan, Shi and Zhang, "Training-Free Adaptive Diffusion
with Bounded Difference Approximation Strategy", NeurIPS 2024, arXiv 2410.09873; official code
UniModal4Reasoning/AdaptiveDiffusion). Before step k the sampler knows the latents x_1, ..., x_k
(x_k is this step's input). The third-order estimator decides, per sample, whether the network runs:

    xi_k = ||Delta^(3) x_k|| = ||x_k - 3 x_{k-1} + 3 x_{k-2} - x_{k-3}||
    run the network  iff  xi_k >= threshold * ||Delta x_{k-1}||,   Delta x_{k-1} = x_{k-1} - x_{k-2}

otherwise the step reuses the sample's last computed eps (the solver still steps, so the latent
moves and feeds later estimates). ||.|| is the mean absolute value, as in the official code.
`max_skips` is the paper's C_max: at most that many skipped steps in a row. The network always runs
at steps 0-3: like the official code, the estimator never uses the initial noise x_0 (the code's
latent list starts after the first step), so the first decision is at step 4.

`estimator = "official"` uses the released code's estimator instead: with d_j = ||x_j - x_{j-1}||,
run iff |d_k - 2 d_{k-1} + d_{k-2}| / 2 >= threshold * d_{k-1} (a second difference of step
lengths rather than the norm of the vector third difference; its thresholds are ~10x smaller).

U-ViT: the estimator needs no network internals; a running step is the whole U-ViT, and only
the samples that need it go through the network (a sub-batch), the rest reuse their eps.

Differs from the paper and its code: decisions are per sample (the code averages over the whole
batch, one decision per batch); skip iff xi_k < threshold * ||Delta x_{k-1}|| (the paper's strict
form, so threshold 0 never skips; the code skips on <=); the C_max cap holds from the first decision
on (the code enforces it only after five decisions); the latents are the solver's model input,
which equals x for DDIM, DDPM and DPM-Solver++ and is x / sqrt(sigma^2 + 1) for Euler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adadiff_bench.device import rows_on
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.registry import Method, register_method


ESTIMATORS = ("paper", "official")
HISTORY = 4  # x_{k-3}, ..., x_k: what a third difference needs


@dataclass
class AdaptiveDiffusionParams:
    threshold: float = knob(0.3, "the paper's delta: run the network iff the third-order estimate >= delta times "
                                 "the last step's change (0 never skips)", at_least=0)
    max_skips: int = knob(1, "the paper's C_max: at most this many skipped steps in a row", at_least=1)
    estimator: str = knob("paper", "\"paper\": norm of the third difference of the latents; \"official\": the "
                                   "released code's second difference of step lengths (thresholds ~10x smaller)",
                          choices=ESTIMATORS)

    def validate(self, where: str) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise UserError(f"{where}: threshold must be a number >= 0 (got {self.threshold}); 0 never skips")
        if self.max_skips < 1:
            raise UserError(f"{where}: max_skips must be >= 1 (got {self.max_skips}); use method `full` to never skip")
        if self.estimator not in ESTIMATORS:
            raise UserError(f"{where}: estimator must be 'paper' or 'official' (got {self.estimator!r})")


def mean_abs(a: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute value."""
    return a.flatten(1).abs().mean(1)


def skip_test(latents: list[torch.Tensor], estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(xi, reference) per sample from [x_{k-3}, x_{k-2}, x_{k-1}, x_k]; a step may skip iff xi < threshold * reference."""
    x_k3, x_k2, x_k1, x_k = latents
    if estimator == "paper":
        return mean_abs(x_k - 3 * x_k1 + 3 * x_k2 - x_k3), mean_abs(x_k1 - x_k2)
    d_k, d_k1, d_k2 = mean_abs(x_k - x_k1), mean_abs(x_k1 - x_k2), mean_abs(x_k2 - x_k3)
    return (d_k - 2 * d_k1 + d_k2).abs() / 2, d_k1


@register_method
class AdaptiveDiffusion(Method):
    name = "adaptive-diffusion"
    family = "step-skipping"
    Params = AdaptiveDiffusionParams

    def start_batch(self, log) -> None:
        super().start_batch(log)
        self.latents: list[torch.Tensor] = []   # the last HISTORY inputs after x_0
        self.eps: torch.Tensor | None = None    # each sample's last computed eps
        self.skips_in_a_row: torch.Tensor | None = None  # (host)
        self.seen_first = False

    def runs_network(self, batch_size: int) -> torch.Tensor:
        """Per sample, on the host: does this step run the network (True) or reuse the last eps (False)?"""
        if len(self.latents) < HISTORY:
            return torch.ones(batch_size, dtype=torch.bool, device="cpu")
        xi, reference = skip_test(self.latents, self.params.estimator)
        smooth = (xi < self.params.threshold * reference).cpu()  # the step's one read of the device
        return ~(smooth & (self.skips_in_a_row < self.params.max_skips))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        if self.seen_first:  # the initial noise x_0 never enters the estimator (official code)
            self.latents = (self.latents + [x])[-HISTORY:]
        self.seen_first = True
        run = self.runs_network(len(x))
        rows = torch.nonzero(run).flatten()  # (host)
        if len(rows) == len(x):  # every sample runs the whole U-ViT: no gather, no scatter
            eps = self.model(x, t, y)
            self.log.ran_full()
        else:  # the samples that run go through the network as a sub-batch, the rest reuse their eps
            eps = torch.empty_like(x) if self.eps is None else self.eps.clone()
            if len(rows):
                index = rows_on(rows, x.device)
                eps[index] = self.model(x[index], t[index], None if y is None else y[index]).to(eps.dtype)
                self.log.ran_full(rows)
        self.eps = eps
        self.skips_in_a_row = torch.where(run, 0, 1 if self.skips_in_a_row is None else self.skips_in_a_row + 1)
        self.note_cache(*self.latents, self.eps)
        return eps
