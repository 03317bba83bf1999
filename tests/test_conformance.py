"""Every registered method, with its default knobs, on the shipped digits model, keeps the suite's contracts.

- its step log is well formed: exit points are -1 or 1..N, and a prefix exit ran exactly blocks 1..k;
- the FLOPs the step log implies equal the FLOPs torch's dispatcher counts over a whole sampling run;
- batch size changes nothing (images and step log), unless the method declares itself batch-dependent;
- two runs with the same seed are identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import load_model
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.methods import available_methods, get_method, make_params
from conftest import REPO

NUM_SAMPLES = 3


@pytest.fixture(scope="module")
def digits_model():
    return load_model(REPO / "checkpoints" / "uvit_digits.pt")


@pytest.fixture(scope="module")
def costs(digits_model):
    return unit_costs(digits_model)


def default_cell(name: str) -> Cell:
    return Cell(name, (), "dpm-solver++", 25, 0)


def sample(cell, model, batch_size):
    return generate(cell, model, NUM_SAMPLES, batch_size, method=build_method(cell, model))


@pytest.fixture(autouse=True)
def run_from_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # default knobs name shipped files by repository-relative paths


@pytest.mark.parametrize("name", available_methods())
def test_method_keeps_the_contracts(name, digits_model, costs):
    cls = get_method(name)
    cls.check(make_params(cls, {}, name), digits_model, name)
    cell = default_cell(name)
    images, log = sample(cell, digits_model, NUM_SAMPLES)
    assert torch.isfinite(images).all()

    # a well-formed log: valid exit points; a prefix exit ran blocks 1..k and nothing after
    n = log.num_blocks
    exits = log.exit_point
    assert np.isin(exits, [-1, *range(1, n + 1)]).all()
    prefix = np.arange(n) < exits[..., None]
    exited = exits > 0
    assert (log.blocks_run[exited] == prefix[exited]).all()
    assert (log.head_calls[exited] >= 1).all()
    assert 0.0 <= log.layer_ratio() <= 1.0

    # the step log's FLOPs are the FLOPs that ran
    flops = dispatch_flops(lambda: sample(cell, digits_model, NUM_SAMPLES))
    assert log.macs_per_image(costs) == pytest.approx(flops / 2 / NUM_SAMPLES, rel=0.01)

    # deterministic given the seed
    again, log_again = sample(cell, digits_model, NUM_SAMPLES)
    assert torch.equal(images, again)
    assert (log.blocks_run == log_again.blocks_run).all()

    # batch size changes nothing unless the method says it may
    if not build_method(cell, digits_model).batch_dependent:
        one_by_one, log_single = sample(cell, digits_model, 1)
        assert torch.allclose(images, one_by_one, atol=1e-5)
        assert (log.blocks_run == log_single.blocks_run).all()
        assert (log.exit_point == log_single.exit_point).all()
