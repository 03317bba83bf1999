"""`ase`: drop more blocks at noisier timesteps, with the network fine-tuned for that schedule (Moon, Choi,
Yun, Yoon, Lee, Cho, Lee, "A Simple Early Exiting Framework for Accelerated Sampling in Diffusion Models",
ICML 2024; arXiv 2408.05927; official code taehong-moon/ee-diffusion).

ASE (Adaptive Score Estimation) observes that the score is easier to estimate at noisy timesteps and skips a
time-dependent set of blocks. Nothing learned decides: a fixed schedule maps the timestep t to the blocks
that run (none dropped near t = 0, more as t grows), the same for every sample at that t. The network is
then fine-tuned with L_simple, each training sample running the blocks its t allows.

Schedule: timesteps fall into 10 buckets of 100 (the official code's buckets); bucket b = 0..9 drops the
last n_drop blocks in execution order,
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

On DiT (the paper's own setting for its DiT results): blocks have no skips, so the last n_drop blocks are
simply not run.

Costs: embed, the blocks that run (`ran_block`), the `skip_linear` of each dropped out-block whose
in-block ran (`add_macs`), head. exit_point stays -1.

Knobs: `strength` (above), `checkpoint` (the fine-tuned U-ViT, default the shipped digits one; "" runs the
run's base model without fine-tuning). Fine-tuning: `adadiff-bench train --config configs/ase_digits.toml`
(an `[ase]` table, see `training_task`).

Differs from the paper: a one-knob linear schedule instead of hand-set block counts per bucket; strengths
above 0.5 drop the mid- and in-blocks, which the paper never does (needed to reach layer ratios near 0.5);
one checkpoint serves a whole sweep: each fine-tuning batch draws its strength from `[ase] strengths`,
where the paper fine-tunes one model per schedule. The shipped fine-tune starts from the backbone the digits
comparisons share (the fine-tuned AdaDiff network's) with the optimiser, EMA and step cap of AdaDiff's own
fine-tune, and stops on its held-out loss (configs/ase_digits.toml).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from adadiff_bench.checkpoints import BACKBONE_FORMATS, cached_checkpoint, load_model, save_checkpoint
from adadiff_bench.device import rows_on
from adadiff_bench.diffusion import add_noise
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.flops import unit_costs
from adadiff_bench.methods.registry import Method, register_method
from adadiff_bench.models.backbone import BRANCHES, Backbone
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
    """Per block (execution order): does it run; for a dropped block, does it still fuse its long skip."""
    runs: tuple[bool, ...]
    fuses: tuple[bool, ...]


def drop_plan(n_drop: int, model: Backbone) -> DropPlan:
    """The last `n_drop` blocks are dropped (on U-ViT: out-blocks from the output end, then the mid-block,
    then in-blocks from the deepest); a dropped block whose long-skip source ran still fuses it (ASE keeps
    a dropped decoder block's skip fusion), one whose source was dropped too makes the pair an identity."""
    num_blocks = model.num_blocks
    runs = [index < num_blocks - n_drop for index in range(num_blocks)]
    sources = {model.skip_partner(j): j for j in range(num_blocks) if model.skip_partner(j) is not None}
    fuses = [not runs[i] and i in sources and runs[sources[i]] for i in range(num_blocks)]
    return DropPlan(tuple(runs), tuple(fuses))


def ase_forward(model: Backbone, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                n_drop: torch.Tensor, log: StepLog | None = None, fusion_macs=None) -> torch.Tensor:
    """eps with n_drop[i] blocks dropped for sample i; samples with the same plan run as one sub-batch
    (while sampling every sample of a step shares t, so the batch is one group). With `log`, what ran is
    recorded, a kept skip fusion at `fusion_macs[block]` per sample."""
    n_drop = n_drop.cpu()  # the groups are formed on the host (one read when the counts are on a GPU)
    counts = torch.unique(n_drop)
    if len(counts) == 1:
        eps = _run_plan(model, x, t, y, drop_plan(int(counts[0]), model), None, log, fusion_macs)
    else:
        eps = None
        for count in counts:
            rows = torch.nonzero(n_drop == count).squeeze(1)
            index = rows_on(rows, x.device)
            out = _run_plan(model, x[index], t[index], None if y is None else y[index], drop_plan(int(count), model),
                            rows, log, fusion_macs)
            eps = torch.empty(x.shape, dtype=out.dtype, device=x.device) if eps is None else eps
            eps[index] = out.to(eps.dtype)
    if log is not None:
        log.ran_embed()
        log.ran_head()
    return eps


def _run_plan(model: Backbone, x, t, y, plan: DropPlan, rows: torch.Tensor | None, log: StepLog | None,
              fusion_macs) -> torch.Tensor:
    """One group's evaluation (batch rows `rows`, host; None = all): the blocks its plan keeps, the skip fusions
    of the dropped ones it keeps."""
    tokens, state = model.begin(x, t, y)
    for index in range(model.num_blocks):
        if plan.runs[index]:
            tokens = model.run_block(index, tokens, state)
            if log is not None:
                log.ran_block(index, rows)
        else:
            tokens = model.bypass_block(index, tokens, state, fuse_skip=plan.fuses[index])
            if log is not None and plan.fuses[index]:
                log.add_macs(fusion_macs[index], rows)
    return model.head(tokens, state)


@dataclass
class AseParams:
    strength: float = knob(0.5, "how many blocks are dropped as t grows: n_drop = min(D, floor(strength * D * b / 9)) "
                                "in timestep bucket b (0 = none, 0.5 = up to every out-block at the noisiest steps)",
                           at_least=0)
    checkpoint: str = knob(DEFAULT_CHECKPOINT, "the backbone fine-tuned for ASE's dropping; \"\" = the run's base model "
                                               "without fine-tuning", valid="\"\" or an existing U-ViT or DiT checkpoint")

    def validate(self, where: str) -> None:
        if not math.isfinite(self.strength) or self.strength < 0:
            raise UserError(f"{where}: strength must be a number >= 0 (0 = no dropping, 0.5 = up to every "
                            f"out-block at the noisiest steps), got {self.strength}")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: ASE checkpoint {self.checkpoint!r} not found; fine-tune one with `adadiff-bench "
                            "train --config configs/ase_digits.toml`, fix the path, or set checkpoint = \"\" to run "
                            "the run's base model without fine-tuning")


