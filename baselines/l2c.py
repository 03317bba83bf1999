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

On U-ViT (the paper's U-ViT variant, sublayer granularity): the cached units are each block's
attention branch attn(norm1(x)) and MLP branch mlp(norm2(x)), the non-residual paths. Residual
additions, long skips and the out-blocks' skip fusion (skip_linear, before the attention branch)
always run.

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
single-step DPM-Solver-2 and alternates the step's two evaluations); lambda and the learning rate are
set for the 8x8 digits model. A sampling run is refused when its solver timesteps are not the
router's; `check_schedule` refuses by solver name and step count before sampling, once the harness
calls it (ddim and ddpm share timesteps).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from adadiff_bench.checkpoints import atomic_torch_save, load_model, read_checkpoint, sha256_file
from adadiff_bench.config import TrainFile, UViTConfig, check_solver
from adadiff_bench.diffusion import solver_timesteps
from adadiff_bench.errors import UserError
from adadiff_bench.flops import count_macs
from adadiff_bench.methods.registry import Method, register_method
from adadiff_bench.steplog import StepLog
from adadiff_bench.training import Task

FORMAT = "adadiff-bench/l2c-router"
TRAIN_HINT = "train one with `adadiff-bench train --config configs/l2c_digits.toml`"


def is_cache_step(step: int) -> bool:
    """Full steps 0, 2, 4, ...; the odd steps in between may reuse the full step's branch outputs."""
    return step % 2 == 1


# ---- the U-ViT run branch by branch ----------------------------------------------------------------

def branch_forward(block, x, skip=None, attn_out=None, mlp_out=None):
    """Block.forward, with a given branch output (cached) in place of computing it; -> (x, attn_out, mlp_out)."""
    if block.skip_linear is not None:
        x = block.skip_linear(torch.cat([x, skip], dim=-1))
    if attn_out is None:
        attn_out = block.attn(block.norm1(x))
    x = x + attn_out
    if mlp_out is None:
        mlp_out = block.mlp(block.norm2(x))
    return x + mlp_out, attn_out, mlp_out


def mixed_forward(block, x, skip, cached, beta):
    """Training: each branch is beta * fresh + (1 - beta) * cached; beta (B, 2), cached (attn, mlp)."""
    if block.skip_linear is not None:
        x = block.skip_linear(torch.cat([x, skip], dim=-1))
    beta_attn, beta_mlp = beta[:, 0, None, None], beta[:, 1, None, None]
    x = x + beta_attn * block.attn(block.norm1(x)) + (1 - beta_attn) * cached[0]
    return x + beta_mlp * block.mlp(block.norm2(x)) + (1 - beta_mlp) * cached[1]


def run_blocks(model, tokens, block_fn):
    """Blocks in execution order through `block_fn(index, block, x, skip) -> x`, long skips as U-ViT's."""
    num_in, skips = len(model.in_blocks), []
    for index, block in enumerate(model.block_list()):
        tokens = block_fn(index, block, tokens, skips.pop() if index > num_in else None)
        if index < num_in:
            skips.append(tokens)
    return tokens


@lru_cache(maxsize=4)
def branch_macs(model) -> np.ndarray:
    """(num_blocks, 3) MACs per image of each block's attention branch, MLP branch and skip fusion (fvcore)."""
    x = torch.zeros(1, model.in_chans, model.img_size, model.img_size)
    inputs = (x, torch.zeros(1)) if model.num_classes <= 0 else (x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_module = count_macs(model.eval(), inputs).by_module()
    names = ([f"in_blocks.{i}" for i in range(len(model.in_blocks))] + ["mid_block"]
             + [f"out_blocks.{i}" for i in range(len(model.out_blocks))])
    return np.array([[by_module.get(f"{name}.{part}", 0) for part in ("attn", "mlp", "skip_linear")]
                     for name in names], dtype=np.float64)


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


def load_router(path: str) -> RouterCheckpoint:
    stat = Path(path).stat() if Path(path).is_file() else None
    return _read_router(str(path), stat and (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=8)
def _read_router(path: str, version) -> RouterCheckpoint:
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path!r} is not a Learning-to-Cache router checkpoint; {TRAIN_HINT}")
    return RouterCheckpoint(payload["beta"], payload["base_checkpoint"], payload["base_sha256"],
                            payload["solver"], int(payload["num_steps"]), path)


@lru_cache(maxsize=8)
def _sha256(path: str, version) -> str:
    return sha256_file(path)


@lru_cache(maxsize=4)
def _base_state(path: str, sha256: str) -> dict:
    return load_model(path).state_dict()


def check_backbone(router: RouterCheckpoint, model, where: str) -> None:
    """Refuse a router whose base checkpoint changed (sha256) or is not the model it is asked to run on."""
    base = router.base_checkpoint
    if not Path(base).is_file():
        raise UserError(f"{where}: router {router.path!r} needs its base checkpoint {base!r}, which is missing; "
                        f"restore it or {TRAIN_HINT}")
    stat = Path(base).stat()
    sha = _sha256(base, (stat.st_mtime_ns, stat.st_size))
    if sha != router.base_sha256:
        raise UserError(f"{where}: router {router.path!r} was trained on {base!r} with sha256 "
                        f"{router.base_sha256[:12]}..., but that file now has sha256 {sha[:12]}...; retrain the router")
    state, expected = model.state_dict(), _base_state(base, sha)
    if state.keys() != expected.keys() or not all(torch.equal(state[k], expected[k]) for k in state):
        raise UserError(f"{where}: router {router.path!r} was trained for backbone {base!r} (sha256 "
                        f"{sha[:12]}...), not for this run's model; set the run's checkpoint to {base!r} "
                        "or train a router for your model")


def schedule_error(router: RouterCheckpoint, cell_schedule: str, where: str) -> UserError:
    return UserError(f"{where}: router {router.path!r} was trained for solver {router.solver!r} with "
                     f"{router.num_steps} steps, but this cell samples {cell_schedule}; set solver = "
                     f"\"{router.solver}\" and num_steps = {router.num_steps} for l2c, or train a router for them")


def check_timesteps(router: RouterCheckpoint, timesteps: np.ndarray, where: str) -> None:
    """Refuse a sampling run whose solver timesteps are not those the router was trained for."""
    expected = solver_timesteps(router.solver, router.num_steps)
    if len(timesteps) != len(expected) or not np.allclose(timesteps, expected):
        raise schedule_error(router, f"{len(timesteps)} steps at other timesteps", where)


# ---- the method --------------------------------------------------------------------------------------

@dataclass
class L2cParams:
    checkpoint: str = "checkpoints/l2c_digits.pt"
    threshold: float = 0.5

    def validate(self, where: str) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"{where}: threshold must be in [0, 1] (a branch runs when its beta > threshold), "
                            f"got {self.threshold}")
        if not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: router checkpoint {self.checkpoint!r} not found; fix the path or {TRAIN_HINT}")


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

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.router = load_router(self.params.checkpoint)
        check_backbone(self.router, model, self.name)
        self.runs = compute_mask(self.router.beta, self.params.threshold)
        self.macs = branch_macs(model)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}  # (block, branch) -> output, rows of this batch

    @classmethod
    def check(cls, params, model, where):
        check_backbone(load_router(params.checkpoint), model, where)

    @classmethod
    def check_schedule(cls, params, solver: str, num_steps: int, where: str) -> None:
        """By name, before sampling (ddim and ddpm share timesteps); needs the harness to call it."""
        router = load_router(params.checkpoint)
        if (solver, num_steps) != (router.solver, router.num_steps):
            raise schedule_error(router, f"{solver!r} with {num_steps} steps", where)

    def start_batch(self, log: StepLog) -> None:
        super().start_batch(log)
        check_timesteps(self.router, log.timesteps, self.name)  # all the method sees of the cell's schedule
        self.cache = {}

    def __call__(self, x, t, y):
        step = self.log.current_step
        tokens = self.model.embed(x, t, y)
        self.log.ran_embed()
        if is_cache_step(step):
            tokens = run_blocks(self.model, tokens, self._cached_block(self.runs[step]))
            self.cache = {}  # the next step is a full one
        else:
            reused_next = ~self.runs[step + 1] if step + 1 < len(self.runs) else np.zeros_like(self.runs[0])
            tokens = run_blocks(self.model, tokens, self._full_block(reused_next))
            self.note_cache(*self.cache.values())
        self.log.ran_head()
        return self.model.head(tokens)

    def _full_block(self, reused_next: np.ndarray):
        def block_fn(index, block, x, skip):
            x, *outputs = branch_forward(block, x, skip)
            for branch, output in enumerate(outputs):
                if reused_next[index, branch]:  # keep only what the next step reuses
                    self.cache[index, branch] = output
            self.log.ran_block(index)
            return x
        return block_fn

    def _cached_block(self, runs: np.ndarray):
        def block_fn(index, block, x, skip):
            cached = [None if runs[index, branch] else self.cache[index, branch] for branch in (0, 1)]
            x, _, _ = branch_forward(block, x, skip, *cached)
            self._log_block(index, runs[index])
            return x
        return block_fn

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


