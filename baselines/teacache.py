"""`teacache`: reuse the block stack's residual until the model input has changed enough.

TeaCache (Liu, Zhang, Ma, Cheng, Xu, Ye, Bai, Wan, Luo, Chen and Cheng, "Timestep Embedding Tells:
It's Time to Cache for Video Diffusion Model", arXiv 2411.19108, 2024; code ali-vilab/TeaCache).
Per sample and step, the relative L1 change of the timestep-embedded model input F_t since the
previous step, ||F_t - F_{t+1}||_1 / ||F_{t+1}||_1, is added to an accumulator. While the accumulator
stays below `threshold`, the step skips the block stack and adds the cached residual
(stack output - stack input) of the last computed step to this step's input; when it reaches
the threshold the stack runs, its residual is cached and the accumulator resets to 0. The first
and the last step always run (as in the official code).

U-ViT mapping: the paper's "timestep-embedding modulated input" is the first place where the noisy
input and the timestep embedding meet, cheap to compute before any block (on DiTs, the first
block's adaLN-modulated input). On U-ViT they meet in `embed`: the token sequence [time token,
patch tokens] + positions, the input of the block stack; that sequence is F_t (not the time token
alone, which is the same for every sample and would make no per-sample decision). On the digits
model its relative L1 change correlates 0.96 with that of the stack residual across steps
(0.94 for the first block's LayerNorm of it, 0.52 for the time token alone). The stack's residual
spans all blocks, so the long skips stay inside it; embed and head run at every step.

Rescaling: the paper maps each relative L1 through a polynomial fitted per model (input change ->
output change) before accumulating. By default none is applied here (the raw relative L1 is
accumulated), since a fit belongs to one checkpoint; `rescale` takes the coefficients, highest
power first as in numpy.poly1d ("c4,c3,c2,c1,c0"). A degree-4 fit on the digits model (eps change
against input change, 64 samples, DPM-Solver++ 25 steps) is listed in the README.

Differs from the paper's code: decisions, accumulators and caches are per sample (the code
averages over the whole batch, one decision per batch); F_t as above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adadiff_bench.device import rows_on
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.block_cache import run_blocks
from adadiff_bench.methods.registry import Method, register_method


def parse_coefficients(text: str) -> list[float]:
    return [float(part) for part in text.split(",")] if text.strip() else []


@dataclass
class TeaCacheParams:
    threshold: float = knob(0.1, "reuse the cached residual while the accumulated relative L1 change of the "
                                 "embedded input stays below this (0 never reuses)", at_least=0)
    rescale: str = knob("", "polynomial applied to each relative L1 before accumulating, coefficients highest power "
                            "first (numpy.poly1d order); \"\" = none",
                        valid="\"\" or comma-separated numbers, e.g. \"2.1,-1.3,0.8,0.01\"")

    def validate(self, where: str) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise UserError(f"{where}: threshold must be a number >= 0 (got {self.threshold}); 0 never reuses")
        try:
            coefficients = parse_coefficients(self.rescale)
        except ValueError:
            coefficients = [math.nan]
        if not all(math.isfinite(c) for c in coefficients):
            raise UserError(f"{where}: rescale must list polynomial coefficients like \"2.1,-1.3,0.8,0.01\" "
                            f"(highest power first) or be empty (got {self.rescale!r})")


def rescaled(distance: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """The polynomial with `coefficients` (highest power first) at `distance` (Horner); none = identity."""
    if not coefficients:
        return distance
    value = torch.zeros_like(distance)
    for coefficient in coefficients:
        value = value * distance + coefficient
    return value


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per sample ||current - previous||_1 / ||previous||_1."""
    return (current - previous).flatten(1).abs().mean(1) / previous.flatten(1).abs().mean(1)


@register_method
class TeaCache(Method):
    name = "teacache"
    family = "caching"
    Params = TeaCacheParams

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.coefficients = parse_coefficients(self.params.rescale)

    def start_batch(self, log) -> None:
        super().start_batch(log)
        self.previous_input: torch.Tensor | None = None  # F_{t+1}: last step's embedded tokens
        self.residual: torch.Tensor | None = None        # stack output - input at each sample's last computed step
        self.accumulated: torch.Tensor | None = None     # accumulated (rescaled) relative L1 per sample

    def should_calc(self, model_input: torch.Tensor, ctx) -> torch.Tensor:
        """Per sample, on the host: run the block stack this step? Updates the (host) accumulators."""
        if self.previous_input is None or ctx.is_last_step:
            calc = torch.ones(len(model_input), dtype=torch.bool, device="cpu")
            self.accumulated = torch.zeros(len(model_input), dtype=torch.float64, device="cpu")
        else:
            distance = relative_l1(model_input, self.previous_input).cpu().double()  # the step's one read of the device
            self.accumulated += rescaled(distance, self.coefficients)
            calc = self.accumulated >= self.params.threshold
            self.accumulated[calc] = 0.0
        self.previous_input = model_input
        return calc

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        model, log = self.model, self.log
        tokens, state = model.begin(x, t, y)
        log.ran_embed()
        rows = torch.nonzero(self.should_calc(tokens, ctx)).flatten()  # (host)
        if len(rows) == len(x):  # every sample runs the stack: no gather, no scatter
            hidden = run_blocks(model, tokens, state, None, log)
            self.residual = hidden - tokens
        else:
            hidden = tokens + self.residual  # reused rows: this step's input + the cached residual
            if len(rows):
                index = rows_on(rows, x.device)
                # the whole stack for those rows, long skips inside
                computed = run_blocks(model, tokens[index], state.subset(index), rows, log)
                hidden[index] = computed.to(hidden.dtype)
                self.residual[index] = (computed - tokens[index]).to(self.residual.dtype)
        self.note_cache(self.previous_input, self.residual)
        eps = model.head(hidden, state)
        log.ran_head()
        return eps
