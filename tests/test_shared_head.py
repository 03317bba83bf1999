"""The exit-aware forward gathers the exits of a shared head into one head call per forward.

The gathered call must give every sample the eps it gets when each exit event runs the head on its own
samples (bit for bit: the head is batch-invariant on the CPU), log the same records, and run the head
once; a backbone whose head reads the block state (DiT) keeps one call per exit event, with the state
of the samples that exit.
"""
from __future__ import annotations

import numpy as np
import torch

from adadiff_bench.methods.adadiff.estimators import OfficialEstimator
from adadiff_bench.methods.adadiff.network import AdaDiffConfig
from adadiff_bench.models.exit_forward import exit_aware_forward, shared_head
from adadiff_bench.steplog import StepLog
from test_dit import inputs, tiny_dit


def planned_exits(batch: int, num_blocks: int, seed: int) -> np.ndarray:
    """Each sample's exit point, spread over every block (the last included)."""
    return np.random.default_rng(seed).integers(1, num_blocks + 1, batch)


def host_policy(plan: np.ndarray, predict_at: int | None = None, head=None):
    """Exits as planned, decided on the host; at `predict_at` the policy runs the head itself and returns its
    eps (as a method that decides from the exit's prediction does)."""
    def policy(exit_point, tokens, state, t, active):
        mask = plan[active.numpy()] == exit_point
        if exit_point == predict_at:
            return mask, head(exit_point, tokens, state)
        return mask
    return policy


class CountedHead:
    """The backbone's head, counting calls and the states it was given; `shared` as asked."""

    def __init__(self, model, shared: bool):
        self.model, self.shared, self.calls, self.states = model, shared, 0, []

    def __call__(self, exit_point, tokens, state):
        self.calls += 1
        self.states.append(state)
        return self.model.head(tokens, state)


def forward(model, x, t, y, policy, heads):
    log = StepLog(len(x), np.arange(1), model.num_blocks)
    log.set_batch(np.arange(len(x)))
    log.set_step(0)
    with torch.no_grad():
        eps = exit_aware_forward(model, x, t, y, policy, log, heads=heads)
    return eps, log


def same_logs(a: StepLog, b: StepLog) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name))
               for name in ("blocks_run", "exit_point", "embed_calls", "head_calls"))


def test_a_shared_head_runs_once_and_gives_each_sample_its_own_exit(tiny_model):
    x, t = torch.randn(24, 1, 8, 8), torch.randint(0, 1000, (24,))
    plan = planned_exits(24, tiny_model.num_blocks, seed=0)
    per_event, gathered = CountedHead(tiny_model, shared=False), CountedHead(tiny_model, shared=True)
    eps_apart, log_apart = forward(tiny_model, x, t, None, host_policy(plan), per_event)
    eps_once, log_once = forward(tiny_model, x, t, None, host_policy(plan), gathered)
    assert per_event.calls == len(set(plan.tolist())) > 2 and gathered.calls == 1
    assert torch.equal(eps_once, eps_apart) and same_logs(log_once, log_apart)
    assert gathered.states == [None]  # U-ViT's head reads no state: none is cut for it
    for sample in (0, 7, 23):  # and each sample's eps is that of its own prefix, run alone
        alone, _ = forward(tiny_model, x[sample:sample + 1], t[sample:sample + 1], None,
                           host_policy(plan[sample:sample + 1]), shared_head(tiny_model))
        assert torch.equal(eps_once[sample], alone[0])


def test_predictions_from_the_policy_mix_with_the_gathered_exits(tiny_model):
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,))
    plan = planned_exits(16, tiny_model.num_blocks, seed=1)
    busiest = int(np.bincount(plan)[:-1].argmax())  # a block before the last where several samples leave
    apart, _ = forward(tiny_model, x, t, None, host_policy(plan), CountedHead(tiny_model, shared=False))
    head = CountedHead(tiny_model, shared=True)
    mixed, _ = forward(tiny_model, x, t, None, host_policy(plan, busiest, head), head)
    assert head.calls == 2  # the policy's own call, and one for every other exit
    assert torch.equal(mixed, apart)


def test_a_head_that_reads_the_state_runs_per_exit_on_the_leaving_samples_state():
    model = tiny_dit()
    x, t, y = inputs(12)
    plan = planned_exits(12, model.num_blocks, seed=2)
    shared = CountedHead(model, shared=True)
    eps, _ = forward(model, x, t, y, host_policy(plan), shared)
    assert shared.calls == len(set(plan.tolist())) and all(state is not None for state in shared.states)
    for sample in range(12):
        alone, _ = forward(model, x[sample:sample + 1], t[sample:sample + 1], y[sample:sample + 1],
                           host_policy(plan[sample:sample + 1]), shared_head(model))
        assert torch.allclose(eps[sample], alone[0], atol=1e-5)


def test_the_official_estimator_follows_new_parameter_objects(tiny_model):
    """`scalar_on_host` keeps the exits' parameters in a list: whatever replaces them must refresh it (a conversion,
    a new tensor under a parameter, a load that assigns new parameters)."""
    estimator = OfficialEstimator(tiny_model, AdaDiffConfig())
    tokens, t = torch.randn(3, tiny_model.num_tokens, tiny_model.embed_dim), torch.zeros(3)
    with torch.no_grad():
        estimator.scalar_on_host(1, tokens, t)  # gathers the parameters
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            before = estimator.certainty[0].weight
            estimator.to(torch.float64).to(torch.float32)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        assert estimator.certainty[0].weight is not before
        estimator.certainty[0].weight.mul_(3.0)
        assert np.array_equal(estimator.scalar_on_host(1, tokens, t), estimator.scalar(1, tokens, t).numpy())
        estimator.certainty[0].weight.data = torch.randn_like(estimator.certainty[0].weight)  # new storage, same object
        assert np.array_equal(estimator.scalar_on_host(1, tokens, t), estimator.scalar(1, tokens, t).numpy())
        replacement = {name: torch.randn_like(value) for name, value in estimator.state_dict().items()}
        estimator.load_state_dict(replacement, assign=True)  # new Parameter objects
        assert np.array_equal(estimator.scalar_on_host(1, tokens, t), estimator.scalar(1, tokens, t).numpy())
