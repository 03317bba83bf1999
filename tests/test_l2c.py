"""Learning-to-Cache: reuse decisions, reuse equals a brute-force swap of cached outputs, no reuse equals
`full`, FLOPs vs the step log, the training loss, the router checkpoint and its refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model, sha256_file
from adadiff_bench.config import TrainFile
from adadiff_bench.diffusion import alphas_cumprod, solver_timesteps
from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.registry import baseline_module
from adadiff_bench.steplog import StepLog
from conftest import TINY, context

l2c = baseline_module("l2c")
L2cTrainConfig = l2c.L2cTrainConfig
NUM_STEPS = 4  # full steps 0 and 2, cache steps 1 and 3
NUM_BLOCKS = TINY.depth + 1


def hand_beta() -> torch.Tensor:
    """Scores spread around 0.5; at step 1 every kind of block: attention only, MLP only, nothing, both."""
    beta = torch.full((NUM_STEPS, NUM_BLOCKS, 2), 0.7)
    beta[1] = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.3], [0.05, 0.45]])
    beta[3] = torch.tensor([[0.1, 0.2], [0.8, 0.9], [0.4, 0.6], [0.55, 0.1], [0.9, 0.2]])
    return beta


def save_router(tmp_path, checkpoint, beta=None, solver="ddim", num_steps=NUM_STEPS, sha256=None, name="router.pt"):
    path = tmp_path / name
    beta = hand_beta() if beta is None else beta
    l2c.save_router(path, l2c.RouterCheckpoint(beta, str(checkpoint), sha256 or sha256_file(checkpoint),
                                               solver, num_steps))
    return path


def make_method(model, router_path, threshold=0.5):
    cls = get_method("l2c")
    return cls(model, make_params(cls, {"checkpoint": str(router_path), "threshold": threshold}, "test"))


def cell(router_path, threshold=0.5, solver="ddim", num_steps=NUM_STEPS):
    return Cell("l2c", (("checkpoint", str(router_path)), ("threshold", threshold)), solver, num_steps, 0)


def two_steps(method, model, x, steps):
    """Run the method at steps 0 and 1 on (x, t) pairs; returns the eps of the cache step and the log."""
    timesteps = solver_timesteps("ddim", NUM_STEPS)
    log = StepLog(len(x[0]), timesteps, model.num_blocks)
    log.set_batch(np.arange(len(x[0])))
    method.start_batch(log)
    with torch.no_grad():
        for step in steps:
            log.set_step(step)
            eps = method(x[step], torch.full((len(x[step]),), 900.0 - 300 * step), None,
                         context(step, timesteps, batch=len(x[step])))
    return eps, log


class StepTracker:
    """A method as the sampling loop sees it, noting the step of the call in progress (from its context)."""

    def __init__(self, method):
        self.method, self.step = method, None

    def __getattr__(self, name):
        return getattr(self.method, name)

    def __call__(self, x, t, y, ctx):
        self.step = ctx.step
        return self.method(x, t, y, ctx)


def branch_calls(model, tracker: StepTracker):
    """Record (step, block, branch) of every attention/MLP call during sampling."""
    calls = []
    for index, block in enumerate(model.block_list()):
        for branch, module in enumerate((block.attn, block.mlp)):
            module.register_forward_hook(
                lambda m, i, o, index=index, branch=branch: calls.append((tracker.step, index, branch)))
    return calls


def test_reuse_decisions_follow_the_hand_set_scores(tmp_path, tiny_model, tiny_checkpoint):
    router = save_router(tmp_path, tiny_checkpoint)
    runs = l2c.compute_mask(hand_beta(), 0.5)
    assert runs[[0, 2]].all()  # full steps run everything whatever the scores
    assert runs[1].tolist() == [[True, False], [False, True], [True, False], [False, False], [False, False]]
    assert runs[3].tolist() == [[False, False], [True, True], [False, True], [True, False], [True, False]]

    method = StepTracker(make_method(tiny_model, router))
    calls = branch_calls(tiny_model, method)
    _, log = generate(cell(router), tiny_model, 3, 3, method=method)
    assert {s for s, _, _ in calls} == set(range(NUM_STEPS))
    for step in range(NUM_STEPS):
        ran = {(index, branch) for s, index, branch in calls if s == step}
        assert ran == {tuple(ib) for ib in np.argwhere(runs[step])}
        # a block is logged as run when any of its branches ran
        assert (log.blocks_run[:, step] == runs[step].any(axis=1)).all()


def test_cache_step_equals_brute_force_swap_of_cached_outputs(tmp_path, tiny_model, tiny_checkpoint):
    router = save_router(tmp_path, tiny_checkpoint)
    method = make_method(tiny_model, router)
    torch.manual_seed(1)
    x = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    eps, _ = two_steps(method, tiny_model, x, [0, 1])

    # brute force: the full model at step 0 records every branch output; at step 1 the reused ones are swapped in
    t = [torch.full((4,), 900.0), torch.full((4,), 600.0)]
    runs = l2c.compute_mask(hand_beta(), 0.5)[1]
    recorded, handles = {}, []
    branches = [(index, branch, module) for index, block in enumerate(tiny_model.block_list())
                for branch, module in enumerate((block.attn, block.mlp))]
    for index, branch, module in branches:
        handles.append(module.register_forward_hook(
            lambda m, i, out, key=(index, branch): recorded.setdefault(key, out)))
    with torch.no_grad():
        tiny_model(x[0], t[0])
        for handle in handles:
            handle.remove()
        for index, branch, module in branches:
            if not runs[index, branch]:
                handles.append(module.register_forward_hook(lambda m, i, out, key=(index, branch): recorded[key]))
        expected = tiny_model(x[1], t[1])
        for handle in handles:
            handle.remove()
        fresh = tiny_model(x[1], t[1])
    assert torch.allclose(eps, expected, atol=1e-6)
    assert not torch.allclose(eps, fresh, atol=1e-3)  # the reuse mattered

    # training's interpolation with beta in {0, 1} is the same computation
    cached = {(index, name): recorded[index, branch] for index in range(NUM_BLOCKS)
              for branch, name in enumerate(l2c.BRANCH_NAMES)}
    beta = torch.from_numpy(runs).float().expand(4, -1, -1)
    with torch.no_grad():
        student = l2c.student_eps(tiny_model, x[1], t[1], None, cached, beta)
    assert torch.allclose(student, expected, atol=1e-6)


def test_threshold_that_reuses_nothing_equals_full(tmp_path, tiny_model, tiny_checkpoint):
    router = save_router(tmp_path, tiny_checkpoint)
    images, log = generate(cell(router, threshold=0.0), tiny_model, 3, 3)
    full_images, full_log = generate(Cell("full", (), "ddim", NUM_STEPS, 0), tiny_model, 3, 3)
    assert torch.equal(images, full_images)
    assert log.blocks_run.all() and log.layer_ratio() == 1.0
    costs = unit_costs(tiny_model)
    assert log.macs_per_image(costs) == pytest.approx(full_log.macs_per_image(costs), rel=1e-12)


def test_dispatch_flops_equal_the_step_log(tmp_path, tiny_model, tiny_checkpoint):
    router = save_router(tmp_path, tiny_checkpoint)
    reuse, full = cell(router), Cell("full", (), "ddim", NUM_STEPS, 0)
    n = 2
    method = make_method(tiny_model, router)
    _, log = generate(reuse, tiny_model, n, 2, method=method)
    _, full_log = generate(full, tiny_model, n, 2)
    flops = dispatch_flops(lambda: generate(reuse, tiny_model, n, 2))
    flops_full = dispatch_flops(lambda: generate(full, tiny_model, n, 2))
    costs = unit_costs(tiny_model)
    assert log.macs_per_image(costs) == pytest.approx(flops / 2 / n, rel=0.01)
    assert log.macs_per_image(costs) / full_log.macs_per_image(costs) == pytest.approx(flops / flops_full, rel=0.01)
    assert flops < 0.9 * flops_full
    # flags: every block at full steps; at cache steps the blocks with a branch that ran
    runs = l2c.compute_mask(hand_beta(), 0.5)
    assert log.layer_ratio() == pytest.approx(runs.any(axis=2).mean())
    # the cache holds only what the next step reuses (7 branch outputs after step 0, 5 after step 2), per batch row
    tokens = (TINY.img_size // TINY.patch_size) ** 2 + 1
    assert method.cache_bytes == 7 * 2 * tokens * TINY.embed_dim * 4


def test_router_loss_against_hand_computation():
    eps_teacher = torch.tensor([[[[1.0, 0.0]]], [[[0.5, -0.5]]]])   # B=2, a 1x1x2 image
    eps_student = torch.tensor([[[[0.0, 0.0]]], [[[0.5, 0.5]]]])
    beta = torch.tensor([[[0.2, 0.4]], [[1.0, 0.0]]])              # B=2, one block, (attention, MLP)
    errors = [1.0 + 0.0, 0.0 + 1.0]                                 # squared error summed over pixels
    l1 = [0.2 + 0.4, 1.0 + 0.0]
    expected = np.mean([errors[0] + 0.5 * l1[0], errors[1] + 0.5 * l1[1]])
    assert l2c.router_loss(eps_teacher, eps_student, beta, 0.5).item() == pytest.approx(expected)


def test_alpha_bar_at_integer_and_fractional_timesteps():
    alpha_bar = alphas_cumprod()
    got = l2c.alpha_bar_at(alpha_bar, torch.tensor([0.0, 999.0, 10.25])).flatten().double()
    sigma = lambda a: ((1 - a) / a).sqrt()
    mid = 0.75 * sigma(alpha_bar[10]) + 0.25 * sigma(alpha_bar[11])
    expected = torch.stack([alpha_bar[0], alpha_bar[999], 1 / (1 + mid ** 2)])
    assert torch.allclose(got, expected, rtol=1e-6)


def test_training_task_trains_only_the_cache_steps_scores(tiny_checkpoint):
    config = TrainFile(task="l2c", task_config=L2cTrainConfig(base_checkpoint=str(tiny_checkpoint), solver="ddim",
                                                              num_steps=NUM_STEPS, l1_weight=0.01))
    torch.manual_seed(0)
    task = l2c.training_task(config, alphas_cumprod())
    assert [name for name, _ in task.model.named_parameters()] == ["logits"]  # the backbone is not in the module
    loss = task.loss(torch.randn(16, 1, 8, 8), None, torch.Generator().manual_seed(0))
    loss.backward()
    grad = task.model.logits.grad
    assert grad[[0, 2]].abs().sum() == 0 and grad[[1, 3]].abs().sum() > 0


def test_router_checkpoint_round_trip(tmp_path, tiny_checkpoint):
    beta = hand_beta()
    path = save_router(tmp_path, tiny_checkpoint, beta, solver="dpm-solver++", num_steps=NUM_STEPS)
    router = l2c.load_router(str(path))
    assert torch.equal(router.beta, beta)
    assert (router.base_checkpoint, router.base_sha256) == (str(tiny_checkpoint), sha256_file(tiny_checkpoint))
    assert (router.solver, router.num_steps) == ("dpm-solver++", NUM_STEPS)
    assert path.stat().st_size < 8000


def test_mismatched_solver_steps_backbone_are_refused(tmp_path, tiny_model, tiny_checkpoint):
    router = save_router(tmp_path, tiny_checkpoint, solver="dpm-solver++")
    with pytest.raises(UserError, match="trained for solver 'dpm-solver\\+\\+' with 4 steps"):
        generate(cell(router, solver="ddim"), tiny_model, 2, 2)
    with pytest.raises(UserError, match="this cell samples 5 steps"):
        generate(cell(router, solver="dpm-solver++", num_steps=5), tiny_model, 2, 2)
    generate(cell(router, solver="dpm-solver++"), tiny_model, 2, 2)  # the trained setting runs
    cls = get_method("l2c")
    params = make_params(cls, {"checkpoint": str(router)}, "test")
    cls.check_schedule(params, "dpm-solver++", NUM_STEPS, "test")
    with pytest.raises(UserError, match="this cell samples 'ddpm' with 4 steps"):  # by name, before sampling
        cls.check_schedule(params, "ddpm", NUM_STEPS, "test")

    stale = save_router(tmp_path, tiny_checkpoint, sha256="0" * 64, name="stale.pt")
    with pytest.raises(UserError, match="now has sha256"):
        make_method(tiny_model, stale)
    torch.manual_seed(5)
    other = build_model(TINY).eval()
    with pytest.raises(UserError, match="not for this run's model"):
        cls.check(params, other, "test")
    with pytest.raises(UserError, match="not a Learning-to-Cache router"):
        make_method(tiny_model, tiny_checkpoint)
    with pytest.raises(UserError, match="threshold must be in"):
        make_params(cls, {"checkpoint": str(router), "threshold": 1.5}, "test")