@torch.no_grad()
def cache_step_pair(backbone, x0, y, t_full, t_cache, alpha_bar, generator):
    """(x at the cache step, cached branch outputs {block: (attn, mlp)} of the full step before it)."""
    a_full, a_cache = alpha_bar_at(alpha_bar, t_full), alpha_bar_at(alpha_bar, t_cache)
    noise = torch.randn(x0.shape, generator=generator)
    x_full = a_full.sqrt() * x0 + (1 - a_full).sqrt() * noise
    cached = {}

    def record(index, block, x, skip):
        x, attn_out, mlp_out = branch_forward(block, x, skip)
        cached[index] = (attn_out, mlp_out)
        return x

    eps = backbone.head(run_blocks(backbone, backbone.embed(x_full, t_full, y), record))
    x0_hat = (x_full - (1 - a_full).sqrt() * eps) / a_full.sqrt()
    return a_cache.sqrt() * x0_hat + (1 - a_cache).sqrt() * eps, cached  # one DDIM step


def student_eps(backbone, x, t, y, cached, beta):
    """eps with every branch interpolated between fresh and cached outputs by beta (B, num_blocks, 2)."""
    tokens = run_blocks(backbone, backbone.embed(x, t, y),
                        lambda index, block, h, skip: mixed_forward(block, h, skip, cached[index], beta[:, index]))
    return backbone.head(tokens)


