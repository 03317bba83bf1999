"""What makes a training recipe converge and say so: an EMA whose starting weights wash out, a held-out split,
and a stopping rule on the held-out loss.

An EMA with decay d keeps d^N of the starting weights after N steps: 0.999^1500 = 22% of a 1,500-step
fine-tune's export is the weights it started from (randomly initialised estimators among them). With
`ema_warmup` the decay at step t is min(d, (1 + t) / (10 + t)), the usual warm-up of the decay, and the
starting weights' share at export, prod_t d_t, is negligible after a few steps. The checkpoint records
that share (`ema_start_share`) either way.

The stopping rule: every `eval_every` steps the EMA module's loss (the task's own loss: eps MSE for a
U-ViT, the method's full objective for a method) is computed on a held-out split with the same seeded
timesteps and noise each time, and training stops once `patience` evaluations in a row have not improved
on the best by more than `IMPROVEMENT` (relative). The EMA at the stopping step is exported.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

WARMUP_OFFSET = 10          # decay_t = (1 + t) / (10 + t) during the warm-up
IMPROVEMENT = 1e-3          # a held-out loss counts as better when below best x (1 - IMPROVEMENT)
HOLDOUT_SEED_OFFSET = 7919  # the split's generator: seed + this, apart from the batches' and the noise's


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay applied after optimiser step `step` (0-based)."""
    return min(decay, (1 + step) / (WARMUP_OFFSET + step)) if warmup else decay


def ema_start_share(steps: int, decay: float, warmup: bool) -> float:
    """The share of the starting weights left in the EMA after `steps` updates: prod_t decay_t."""
    if not warmup or decay <= 0:  # (decay 0: the EMA is the model itself, nothing of the start is left)
        return decay ** steps
    return math.exp(sum(math.log(ema_decay_at(t, decay, True)) for t in range(steps)))


def split_holdout(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices) of `count` images: a seeded permutation, `fraction` held out (at
    least one image when fraction > 0, and at least one left to train on)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + HOLDOUT_SEED_OFFSET))
    held = min(count - 1, max(1, round(fraction * count))) if fraction > 0 else 0
    return order[held:].sort().values, order[:held].sort().values


def training_session(device: str | None, first_step: int, last_step: int, seconds: float) -> dict:
    """One session of a training, as its state and export record it; device None: not recorded (a state saved
    before sessions were)."""
    return {"device": device, "steps": [int(first_step), int(last_step)], "seconds": round(float(seconds), 1)}


@dataclass
class TrainingRecord:
    """What a training keeps across resumes besides weights: the held-out loss history with its stopping rule
    (see the module docstring), and the seconds trained in earlier sessions, and where each of them ran."""
    patience: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) per evaluation
    seconds_before: float = 0.0  # wall-clock of the sessions before this one (a resumed run adds its own)
    # one `training_session` per earlier session (a training in stages may move between a GPU and the CPU)
    sessions: list[dict] = field(default_factory=list)

    def with_session(self, device: str | None, first_step: int, last_step: int, seconds: float) -> list[dict]:
        """The earlier sessions and this one (steps first_step..last_step on `device`; a rerun that trained no
        step, e.g. to export again, adds none)."""
        if last_step <= first_step:
            return list(self.sessions)
        return [*self.sessions, training_session(device, first_step, last_step, seconds)]

    def record(self, step: int, loss: float) -> None:
        self.history.append((int(step), float(loss)))

    @property
    def best(self) -> tuple[int, float]:
        """(step, loss) of the first evaluation that no later one improved on."""
        best = self.history[0]
        for step, loss in self.history[1:]:
            if loss < best[1] * (1 - IMPROVEMENT):
                best = (step, loss)
        return best

    def should_stop(self) -> bool:
        """`patience` evaluations since the best one, none of them better (never with patience 0)."""
        if not self.patience or not self.history:
            return False
        best_step = self.best[0]
        return sum(step > best_step for step, _ in self.history) >= self.patience


@torch.no_grad()
def held_out_loss(loss: Callable, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                  seed: int, move: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The mean of `loss(x0, y, generator)` over `images` in batches, with timesteps and noise drawn from a
    generator seeded the same way at every call (so two calls differ only through the weights)."""
    generator = torch.Generator().manual_seed(seed + HOLDOUT_SEED_OFFSET + 1)
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x0 = move(images[start:start + batch_size])
        y = move(labels[start:start + batch_size]) if labels is not None else None
        total += float(loss(x0, y, generator)) * len(x0)
        count += len(x0)
    return total / count


@torch.no_grad()
def swap_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """Exchange the parameter values of two modules of the same architecture, in place."""
    for mine, theirs in zip(model.parameters(), other.parameters()):
        held = mine.detach().clone()
        mine.copy_(theirs)
        theirs.copy_(held)
