"""The suite's conformance check, exported so that a plugin package runs it on its own method.

    from adadiff_bench.testing import check_method_contracts, tiny_backbone

    def test_my_method_keeps_the_suite_contracts():
        check_method_contracts("my-method", tiny_backbone(), {"threshold": 0.5})

A method that passes keeps the contracts every number of the suite rests on:
- its step log is well formed: exit points are -1 (no exit by prefix) or 1..N, and a prefix exit at
  k ran exactly blocks 1..k and at least one head;
- the FLOPs its step log implies equal what torch's dispatcher counts over a whole sampling run
  (within 1%), so its GFLOPs are real;
- it is deterministic given the seed;
- batch size changes neither its images nor its step log, unless it declares `batch_dependent`;
- it makes no tensor without the model's device (`check_device_placement`: a forgotten `device=`
  shows on the CPU, not first on a GPU);
- its exit policy, if it has one, leaves the rows the exit-aware forward hands it (`active`) as they were.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoints import build_model
from .config import UViTConfig
from .diffusion import sample, solver_timesteps
from .flops import dispatch_flops, unit_costs
from .harness import Cell, build_method, generate
from .methods import PrepareContext, get_method, make_params
from .models.backbone import Backbone
from .models.exit_forward import shared_row_indices
from .steplog import StepLog

TINY_UVIT = UViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2)


def tiny_backbone(seed: int = 0) -> Backbone:
    """A small U-ViT with random weights (8x8 grey images, 5 blocks): fast enough for any test."""
    torch.manual_seed(seed)
    return build_model(TINY_UVIT).eval()


def check_method_contracts(name: str, model: Backbone, params: dict | None = None, solver: str = "dpm-solver++",
                           num_steps: int = 25, num_samples: int = 3, training_cache: Path | None = None) -> None:
    """Sample `num_samples` images with method `name` (knobs `params`) on `model` and check every contract;
    raises AssertionError naming the broken one."""
    cls = get_method(name)
    cell = Cell(name, tuple(sorted((params or {}).items())), solver, num_steps, 0)
    knobs = make_params(cls, dict(cell.params), name)
    cls.check(knobs, model, name)
    cls.check_schedule(knobs, solver, num_steps, name)
    with tempfile.TemporaryDirectory() as scratch:  # what `prepare` trains lives until the checks are done
        knobs = cls.prepare(knobs, PrepareContext(Path(training_cache or scratch), progress=False))
        check_sampling(cell, model, knobs, num_samples)
        check_device_placement(cell, model, knobs, num_samples)
        check_modules_follow_the_model(cell, model, knobs)
    for count, rows in shared_row_indices().items():  # made once per batch size and shared by every forward
        assert torch.equal(rows, torch.arange(count)), f"{name}: its exit policy wrote into `active`"


def check_modules_follow_the_model(cell: Cell, model: Backbone, knobs) -> None:
    """Built on a copy of the model on the "meta" device, the method holds no module or tensor elsewhere:
    what it loads (estimators, routers, second models) follows the model's device."""
    method = build_method(cell, copy.deepcopy(model).to("meta"), knobs)
    for name, value in vars(method).items():
        for tensor in _tensors_in(value):
            assert tensor.device.type == "meta", \
                f"{cell.method}: its {name!r} holds a tensor on {tensor.device} while the model is on another device"


def _tensors_in(value, depth: int = 0):
    """The tensors a method attribute holds: in modules, containers and bound methods (a few levels deep)."""
    if depth > 3:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from value.parameters()
        yield from value.buffers()
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif hasattr(value, "__self__"):  # a bound method of a module, e.g. an exit head
        yield from _tensors_in(value.__self__, depth + 1)


def check_device_placement(cell: Cell, model: Backbone, knobs, num_samples: int = 2) -> None:
    """Every call of the method's denoiser runs with torch's default device set to "meta" while the model
    and inputs sit on the CPU: a tensor made without `device=` lands on "meta", and mixing it with the
    model's tensors fails here as it would on a GPU. (Set-up outside the denoiser, such as the scheduler's,
    runs normally.)"""
    method = build_method(cell, model, knobs)
    log = StepLog(num_samples, solver_timesteps(cell.solver, cell.num_steps), model.num_blocks)
    log.set_batch(np.arange(num_samples))
    method.start_batch(log)

    def denoiser(x, t, y, ctx):
        log.set_step(ctx.step)
        with torch.device("meta"):
            try:
                eps = method(x, t, y, ctx)
            except (RuntimeError, NotImplementedError) as exc:
                raise AssertionError(f"{cell.method}: a tensor was made without the model's device "
                                     f"(under a meta default device: {str(exc).splitlines()[0]})") from exc
        assert eps.device == x.device, f"{cell.method}: eps came back on {eps.device}, not the input's {x.device}"
        return eps

    shape = (model.in_chans, model.img_size, model.img_size)
    sample(denoiser, cell.solver, cell.num_steps, shape, range(num_samples), cell.seed, max(model.num_classes, 0))


def check_sampling(cell: Cell, model: Backbone, knobs, num_samples: int) -> None:
    """The contracts of one prepared setting: a well-formed step log with real FLOPs, determinism, batch size."""
    name = cell.method

    def run(batch_size: int):
        return generate(cell, model, num_samples, batch_size, method=build_method(cell, model, knobs))

    images, log = run(num_samples)
    assert torch.isfinite(images).all(), f"{name}: non-finite samples"
    check_step_log(name, log)
    flops = dispatch_flops(lambda: run(num_samples))
    logged, counted = log.macs_per_image(unit_costs(model)), flops / 2 / num_samples
    assert abs(logged - counted) <= 0.01 * logged, \
        f"{name}: the step log implies {logged:.6g} MACs per image, the dispatcher counted {counted:.6g}"
    again, log_again = run(num_samples)
    assert torch.equal(images, again) and (log.blocks_run == log_again.blocks_run).all(), \
        f"{name}: two runs with the same seed differ"
    if not build_method(cell, model, knobs).batch_dependent:
        one_by_one, log_single = run(1)
        assert torch.allclose(images, one_by_one, atol=1e-5), f"{name}: batch size changed the images"
        assert (log.blocks_run == log_single.blocks_run).all() and (log.exit_point == log_single.exit_point).all(), \
            f"{name}: batch size changed the step log"


def check_step_log(name: str, log) -> None:
    """Exit points -1 or 1..N; a prefix exit at k ran blocks 1..k only and at least one head."""
    n = log.num_blocks
    exits = log.exit_point
    assert np.isin(exits, [-1, *range(1, n + 1)]).all(), f"{name}: exit points outside -1, 1..{n}"
    prefix = np.arange(n) < exits[..., None]
    exited = exits > 0
    assert (log.blocks_run[exited] == prefix[exited]).all(), f"{name}: a prefix exit at k did not run exactly 1..k"
    assert (log.head_calls[exited] >= 1).all(), f"{name}: an exit without a head call"
    assert 0.0 <= log.layer_ratio() <= 1.0, f"{name}: layer ratio outside [0, 1]"