def router_loss(eps_teacher, eps_student, beta, l1_weight: float) -> torch.Tensor:
    """Squared error summed over pixels plus lambda * sum(beta), both averaged over the batch."""
    error = (eps_teacher - eps_student).pow(2).flatten(1).sum(1)
    return (error + l1_weight * beta.flatten(1).sum(1)).mean()


def training_task(config: TrainFile, alpha_bar: torch.Tensor) -> Task:
    """Train the router on the frozen base model for one solver and step count."""
    cfg, where = config.l2c, "[l2c]"
    check_solver(cfg.solver, where)
    if cfg.num_steps < 2 or cfg.l1_weight < 0:
        raise UserError(f"{where}: num_steps must be >= 2 (a full step, then a cache step) and l1_weight >= 0")
    backbone = load_model(cfg.base_checkpoint).requires_grad_(False)
    model_config = UViTConfig(**read_checkpoint(cfg.base_checkpoint)["model"])
    base_sha256 = sha256_file(cfg.base_checkpoint)
    timesteps = torch.from_numpy(solver_timesteps(cfg.solver, cfg.num_steps)).float()
    cache_steps = torch.tensor([s for s in range(cfg.num_steps) if is_cache_step(s)])
    router = Router(cfg.num_steps, backbone.num_blocks)

    def loss(x0, y, generator):
        steps = cache_steps[torch.randint(len(cache_steps), (len(x0),), generator=generator)]
        x, cached = cache_step_pair(backbone, x0, y, timesteps[steps - 1], timesteps[steps], alpha_bar, generator)
        with torch.no_grad():
            eps_teacher = backbone(x, timesteps[steps], y)
        beta = router()[steps]
        return router_loss(eps_teacher, student_eps(backbone, x, timesteps[steps], y, cached, beta), beta,
                           cfg.l1_weight)

    def export(path, ema, meta, half):
        save_router(path, RouterCheckpoint(ema().detach(), cfg.base_checkpoint, base_sha256, cfg.solver,
                                           cfg.num_steps), {"steps": meta.get("steps"), "l1_weight": cfg.l1_weight})

    return Task(router, loss, export, model_config)
