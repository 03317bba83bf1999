"""`l2c`: a learned per-step router reuses attention/MLP outputs of the previous step (Learning-to-Cache).

Ma, Fang, Mi, Wang, "Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching", NeurIPS
2024 (arXiv 2406.01733); official code horseee/learning-to-cache.

A router beta, one score in (0, 1) per (sampling step, block, branch), learned with the backbone frozen,
decides which attention and MLP branches each step recomputes; the others add the output they had at
the previous step. beta depends only on the step index (timestep-variant, input-invariant), so every
sample of a batch takes the same path and batch size never changes an image.

Schedule, as in the official U-ViT and DiT code: full steps (every branch runs; the outputs the next
step reuses are cached) alternate with cache steps (odd step indices), where branch k of block l runs
iff beta[step, l, k] > `threshold` and otherwise reuses the full step's output. At most the cache steps,
about half of all steps, save compute.

The cached units are each block's two residual branches, through the backbone interface's branch
hook (on U-ViT, the paper's U-ViT variant at sublayer granularity: attn(norm1(x)) and mlp(norm2(x))).
Residual additions, long skips and the out-blocks' skip fusion (skip_linear, before the attention
branch) always run.

Costs, exactly what ran: embedding and head every step; a block is logged with `ran_block` when its
attention or its MLP ran (so `layer_ratio` counts a partly run block as run, a conservative figure),
and the MACs of a reused branch are taken back with a negative `add_macs`; a block whose two branches
are both reused is not flagged, and an out-block's skip fusion that still ran is added with `add_macs`.
Branch MACs come from the same fvcore count as `unit_costs`, so the step log's MACs equal what ran.

Training (`training_task`, `adadiff-bench train` with an `[l2c]` table): beta = sigmoid(logits). Each
sample draws a cache step s; x0 is noised to the full step's timestep t_{s-1}; the frozen model there
gives the cached branch outputs and eps, and one first-order step (DDIM = first-order DPM-Solver++)
gives x_s. The teacher is the full model at (x_s, t_s); the student runs every branch as
beta * fresh + (1 - beta) * cached, and L = sum_pixels (eps_teacher - eps_student)^2 (mean over the
batch) + lambda * sum_{l,k} beta[s, l, k], as the official code.

Differs from the paper: the pair x_{s-1} -> x_s comes from one first-order step whatever the sampling
solver (the official code takes one step of its own DPM-Solver-2; a multistep solver would need the
step before); each sample draws its own cache step (the official code: one per batch); with one
network evaluation per step, full and cache steps alternate (the official U-ViT code samples with
single-step DPM-Solver-2 and alternates the step's two evaluations); lambda is set for the 8x8 digits
model (the optimiser is the official router's: AdamW at lr 1e-3 without weight decay, no EMA). A sampling
run is refused when its solver timesteps are not the router's; `check_schedule` refuses by solver name and
step count before sampling, once the harness calls it (ddim and ddpm share timesteps).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from adadiff_bench.backbone_id import backbone_hash
from adadiff_bench.checkpoints import (CheckpointFormat, atomic_torch_save, cached_checkpoint, load_model,
                                       register_format, sha256_file)
from adadiff_bench.config import SOLVERS, check_solver
from adadiff_bench.device import to_device
from adadiff_bench.diffusion import solver_timesteps
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.flops import unit_costs
from adadiff_bench.methods.prefix_exit import exit_network
from adadiff_bench.methods.registry import Method, register_method
from adadiff_bench.models.backbone import Backbone
from adadiff_bench.training import Task

FORMAT = "adadiff-bench/l2c-router"
TRAIN_HINT = "train one with `adadiff-bench train --config configs/l2c_digits.toml`"
BRANCH_NAMES = ("attn", "mlp")  # the router's last axis: beta[step, block, 0] attention, 1 MLP


def is_cache_step(step: int) -> bool:
    """Full steps 0, 2, 4, ...; the odd steps in between may reuse the full step's branch outputs."""
    return step % 2 == 1


# ---- the router and its checkpoint -------------------------------------------------------------------

class Router(nn.Module):
    """beta = sigmoid(logits), one score per (sampling step, block, branch); branch 0 attention, 1 MLP."""

    def __init__(self, num_steps: int, num_blocks: int):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num_steps, num_blocks, 2))  # random start, as the official code

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


@dataclass
class RouterCheckpoint:
    beta: torch.Tensor  # (num_steps, num_blocks, 2)
    base_checkpoint: str
    base_sha256: str
    solver: str
    num_steps: int
    path: str = ""


