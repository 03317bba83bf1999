"""`ase`: drop more blocks at noisier timesteps, with the network fine-tuned for that schedule (Moon, Choi,
Yun, Yoon, Lee, Cho, Lee, "A Simple Early Exiting Framework for Accelerated Sampling in Diffusion Models",
ICML 2024; arXiv 2408.05927; official code taehong-moon/ee-diffusion).

ASE (Adaptive Score Estimation) observes that the score is easier to estimate at noisy timesteps and skips a
time-dependent set of blocks. Nothing learned decides: a fixed schedule maps the timestep t to the blocks
that run (none dropped near t = 0, more as t grows), the same for every sample at that t. The network is
then fine-tuned with L_simple, each training sample running the blocks its t allows.

Schedule: timesteps fall into 10 buckets of 100 (the official code's buckets); bucket b = 0..9 drops
    n_drop(t) = min(D, floor(strength * D * b / 9)),   D = num_blocks - 1 droppable blocks,
so strength 0 is the full network, strength 0.5 drops up to all out-blocks at the noisiest bucket (the
paper's range on U-ViT), strength 1 up to everything but the first in-block; above 1 the schedule
saturates at lower t. n_drop never decreases with t or strength.

On U-ViT (the paper's rule, then an extension): the paper drops decoder blocks but keeps each dropped
block's linear layer that fuses the encoder's long skip (dropping U-ViT blocks outright, long skips and
all, degraded its samples severely). Out-blocks are dropped from the output end (the last one first, as
the official DiT code drops the last blocks); a dropped out-block still runs `skip_linear` on
cat(x, skip), so every in-block's skip is used. Beyond the out-blocks the schedule drops the mid-block,
then in-blocks from the deepest: a dropped in-block pushes no skip, so its paired out-block (already
dropped) has nothing to fuse and the pair is an identity. The first in-block always runs.

Costs: embed, the blocks that run (`ran_block`), the `skip_linear` of each dropped out-block whose
in-block ran (`add_macs`), head. exit_point stays -1.

Knobs: `strength` (above), `checkpoint` (the fine-tuned U-ViT, default the shipped digits one; "" runs the
run's base model without fine-tuning). Fine-tuning: `adadiff-bench train --config configs/ase_digits.toml`
(an `[ase]` table, see `training_task`).

Differs from the paper: a one-knob linear schedule instead of hand-set block counts per bucket; strengths
above 0.5 drop the mid- and in-blocks, which the paper never does (needed to reach layer ratios near 0.5);
one checkpoint serves a whole sweep: each fine-tuning batch draws its strength from `[ase] strengths`,
where the paper fine-tunes one model per schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from adadiff_bench.checkpoints import load_model, read_checkpoint, save_checkpoint
from adadiff_bench.config import TrainFile, UViTConfig
from adadiff_bench.diffusion import add_noise
from adadiff_bench.errors import UserError
from adadiff_bench.methods.registry import Method, register_method
from adadiff_bench.models.uvit import UViT
from adadiff_bench.steplog import StepLog
from adadiff_bench.training import Task

DEFAULT_CHECKPOINT = "checkpoints/ase_digits.pt"
NUM_BUCKETS, BUCKET_SIZE = 10, 100  # timesteps 0..999 in buckets of 100


def drop_counts(t: torch.Tensor, strength: float, num_blocks: int) -> torch.Tensor:
    """n_drop per sample: blocks dropped at timestep t (0 = full network)."""
    droppable = num_blocks - 1
    bucket = torch.div(t.double(), BUCKET_SIZE, rounding_mode="floor").clamp(0, NUM_BUCKETS - 1)
    n_drop = torch.floor(strength * droppable * bucket / (NUM_BUCKETS - 1) + 1e-9)  # guard 3.0 - 1e-16
    return n_drop.clamp(max=droppable).long()


@dataclass(frozen=True)
class DropPlan:
    """Per block (execution order): does it run; for a dropped out-block, does its skip_linear still fuse."""
    runs: tuple[bool, ...]
    fuses: tuple[bool, ...]


def drop_plan(n_drop: int, num_in: int, has_skip_linear: bool = True) -> DropPlan:
    """Out-blocks from the output end first, then the mid-block, then in-blocks from the deepest."""
    dropped_out = min(n_drop, num_in)
    dropped_in = max(0, n_drop - num_in - 1)
    runs_in = [i < num_in - dropped_in for i in range(num_in)]
    runs_out = [j < num_in - dropped_out for j in range(num_in)]  # out-block j pops in-block num_in-1-j's skip
    fuses_out = [has_skip_linear and not runs_out[j] and runs_in[num_in - 1 - j] for j in range(num_in)]
    return DropPlan(tuple(runs_in + [n_drop <= num_in] + runs_out),
                    tuple([False] * (num_in + 1) + fuses_out))


def skip_fusion_macs(model: UViT) -> float:
    """MACs per image of one out-block's skip_linear (a Linear(2D, D) on every token)."""
    skip_linear = model.out_blocks[0].skip_linear if len(model.out_blocks) else None
    if skip_linear is None:
        return 0.0
    num_tokens = model.extras + (model.img_size // model.patch_size) ** 2
    return float(num_tokens * skip_linear.in_features * skip_linear.out_features)


def plan_masks(n_drop: torch.Tensor, num_in: int, has_skip_linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(runs, fuses): (batch, num_blocks) booleans, each sample's `drop_plan`."""
    counts = torch.unique(n_drop)
    plans = [drop_plan(int(count), num_in, has_skip_linear) for count in counts]
    runs = torch.tensor([plan.runs for plan in plans])
    fuses = torch.tensor([plan.fuses for plan in plans])
    which = torch.searchsorted(counts, n_drop)
    return runs[which], fuses[which]


def _on_rows(fn, rows: torch.Tensor, tokens: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """tokens with the rows `rows` replaced by fn(tokens[rows], ...); only those rows are computed."""
    if len(rows) == len(tokens):
        return fn(tokens, *inputs)
    if len(rows) == 0:
        return tokens
    return tokens.index_copy(0, rows, fn(tokens[rows], *(v[rows] for v in inputs)))


def ase_forward(model: UViT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                n_drop: torch.Tensor, log: StepLog | None = None) -> torch.Tensor:
    """eps with n_drop[i] blocks dropped for sample i; each block runs on the samples that keep it."""
    num_in, fusion_macs = len(model.in_blocks), skip_fusion_macs(model)
    runs, fuses = plan_masks(n_drop, num_in, fusion_macs > 0)
    tokens = model.embed(x, t, y)
    skips: list[torch.Tensor] = []
    for index, block in enumerate(model.block_list()):
        rows = torch.nonzero(runs[:, index]).squeeze(1)
        if index <= num_in:
            tokens = _on_rows(block, rows, tokens)
            if index < num_in:
                skips.append(tokens)  # rows that dropped this in-block never read it (their pair fuses nothing)
        else:
            skip = skips.pop()
            tokens = _on_rows(block, rows, tokens, skip)
            fusing = torch.nonzero(fuses[:, index]).squeeze(1)  # ASE on U-ViT: a dropped decoder block's skip fusion
            tokens = _on_rows(lambda h, s: block.skip_linear(torch.cat([h, s], dim=-1)), fusing, tokens, skip)
            if log is not None and len(fusing):
                log.add_macs(fusion_macs, fusing)
        if log is not None and len(rows):
            log.ran_block(index, rows)
    if log is not None:
        log.ran_embed()
        log.ran_head()
    return model.head(tokens)


@dataclass
class AseParams:
    strength: float = 0.5
    checkpoint: str = DEFAULT_CHECKPOINT

    def validate(self, where: str) -> None:
        if not math.isfinite(self.strength) or self.strength < 0:
            raise UserError(f"{where}: strength must be a number >= 0 (0 = no dropping, 0.5 = up to every "
                            f"out-block at the noisiest steps), got {self.strength}")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: ASE checkpoint {self.checkpoint!r} not found; fine-tune one with `adadiff-bench "
                            "train --config configs/ase_digits.toml`, fix the path, or set checkpoint = \"\" to run "
                            "the run's base model without fine-tuning")


@lru_cache(maxsize=4)
def _fine_tuned(path: str) -> UViT:
    return load_model(path)


def network_of(params: AseParams, model: UViT) -> UViT:
    return _fine_tuned(params.checkpoint) if params.checkpoint else model


@register_method
class Ase(Method):
    name = "ase"
    family = "layer-dropping"
    Params = AseParams

    @classmethod
    def check(cls, params, model, where):
        net = network_of(params, model)
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in model.state_dict().items()}:
            raise UserError(f"{where}: ASE checkpoint {params.checkpoint!r} is not a fine-tune of the run's U-ViT "
                            "(different architecture, so the run's unit costs would not apply); fine-tune it from "
                            "the run's checkpoint ([ase] base_checkpoint)")

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.net = network_of(self.params, model)

    def __call__(self, x, t, y):
        n_drop = drop_counts(t, self.params.strength, self.net.num_blocks)
        return ase_forward(self.net, x, t, y, n_drop, self.log)


# ---- fine-tuning (an `[ase]` table in a training config) -------------------------------------------

def training_task(config: TrainFile, alpha_bar: torch.Tensor) -> Task:
    """Fine-tune every weight of the base U-ViT with L_simple, each batch dropping what the schedule says.

    A batch draws one strength from `[ase] strengths` (so one checkpoint serves a sweep); each of its
    samples drops n_drop(t) blocks for its own t.
    """
    cfg = config.ase
    if not cfg.strengths or any(not math.isfinite(s) or s < 0 for s in cfg.strengths):
        raise UserError(f"[ase] strengths must list numbers >= 0 (got {cfg.strengths}); e.g. [0.25, 0.5, 0.75, 1.0]")
    model = load_model(cfg.base_checkpoint)
    model_config = UViTConfig(**read_checkpoint(cfg.base_checkpoint)["model"])

    def loss(x0, y, generator):
        t, eps, xt = add_noise(x0, generator, alpha_bar)
        strength = cfg.strengths[int(torch.randint(len(cfg.strengths), (1,), generator=generator))]
        n_drop = drop_counts(t, strength, model.num_blocks)
        return (ase_forward(model, xt, t, y, n_drop) - eps).pow(2).mean()

    def export(path, ema, meta, half):
        meta = {**meta, "base_checkpoint": cfg.base_checkpoint, "ase_strengths": list(cfg.strengths)}
        save_checkpoint(path, ema, model_config, meta, half=half)

    return Task(model, loss, export, model_config)
