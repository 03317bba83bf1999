"""The exit-aware forward's shortcuts: a policy's None (nobody exits), and a batch that leaves all at one exit
point, the last included, logged as one forward of that depth with the head run on its tokens as they are.

References: the network run block by block by hand (a closed form of the log), and the general path, taken
when one sample of the batch stays longer (bit for bit: the CPU forward is batch-invariant).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.models.exit_forward import exit_aware_forward
from adadiff_bench.steplog import StepLog

ROWS, OTHERS = [6, 0, 2, 3, 5], [1, 4]  # the batch's rows in a log of 7 samples


def run(model, x, t, policy, macs=10.5):
    log = StepLog(7, np.arange(2), model.num_blocks)
    log.set_batch(np.array(ROWS[:len(x)]))
    log.set_step(1)
    with torch.no_grad():
        eps = exit_aware_forward(model, x, t, None, policy, log, policy_macs=macs)
    return eps, log


def by_hand(model, x, t, depth):
    """eps from the final head after the first `depth` blocks."""
    with torch.no_grad():
        tokens, state = model.begin(x, t, None)
        for block in range(depth):
            tokens = model.run_block(block, tokens, state)
        return model.head(tokens, state)


def assert_one_forward_of_depth(log, depth, rows, macs):
    last = log.num_blocks
    assert (log.embed_calls[rows, 1] == 1).all() and (log.head_calls[rows, 1] == 1).all()
    assert log.blocks_run[rows, 1, :depth].all() and not log.blocks_run[rows, 1, depth:].any()
    assert (log.exit_point[rows, 1] == depth).all()
    assert (log.extra_macs[rows, 1] == macs * min(depth, last - 1)).all()
    others = [row for row in range(7) if row not in rows]
    assert log.embed_calls[others].sum() == 0 and not log.blocks_run[:, 0].any() and log.extra_macs[others].sum() == 0


@pytest.fixture
def batch(tiny_model):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, tiny_model.in_chans, tiny_model.img_size, tiny_model.img_size, generator=generator)
    return x, torch.rand(5, generator=generator) * 999


@pytest.mark.parametrize("answer", [None, np.zeros(5, bool), torch.zeros(5, dtype=torch.bool)])
def test_nobody_leaving_early_is_a_plain_forward(tiny_model, batch, answer):
    x, t = batch
    eps, log = run(tiny_model, x, t, lambda *args: answer)
    assert torch.equal(eps, tiny_model(x, t))
    assert_one_forward_of_depth(log, tiny_model.num_blocks, ROWS, 10.5)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_batch_leaving_together_is_one_forward_of_that_depth(tiny_model, batch, depth):
    x, t = batch
    eps, log = run(tiny_model, x, t, lambda exit_point, *args: np.full(len(args[-1]), exit_point == depth))
    assert torch.equal(eps, by_hand(tiny_model, x, t, depth))
    assert_one_forward_of_depth(log, depth, ROWS, 10.5)


def test_the_shortcut_and_the_general_path_agree(tiny_model, batch):
    """Samples 0-3 leave at block 2; sample 4 stays to the end in one run (the general path) and leaves with
    them in the other (the shortcut): samples 0-3 get the same eps and records in both."""
    x, t = batch
    plan_mixed, plan_together = np.array([2, 2, 2, 2, tiny_model.num_blocks]), np.full(5, 2)

    def planned(plan):
        return lambda exit_point, tokens, state, t_active, active: plan[active.numpy()] == exit_point

    mixed, mixed_log = run(tiny_model, x, t, planned(plan_mixed))
    together, together_log = run(tiny_model, x, t, planned(plan_together))
    assert torch.equal(mixed[:4], together[:4])
    for field in StepLog.ROW_FIELDS:
        assert np.array_equal(getattr(mixed_log, field)[ROWS[:4]], getattr(together_log, field)[ROWS[:4]]), field
    assert mixed_log.exit_point[ROWS[4], 1] == tiny_model.num_blocks
