"""`random-exit`: exit points drawn at random, the control that shows whether an estimator beats chance.

Per sample and sampling step, an exit point k in 1..N (N blocks) is drawn before the step runs:
- from a constant target `layer_ratio` r: k = 1 + Binomial(N - 1, (rN - 1) / (N - 1)), so E[k] / N = r
  exactly and every exit point can occur;
- from `profile`, the exits.npz of an earlier cell (e.g. an AdaDiff cell of the same solver and step
  count): k is drawn from that cell's exit-point histogram at the same step, so the per-timestep
  distribution of depths is the estimator's, but which sample exits where is chance.
The draw for sample i at step s uses a generator seeded by (`seed`, i, s): batch size and run order
never change it. No paper: this is the ablation control (AdaDiff's comparison with random exiting).
The heads are the checkpoint's (`checkpoint`, see `PrefixExit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.prefix_exit import PrefixExit, PrefixParams, backbone_of
from adadiff_bench.methods.registry import register_method
from adadiff_bench.results import read_npz


@dataclass
class RandomExitParams(PrefixParams):
    layer_ratio: float = knob(0.7, "target mean share of blocks run, E[k] / N (used when `profile` is empty)",
                              above=0, at_most=1)
    profile: str = knob("", "an earlier cell's exits.npz: draw exit points from its per-step histogram instead",
                        valid="\"\" or an exits.npz (or the cell folder holding it)")
    seed: int = knob(0, "seed of the draws (with the sample index and step)")

    def validate(self, where: str) -> None:
        super().validate(where)
        if not 0.0 < self.layer_ratio <= 1.0:
            raise UserError(f"{where}: layer_ratio must be in (0, 1] (got {self.layer_ratio})")
        if self.profile:
            load_profile(self.profile, where)


def _exits_file(path: str) -> Path:
    path = Path(path)
    return path / "exits.npz" if path.is_dir() else path


@lru_cache(maxsize=8)
def _read_profile(path: str) -> tuple[np.ndarray, np.ndarray]:
    saved = read_npz(_exits_file(path))  # the results store's reader: never unpickles
    return saved["timesteps"], saved["timestep_exit_histogram"]


def load_profile(path: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, per-step probabilities of exit points 1..N) from a cell's exits.npz."""
    file = _exits_file(path)
    try:
        timesteps, histogram = _read_profile(str(file))
    except (OSError, KeyError, ValueError):
        raise UserError(f"{where}: profile {path!r} is not a cell's exits.npz (or its folder) with a "
                        "timestep_exit_histogram; point it at results/<run>/cells/<cell_id>") from None
    counts = histogram[:, 1:].astype(np.float64)  # column 0 counts 'no exit'
    if (counts.sum(1) == 0).any():
        raise UserError(f"{where}: profile {path!r} has steps without exits (not a prefix-exit cell); "
                        "use an AdaDiff or other early-exit cell")
    return timesteps, counts / counts.sum(1, keepdims=True)


@register_method
class RandomExit(PrefixExit):
    name = "random-exit"
    family = "early-exit"
    fixed_exit_point = True  # (the layer ratio or profile sets the exits: no rule reads the sample)
    Params = RandomExitParams

    @classmethod
    def check(cls, params, model, where):
        super().check(params, model, where)
        num_blocks = backbone_of(params.checkpoint, model).num_blocks
        if params.layer_ratio < 1 / num_blocks:
            raise UserError(f"{where}: layer_ratio {params.layer_ratio} is below one block of {num_blocks} "
                            f"({1 / num_blocks:.3f}); every sample runs at least one block")
        if params.profile and load_profile(params.profile, where)[1].shape[1] != num_blocks:
            raise UserError(f"{where}: profile {params.profile!r} was recorded on a model with another depth")

    def draw(self, sample_id: int, step: int, probabilities: np.ndarray | None) -> int:
        rng = np.random.default_rng([self.params.seed, int(sample_id), step])
        n = self.num_blocks
        if probabilities is not None:
            return int(rng.choice(n, p=probabilities)) + 1
        if n == 1:
            return 1
        return 1 + int(rng.binomial(n - 1, (self.params.layer_ratio * n - 1) / (n - 1)))

    def step_probabilities(self, ctx) -> np.ndarray | None:
        if not self.params.profile:
            return None
        timesteps, probabilities = load_profile(self.params.profile, self.name)
        if not np.array_equal(timesteps, ctx.timesteps):
            raise UserError(f"random-exit: profile {self.params.profile!r} has {len(timesteps)} steps at other "
                            f"timesteps than this cell's {ctx.num_steps}; record it with the same "
                            "solver and num_steps")
        return probabilities[ctx.step]

    def begin(self, x, t, y, ctx):
        probabilities = self.step_probabilities(ctx)
        self.exit_points = torch.tensor([self.draw(i, ctx.step, probabilities) for i in ctx.rows], device="cpu")

    def policy(self, exit_point, tokens, state, t, active):  # host draws, host mask: no GPU read
        return self.exit_points[active] == exit_point