def save_router(path, router: RouterCheckpoint, meta: dict | None = None) -> None:
    atomic_torch_save({"format": FORMAT, "version": 1, "beta": router.beta.detach().float().cpu().clone(),
                       "base_checkpoint": router.base_checkpoint, "base_sha256": router.base_sha256,
                       "solver": router.solver, "num_steps": router.num_steps, "meta": meta or {}}, path)


def _load(payload: dict, path: str) -> RouterCheckpoint:
    beta, texts = payload["beta"], [payload[key] for key in ("base_checkpoint", "base_sha256", "solver")]
    if not (isinstance(beta, torch.Tensor) and beta.dim() == 3 and beta.is_floating_point()) \
            or not all(isinstance(text, str) for text in texts):
        raise UserError(f"checkpoint {path!r}: `beta` must be a (steps, blocks, 2) float tensor and base_checkpoint, "
                        f"base_sha256 and solver text; {TRAIN_HINT}")
    return RouterCheckpoint(beta, *texts, int(payload["num_steps"]), path)


register_format(CheckpointFormat(FORMAT, "a Learning-to-Cache router (beta per step, block and branch)", _load,
                                 TRAIN_HINT))


def load_router(path: str) -> RouterCheckpoint:
    return cached_checkpoint(path, FORMAT)


@lru_cache(maxsize=8)
def _sha256(path: str, version) -> str:
    return sha256_file(path)


def check_base_file(router: RouterCheckpoint, where: str) -> None:
    """Refuse a router whose base checkpoint is missing or changed (sha256) since training."""
    base = router.base_checkpoint
    if not Path(base).is_file():
        raise UserError(f"{where}: router {router.path!r} needs its base checkpoint {base!r}, which is missing; "
                        f"restore it or {TRAIN_HINT}")
    stat = Path(base).stat()
    sha = _sha256(base, (stat.st_mtime_ns, stat.st_size))
    if sha != router.base_sha256:
        raise UserError(f"{where}: router {router.path!r} was trained on {base!r} with sha256 "
                        f"{router.base_sha256[:12]}..., but that file now has sha256 {sha[:12]}...; retrain the router")


def check_backbone(router: RouterCheckpoint, model: Backbone, where: str) -> None:
    """Refuse a router whose base checkpoint changed (sha256) or is not the model it is asked to run on."""
    check_base_file(router, where)
    base = router.base_checkpoint
    expected = exit_network(base)[0]  # (the CPU copy; a U-ViT, or an AdaDiff network's backbone)
    if backbone_hash(model) != backbone_hash(expected):  # (each module's hash is computed once)
        raise UserError(f"{where}: router {router.path!r} was trained for backbone {base!r} (sha256 "
                        f"{router.base_sha256[:12]}...), not for this run's model; set the run's checkpoint to "
                        f"{base!r} or train a router for your model")


def schedule_error(router: RouterCheckpoint, cell_schedule: str, where: str) -> UserError:
    return UserError(f"{where}: router {router.path!r} was trained for solver {router.solver!r} with "
                     f"{router.num_steps} steps, but this cell samples {cell_schedule}; set solver = "
                     f"\"{router.solver}\" and num_steps = {router.num_steps} for l2c, or train a router for them")


def check_timesteps(router: RouterCheckpoint, timesteps: np.ndarray, expected: np.ndarray, where: str) -> None:
    """Refuse a sampling run whose solver timesteps are not those the router was trained for (`expected`)."""
    if len(timesteps) != len(expected) or not np.allclose(timesteps, expected):
        raise schedule_error(router, f"{len(timesteps)} steps at other timesteps", where)


# ---- the method --------------------------------------------------------------------------------------

@dataclass
class L2cParams:
    checkpoint: str = knob("checkpoints/l2c_digits.pt", "the trained router (for one solver and step count)",
                           valid="an existing router checkpoint")
    threshold: float = knob(0.5, "on cache steps a branch runs iff its router score beta > threshold",
                            at_least=0, at_most=1)

    def validate(self, where: str) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"{where}: threshold must be in [0, 1] (a branch runs when its beta > threshold), "
                            f"got {self.threshold}")
        if not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: router checkpoint {self.checkpoint!r} not found; fix the path or {TRAIN_HINT}")


