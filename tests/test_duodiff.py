"""DuoDiff: which backbone serves which step, its outputs, the FLOPs it logs, knob checks, the shipped shallow model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model, load_model, read_checkpoint, save_checkpoint
from adadiff_bench.config import UViTConfig
from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.registry import baseline_module
from adadiff_bench.steplog import StepLog
from conftest import REPO, TINY, context

duodiff = baseline_module("duodiff")
SHALLOW = dataclasses.replace(TINY, depth=2)


@pytest.fixture
def shallow_checkpoint(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "shallow.pt"
    save_checkpoint(path, build_model(SHALLOW).eval(), SHALLOW)
    return path


def make_method(model, shallow, **knobs):
    cls = get_method("duodiff")
    return cls(model, make_params(cls, {"shallow": str(shallow), **knobs}, "test"))


def shallow_macs(path) -> float:
    costs = unit_costs(load_model(path))
    return costs.embed + costs.blocks.sum() + costs.head


def test_shallow_model_serves_steps_above_t_switch_and_the_full_model_the_rest(tiny_model, shallow_checkpoint):
    method = make_method(tiny_model, shallow_checkpoint, t_switch=400)
    t = torch.tensor([999, 700, 401, 400, 200, 0])
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    log = StepLog(len(x), np.zeros(1), tiny_model.num_blocks)
    log.set_batch(np.arange(len(x)))
    log.set_step(0)
    method.start_batch(log)
    with torch.no_grad():
        eps = method(x, t, None, context(0, batch=len(x)))
        shallow = load_model(shallow_checkpoint)
        expected = torch.cat([shallow(x[:3], t[:3]), tiny_model(x[3:], t[3:])])
    assert torch.allclose(eps, expected, atol=1e-6)
    assert not log.blocks_run[:3].any() and log.blocks_run[3:].all()
    assert log.extra_macs[:3, 0] == pytest.approx([shallow_macs(shallow_checkpoint)] * 3)
    assert (log.extra_macs[3:] == 0).all()
    assert log.embed_calls[:, 0].tolist() == [0, 0, 0, 1, 1, 1] and log.exit_point[:, 0].tolist() == [-1] * 3 + [5] * 3


def test_sampling_run_switches_once_and_logs_the_flops_that_ran(tiny_model, shallow_checkpoint):
    cell = Cell("duodiff", (("shallow", str(shallow_checkpoint)), ("t_switch", 500.0)), "ddim", 5, 0)
    n = 4
    images, log = generate(cell, tiny_model, n, 2)  # first: loads the shallow model and measures its unit costs
    flops = dispatch_flops(lambda: generate(cell, tiny_model, n, 2))
    costs = unit_costs(tiny_model)
    assert log.macs_per_image(costs) == pytest.approx(flops / 2 / n, rel=0.01)
    # ddim 5 steps visit t = 999, 799, 599 (shallow), 399, 199 (full)
    assert log.blocks_run.all(axis=2)[0].tolist() == [False, False, False, True, True]
    full_macs = costs.embed + costs.blocks.sum() + costs.head
    expected = 3 * shallow_macs(shallow_checkpoint) + 2 * full_macs
    assert log.macs_per_image(costs) == pytest.approx(expected)
    one_by_one, _ = generate(cell, tiny_model, n, 1)
    assert torch.allclose(images, one_by_one, atol=1e-5)


def test_images_equal_the_full_model_when_it_serves_every_step(tiny_model, tiny_checkpoint, shallow_checkpoint):
    full, _ = generate(Cell("full", (), "ddim", 4, 0), tiny_model, 3, 3)
    never = Cell("duodiff", (("shallow", str(shallow_checkpoint)), ("t_switch", 1000.0)), "ddim", 4, 0)
    assert torch.equal(generate(never, tiny_model, 3, 3)[0], full)
    # with the full model's own weights as the "shallow" one, switching anywhere changes nothing
    same = Cell("duodiff", (("shallow", str(tiny_checkpoint)), ("t_switch", 300.0)), "ddim", 4, 0)
    assert torch.allclose(generate(same, tiny_model, 3, 3)[0], full, atol=1e-6)
    early = Cell("duodiff", (("shallow", str(shallow_checkpoint)), ("t_switch", 300.0)), "ddim", 4, 0)
    assert not torch.allclose(generate(early, tiny_model, 3, 3)[0], full, atol=1e-3)


def test_knobs_are_validated(tmp_path, tiny_model):
    cls = get_method("duodiff")
    with pytest.raises(UserError, match=r"t_switch must be a timestep in \[0, 1000\]"):
        make_params(cls, {"t_switch": 1200.0, "shallow": str(REPO / duodiff.DEFAULT_SHALLOW)}, "test")
    with pytest.raises(UserError, match="shallow checkpoint .* not found"):
        make_params(cls, {"shallow": str(tmp_path / "missing.pt")}, "test")
    wrong = UViTConfig(img_size=16, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    save_checkpoint(tmp_path / "wrong.pt", build_model(wrong), wrong)
    with pytest.raises(UserError, match="train the shallow model on the same data"):
        cls.check(make_params(cls, {"shallow": str(tmp_path / "wrong.pt")}, "test"), tiny_model, "test")


def test_shipped_shallow_model_matches_the_digits_model(monkeypatch):
    monkeypatch.chdir(REPO)
    path = REPO / duodiff.DEFAULT_SHALLOW
    assert path.stat().st_size < 8 * 2 ** 20
    assert read_checkpoint(path)["state_dict"]["pos_embed"].dtype == torch.float16
    shallow, digits = load_model(path), load_model(REPO / "checkpoints" / "uvit_digits.pt")
    assert shallow.num_blocks == 3 and (shallow.embed_dim, shallow.patch_size) == (digits.embed_dim, digits.patch_size)
    cls = get_method("duodiff")
    cls.check(make_params(cls, {}, "test"), digits, "test")