@dataclass
class AseTrainConfig:
    """`[ase]`: fine-tune a backbone (U-ViT or DiT) for ASE's time-dependent block dropping.

    `strengths`: the schedule strengths sampled during fine-tuning, one per batch (one model serves all of
    them); units as above: 0.5 = up to every out-block dropped at the noisiest steps.
    """
    base_checkpoint: str = knob("checkpoints/uvit_digits.pt", "the backbone checkpoint that is fine-tuned",
                                valid="a U-ViT or DiT checkpoint file")
    strengths: list[float] = knob([0.25, 0.5, 0.75, 1.0, 1.25], "schedule strengths drawn during fine-tuning, one per "
                                  "batch (one model serves them all)", at_least=0, valid="a non-empty list")

    def validate(self, where: str) -> None:
        if not self.strengths or any(not math.isfinite(s) or s < 0 for s in self.strengths):
            raise UserError(f"{where}: strengths must list numbers >= 0 (got {self.strengths}); "
                            "e.g. [0.25, 0.5, 0.75, 1.0]")


def network_of(params: AseParams, model: Backbone, device: torch.device | str = "cpu") -> Backbone:
    return cached_checkpoint(params.checkpoint, BACKBONE_FORMATS, device=device) if params.checkpoint else model


@register_method
class Ase(Method):
    name = "ase"
    family = "layer-dropping"
    Params = AseParams
    TrainConfig = AseTrainConfig
    reads = BACKBONE_FORMATS
    writes = BACKBONE_FORMATS  # the fine-tuned backbone, in its own kind's format

    @classmethod
    def check(cls, params, model, where):
        net = network_of(params, model)
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in model.state_dict().items()}:
            raise UserError(f"{where}: ASE checkpoint {params.checkpoint!r} is not a fine-tune of the run's backbone "
                            "(different architecture, so the run's unit costs would not apply); fine-tune it from "
                            "the run's checkpoint ([ase] base_checkpoint)")

    @classmethod
    def training_task(cls, config, alpha_bar):
        return training_task(config, alpha_bar)

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.net = network_of(self.params, model, self.device)
        # the run's model has the fine-tune's architecture (`check`), and its unit costs are measured already
        self.fusion_macs = unit_costs(model).branches[:, BRANCHES.index("fusion")]

    def __call__(self, x, t, y, ctx):
        n_drop = drop_counts(t.cpu(), self.params.strength, self.net.num_blocks)  # (host: one read of t on a GPU)
        return ase_forward(self.net, x, t, y, n_drop, self.log, self.fusion_macs)


# ---- fine-tuning (an `[ase]` table in a training config) -------------------------------------------

def training_task(config, alpha_bar: torch.Tensor) -> Task:
    """Fine-tune every weight of the base backbone with L_simple, each batch dropping what the schedule says.

    A batch draws one strength from `[ase] strengths` (so one checkpoint serves a sweep); each of its
    samples drops n_drop(t) blocks for its own t.
    """
    cfg: AseTrainConfig = config.task_config
    model = load_model(cfg.base_checkpoint)

    def loss(x0, y, generator):
        t, eps, xt = add_noise(x0, generator, alpha_bar)
        strength = cfg.strengths[int(torch.randint(len(cfg.strengths), (1,), generator=generator, device="cpu"))]
        n_drop = drop_counts(t, strength, model.num_blocks)
        return (ase_forward(model, xt, t, y, n_drop) - eps).pow(2).mean()

    def export(path, ema, meta, half):
        meta = {**meta, "base_checkpoint": cfg.base_checkpoint, "ase_strengths": list(cfg.strengths)}
        save_checkpoint(path, ema, model.config, meta, half=half)

    return Task(model, loss, export, model.config, base_checkpoint=cfg.base_checkpoint)
