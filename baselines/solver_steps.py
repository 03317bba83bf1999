"""`solver-steps`: the classic step-reduction baseline, the full network at fewer solver steps.

DDIM (Song, Meng and Ermon, "Denoising Diffusion Implicit Models", ICLR 2021) and DPM-Solver++
(Lu, Zhou, Bao, Chen, Li and Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv 2211.01095, 2022) spend less compute per image by taking fewer, larger
steps, each with the whole network. Both come from diffusers' schedulers (`adadiff_bench.diffusion`).

The method itself is the whole U-ViT at every step it is asked for; its cost/quality curve comes
from the sweep over the run config's `solver` and `num_steps` fields of its [[methods]] entry, e.g.

    [[methods]]
    name = "solver-steps"
    solver = ["ddim", "dpm-solver++"]
    num_steps = [10, 20, 50, 100]

It has no knobs and no cache; it differs from `full` only in name, so that a report draws it as
its own curve (the step-count frontier every step-skipping and caching method must beat).
"""
from __future__ import annotations

import torch

from adadiff_bench.methods.registry import Method, register_method


@register_method
class SolverSteps(Method):
    name = "solver-steps"
    family = "step-skipping"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx) -> torch.Tensor:
        eps = self.model(x, t, y)
        self.log.ran_full()
        return eps
