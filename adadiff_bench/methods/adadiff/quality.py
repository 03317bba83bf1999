"""Estimator quality without thresholds: the analysis pass that records what an estimator is judged on.

With AdaDiff's knob `quality_samples` > 0, a cell runs, after its sampling and outside any timing, a
second pass: the first `quality_samples` samples of the cell's own seed (evaluation samples, so held
out from the calibration seed) are drawn again along the *full-depth* trajectory of the cell's solver
and steps, and at every step every exit point is evaluated on the same input x_t as the full depth:

- `uncertainty`: the estimator's per-sample uncertainty there (the number the exit rule compares);
- `eps_error`: the exit's true error against full depth, mean over pixels of |eps_exit - eps_full|;
- `tanh_error`: the same in the estimator's own units, mean over pixels of tanh|eps_exit - eps_full|
  (the pseudo-label with full depth in place of the true noise), for the calibration plot.

Arrays are (sample, step, exit point), stored as the cell artifact `estimator_quality` with the solver's
timesteps. Following full depth keeps the inputs independent of any threshold. The report
(`report/estimator_quality.py`, no torch) turns them into rank correlations, AUROCs and a calibration
plot. Under guidance only the conditional pass is analysed.
"""
from __future__ import annotations

import numpy as np
import torch

from ...diffusion import sample
from ...guidance import label_classes

QUALITY_ARTIFACT = "estimator_quality"


@torch.no_grad()
def exit_errors(net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
    """Per sample and exit point: uncertainty, eps error and tanh error against full depth; and full-depth eps."""
    predictions, uncertainties = net.all_exits(x, t, y, backbone_grad=False)
    full = predictions[-1].float()
    gaps = torch.stack([(p.float() - full).abs().flatten(1) for p in predictions], dim=1)     # B, exits, pixels
    scalar = torch.stack([u.float().flatten(1).mean(1) if u.dim() > 1 else u.float() for u in uncertainties], 1)
    return scalar, gaps.mean(2), torch.tanh(gaps).mean(2), full


def quality_pass(net, cell, num_samples: int, batch_size: int, precision: str = "fp32") -> dict[str, np.ndarray]:
    """The `estimator_quality` artifact of `cell` (see the module docstring): full-depth trajectories of its
    first `num_samples` samples, every exit point evaluated at every step."""
    model = net.backbone
    steps, exits = cell.num_steps, net.num_exits
    arrays = {key: np.full((num_samples, steps, exits), np.nan, dtype=np.float32)
              for key in ("uncertainty", "eps_error", "tanh_error")}
    timesteps = np.full(steps, np.nan)

    def full_depth_recording(x, t, y, ctx):
        u, eps_error, tanh_error, full = exit_errors(net, x, t, y)
        for key, value in (("uncertainty", u), ("eps_error", eps_error), ("tanh_error", tanh_error)):
            arrays[key][np.asarray(ctx.rows), ctx.step] = value.cpu().numpy()
        timesteps[ctx.step] = float(ctx.timesteps[ctx.step])
        return full

    shape = (model.in_chans, model.img_size, model.img_size)
    for start in range(0, num_samples, batch_size):
        indices = np.arange(start, min(start + batch_size, num_samples))
        sample(full_depth_recording, cell.solver, cell.num_steps, shape, indices, cell.seed,
               label_classes(model, cell.guidance), device=next(model.parameters()).device, precision=precision,
               schedule=cell.schedule)
    return {**arrays, "timesteps": timesteps}
