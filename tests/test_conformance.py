"""Every registered method, with its default knobs, on the shipped digits model, keeps the suite's contracts
(`adadiff_bench.testing.check_method_contracts`: a well-formed step log whose FLOPs equal the dispatcher's
count, determinism, and batch-size independence unless the method declares otherwise)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import load_model
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import Method, available_methods, register_method
from adadiff_bench.methods.registry import _REGISTRY
from adadiff_bench.testing import check_method_contracts, tiny_backbone
from conftest import DIGITS_BACKBONE, REPO


@pytest.fixture(scope="module")
def digits_model():
    return load_model(DIGITS_BACKBONE)


@pytest.fixture(autouse=True)
def run_from_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # default knobs name shipped files by repository-relative paths


@pytest.mark.parametrize("name", available_methods())
def test_method_keeps_the_contracts(name, digits_model):
    check_method_contracts(name, digits_model)


class HalfCounted(Method):
    """A method that runs the whole network but logs only half of its blocks: its FLOPs are not real."""
    name = "test-half-counted"

    def __call__(self, x, t, y, ctx):
        eps = self.model(x, t, y)
        self.log.ran_embed()
        for block in range(self.model.num_blocks // 2):
            self.log.ran_block(block)
        self.log.ran_head()
        return eps


def test_the_check_catches_a_method_whose_step_log_undercounts():
    register_method(HalfCounted)
    try:
        with pytest.raises(AssertionError, match="the dispatcher counted"):
            check_method_contracts(HalfCounted.name, tiny_backbone())
    finally:
        _REGISTRY.pop(HalfCounted.name)


def test_tiny_backbone_samples():
    images, _ = generate(Cell("full", (), "ddim", 2, 0), tiny_backbone(), 2, 2)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_the_check_prepares_a_setting_that_trains_on_demand(tmp_path):
    """An AdaDiff ablation setting is trained by `prepare` (a few steps here) and sampled from what it trained."""
    from adadiff_bench.checkpoints import save_checkpoint
    from adadiff_bench.testing import TINY_UVIT
    save_checkpoint(tmp_path / "base.pt", tiny_backbone(), TINY_UVIT)
    (tmp_path / "train.toml").write_text(f'[train]\nsteps = 3\nbatch_size = 8\nwarmup_steps = 0\n'
                                         f'out_dir = "{tmp_path / "unused"}"\n[adadiff]\n'
                                         f'base_checkpoint = "{tmp_path / "base.pt"}"\n')
    check_method_contracts("adadiff", tiny_backbone(), {"train": str(tmp_path / "train.toml"), "threshold": 0.5,
                                                        "estimator": "probe"}, training_cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("probe-official-frozen-*/weights.pt"))) == 1


def test_the_check_catches_a_policy_that_writes_into_its_rows():
    """The forward's host row index is made once per batch size and shared: a policy must only read it."""
    from adadiff_bench.methods.prefix_exit import PrefixExit
    from adadiff_bench.models import exit_forward

    class Scribbler(PrefixExit):
        name = "test-scribbler"

        def policy(self, exit_point, tokens, state, t, active):
            active.zero_()  # (the values stay valid rows, so only the check can notice)
            return np.zeros(len(active), dtype=bool)

    register_method(Scribbler)
    try:
        with pytest.raises(AssertionError, match="wrote into `active`"):
            check_method_contracts(Scribbler.name, tiny_backbone(), num_steps=3, num_samples=2)
    finally:
        _REGISTRY.pop(Scribbler.name)
        exit_forward._ALL_ROWS.clear()  # the scribbled rows must not reach the next test