@dataclass
class L2cTrainConfig:
    """`[l2c]`: train Learning-to-Cache's router on a frozen backbone for one solver and step count.

    `l1_weight`: the paper's lambda, the weight of the sparsity term sum(beta) that pushes toward reuse,
    against the eps error summed over pixels (the official 0.1 was for 4x32x32 latents; 0.002 suits 8x8 digits).
    """
    base_checkpoint: str = knob("checkpoints/uvit_digits.pt", "the frozen U-ViT the router learns to cache",
                                valid="a U-ViT checkpoint file")
    solver: str = knob("dpm-solver++", "the sampling solver the router is trained for (runs must use it)",
                       choices=SOLVERS)
    num_steps: int = knob(25, "the step count the router is trained for (a full step, then a cache step)",
                          at_least=2)
    l1_weight: float = knob(0.002, "the paper's lambda: weight of the sparsity term sum(beta) that pushes toward "
                                   "reuse", at_least=0)

    def validate(self, where: str) -> None:
        check_solver(self.solver, where)
        if self.num_steps < 2 or self.l1_weight < 0:
            raise UserError(f"{where}: num_steps must be >= 2 (a full step, then a cache step) and l1_weight >= 0")


def compute_mask(beta: torch.Tensor, threshold: float) -> np.ndarray:
    """(num_steps, num_blocks, 2) bool: does the branch run? Everything runs at full steps."""
    runs = (beta > threshold).numpy()
    runs[[not is_cache_step(step) for step in range(len(runs))]] = True
    return runs


@register_method
class LearningToCache(Method):
    name = "l2c"
    family = "caching"
    Params = L2cParams
    TrainConfig = L2cTrainConfig
    reads = (FORMAT,)
    writes = FORMAT

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.router = load_router(self.params.checkpoint)  # (host: the router decides on the host)
        # the weights are compared with the router's base in `check` (the harness runs it before building);
        # here the file alone, which also holds for a model on a GPU or on "meta"
        check_base_file(self.router, self.name)
        self.runs = compute_mask(self.router.beta, self.params.threshold)
        self.router_timesteps = solver_timesteps(self.router.solver, self.router.num_steps)
        self.macs = unit_costs(model).branches  # (num_blocks, 3): attn, mlp, skip fusion
        self.cache: dict[tuple[int, str], torch.Tensor] = {}  # (block, branch) -> output, rows of this batch

    @classmethod
    def check(cls, params, model, where):
        check_backbone(load_router(params.checkpoint), model, where)

    @classmethod
    def check_schedule(cls, params, solver: str, num_steps: int, where: str) -> None:
        """By name, before sampling (ddim and ddpm share timesteps); needs the harness to call it."""
        router = load_router(params.checkpoint)
        if (solver, num_steps) != (router.solver, router.num_steps):
            raise schedule_error(router, f"{solver!r} with {num_steps} steps", where)

    @classmethod
    def training_task(cls, config, alpha_bar):
        return training_task(config, alpha_bar)

    def start_batch(self, log) -> None:
        super().start_batch(log)
        self.cache = {}

    def __call__(self, x, t, y, ctx):
        if ctx.step == 0:
            check_timesteps(self.router, ctx.timesteps, self.router_timesteps, self.name)  # all it sees of the schedule
        step, model = ctx.step, self.model
        tokens, state = model.begin(x, t, y)
        self.log.ran_embed()
        for index in range(model.num_blocks):
            if is_cache_step(step):
                tokens = model.run_block(index, tokens, state, branch=self._reuse(index, self.runs[step, index]))
                self._log_block(index, self.runs[step, index])
            else:
                reused_next = ~self.runs[step + 1, index] if step + 1 < len(self.runs) else np.zeros(2, dtype=bool)
                tokens = model.run_block(index, tokens, state, branch=self._keep(index, reused_next))
                self.log.ran_block(index)
        if is_cache_step(step):
            self.cache = {}  # the next step is a full one
        else:
            self.note_cache(*self.cache.values())
        self.log.ran_head()
        return model.head(tokens, state)

    def _keep(self, index: int, reused_next: np.ndarray):
        """A full step's branch hook: compute every branch, keep only what the next step reuses."""
        def branch(name, compute):
            output = compute()
            if reused_next[BRANCH_NAMES.index(name)]:
                self.cache[index, name] = output
            return output
        return branch

    def _reuse(self, index: int, runs: np.ndarray):
        """A cache step's branch hook: a branch runs iff its beta passed the threshold, else its cached output."""
        return lambda name, compute: compute() if runs[BRANCH_NAMES.index(name)] else self.cache[index, name]

    def _log_block(self, index: int, runs: np.ndarray) -> None:
        attn_mlp, skip_fusion = self.macs[index, :2], self.macs[index, 2]
        if runs.any():
            self.log.ran_block(index)  # the unit cost counts the whole block ...
            if not runs.all():
                self.log.add_macs(-attn_mlp[~runs].sum())  # ... less the reused branch
        elif skip_fusion:
            self.log.add_macs(skip_fusion)  # both branches reused; the skip fusion still ran


# ---- training ----------------------------------------------------------------------------------------

def alpha_bar_at(alpha_bar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at (possibly fractional) timesteps, sigma interpolated linearly as diffusers' Euler; (B, 1, 1, 1)."""
    sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
    low = t.double().floor().long().clamp(0, len(alpha_bar) - 2)
    frac = t.double() - low
    sigma = sigmas[low] * (1 - frac) + sigmas[low + 1] * frac
    return (1 / (1 + sigma ** 2)).float().view(-1, 1, 1, 1)


def run_with_branches(backbone: Backbone, x, t, y, branch_of) -> torch.Tensor:
    """eps of a whole evaluation, block `index`'s branches passed through the hook `branch_of(index)`."""
    tokens, state = backbone.begin(x, t, y)
    for index in range(backbone.num_blocks):
        tokens = backbone.run_block(index, tokens, state, branch=branch_of(index))
    return backbone.head(tokens, state)


@torch.no_grad()
def cache_step_pair(backbone, x0, y, t_full, t_cache, alpha_bar, generator):
    """(x at the cache step, cached branch outputs {(block, branch): output} of the full step before it).

    `t_full`, `t_cache` and `alpha_bar` on the host, and the noise drawn by the CPU `generator`; all moved to x0's
    device."""
    a_full, a_cache = (to_device(alpha_bar_at(alpha_bar, t), x0.device) for t in (t_full, t_cache))
    noise = to_device(torch.randn(x0.shape, generator=generator, device="cpu"), x0.device)
    x_full = a_full.sqrt() * x0 + (1 - a_full).sqrt() * noise
    cached = {}
    eps = run_with_branches(backbone, x_full, to_device(t_full, x0.device), y,
                            lambda index: lambda name, compute: cached.setdefault((index, name), compute()))
    x0_hat = (x_full - (1 - a_full).sqrt() * eps) / a_full.sqrt()
    return a_cache.sqrt() * x0_hat + (1 - a_cache).sqrt() * eps, cached  # one DDIM step


def student_eps(backbone, x, t, y, cached, beta):
    """eps with every branch interpolated between fresh and cached outputs by beta (B, num_blocks, 2)."""
    def mix(index):
        def branch(name, compute):
            b = beta[:, index, BRANCH_NAMES.index(name), None, None]
            return b * compute() + (1 - b) * cached[index, name]
        return branch
    return run_with_branches(backbone, x, t, y, mix)


def router_loss(eps_teacher, eps_student, beta, l1_weight: float) -> torch.Tensor:
    """Squared error summed over pixels plus lambda * sum(beta), both averaged over the batch."""
    error = (eps_teacher - eps_student).pow(2).flatten(1).sum(1)
    return (error + l1_weight * beta.flatten(1).sum(1)).mean()


def training_task(config, alpha_bar: torch.Tensor) -> Task:
    """Train the router on the frozen base model for one solver and step count."""
    cfg: L2cTrainConfig = config.task_config
    backbone = load_model(cfg.base_checkpoint).requires_grad_(False)
    base_sha256 = sha256_file(cfg.base_checkpoint)
    timesteps = torch.from_numpy(solver_timesteps(cfg.solver, cfg.num_steps)).float()
    cache_steps = torch.tensor([s for s in range(cfg.num_steps) if is_cache_step(s)], device="cpu")
    router = Router(cfg.num_steps, backbone.num_blocks)

    def loss(x0, y, generator):
        steps = cache_steps[torch.randint(len(cache_steps), (len(x0),), generator=generator, device="cpu")]
        x, cached = cache_step_pair(backbone, x0, y, timesteps[steps - 1], timesteps[steps], alpha_bar, generator)
        t_cache = to_device(timesteps[steps], x0.device)
        with torch.no_grad():
            eps_teacher = backbone(x, t_cache, y)
        beta = router()[to_device(steps, x0.device)]
        return router_loss(eps_teacher, student_eps(backbone, x, t_cache, y, cached, beta), beta, cfg.l1_weight)

    def export(path, ema, meta, half):
        save_router(path, RouterCheckpoint(ema().detach(), cfg.base_checkpoint, base_sha256, cfg.solver,
                                           cfg.num_steps), {**meta, "l1_weight": cfg.l1_weight})

    return Task(router, loss, export, backbone.config, frozen=(backbone,),  # train() moves both to the device
                base_checkpoint=cfg.base_checkpoint, predictions=lambda ema, x, t, y: [backbone(x, t, y)])
