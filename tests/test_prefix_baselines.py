"""The prefix-exit baselines' decisions: static-exit, CALM, PABEE, oracle, random-exit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.errors import UserError
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.steplog import StepLog
from conftest import TINY, context, plain_hidden_states


def build(name, model, **knobs):
    cls = get_method(name)
    params = make_params(cls, knobs, "test")
    cls.check(params, model, "test")
    return cls(model, params)


def start(method, batch, num_blocks, step=0, rows=None, timesteps=None):
    """A step log for the batch, given to the method; returns (log, the sampling context of that step)."""
    rows = np.arange(batch) if rows is None else np.asarray(rows)
    timesteps = np.zeros(max(step + 1, 1)) if timesteps is None else np.asarray(timesteps, dtype=np.float64)
    log = StepLog(int(rows.max()) + 1, timesteps, num_blocks)
    log.set_batch(rows)
    log.set_step(step)
    method.start_batch(log)
    return log, context(step, timesteps, rows)


def all_exit_predictions(model, x, t):
    """Brute force: every exit's eps through the shared head, all blocks for every sample (plain block calls)."""
    with torch.no_grad():
        return torch.stack([model.head(tokens) for tokens in plain_hidden_states(model, x, t)], 1)


def rms(a, b):
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def test_static_exit_runs_k_blocks_and_returns_exit_k(tiny_model):
    x, t = torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,))
    method = build("static-exit", tiny_model, k=3)
    log, ctx = start(method, 5, tiny_model.num_blocks)
    with torch.no_grad():
        eps = method(x, t, None, ctx)
    assert torch.allclose(eps, all_exit_predictions(tiny_model, x, t)[:, 2], atol=1e-5)
    assert (log.exit_point[:, 0] == 3).all()
    assert log.blocks_run[:, 0].sum(1).tolist() == [3] * 5


def test_static_exit_beyond_the_depth_is_refused_before_running(tiny_model):
    with pytest.raises(UserError, match="k = 9 exceeds the model's 5 blocks"):
        build("static-exit", tiny_model, k=9)


def test_calm_state_exits_when_consecutive_states_are_parallel(tiny_model):
    method = build("calm", tiny_model, tau=0.99)
    _, ctx = start(method, 3, tiny_model.num_blocks)
    method.begin(torch.zeros(3, 1, 8, 8), None, None, ctx)
    active = torch.arange(3)
    first = torch.randn(3, 17, 32)
    assert not method.policy(1, first, None, None, active).any()  # nothing to compare with after block 1
    second = first.clone()
    second[0] *= 2.0                          # same direction: cosine 1
    second[1] = torch.randn(17, 32)           # unrelated: cosine near 0
    second[2] = first[2] + 0.05 * torch.randn(17, 32)   # nearly parallel
    exiting = method.policy(2, second, None, None, active)
    assert exiting.tolist() == [True, False, True]
    # compacted: only row 1 is left; it compares with its own previous state
    third = second[1:2] * 3.0
    assert method.policy(3, third, None, None, torch.tensor([1])).tolist() == [True]


def sequence_policy(method, predictions_per_exit):
    """Drive a prediction-based policy with given predictions (head = identity), compacting like the forward."""
    method.heads = lambda exit_point, tokens, state: tokens
    active = torch.arange(predictions_per_exit.shape[1])
    exit_points = torch.full((len(active),), -1)
    for exit_point, predictions in enumerate(predictions_per_exit, 1):
        exiting, _ = method.policy(exit_point, predictions[active], None, None, active)
        exit_points[active[exiting]] = exit_point
        active = active[~exiting]
    return exit_points.tolist()


def offsets(*per_exit):
    """Predictions (exit, sample, 1, 2, 2) whose value is a constant per exit and sample."""
    return torch.tensor(per_exit, dtype=torch.float32)[..., None, None, None].expand(-1, -1, 1, 2, 2).clone()


def test_pabee_counts_consecutive_agreements_and_resets(tiny_model):
    method = build("pabee", tiny_model, patience=2, delta=0.1)
    _, ctx = start(method, 3, 6)
    method.begin(torch.zeros(3, 1, 2, 2), None, None, ctx)
    # sample 0 agrees at 2 and 3 -> exits at 3; sample 1 agrees at 2, breaks at 3, agrees at 4, 5 -> 5;
    # sample 2 never agrees -> never exits by itself
    predictions = offsets([0.0, 0.0, 0.0], [0.05, 0.05, 1.0], [0.1, 1.0, 2.0], [0.1, 1.05, 3.0],
                          [0.1, 1.1, 4.0], [0.1, 1.1, 5.0])
    assert sequence_policy(method, predictions) == [3, 5, -1]


def test_calm_prediction_exits_at_the_first_agreeing_pair(tiny_model):
    method = build("calm", tiny_model, variant="prediction", tau=0.1)
    _, ctx = start(method, 2, 4)
    method.begin(torch.zeros(2, 1, 2, 2), None, None, ctx)
    predictions = offsets([0.0, 0.0], [1.0, 0.05], [1.05, 0.5], [2.0, 1.0])
    assert sequence_policy(method, predictions) == [3, 2]


def test_oracle_exits_at_the_first_exit_within_tau_of_full_depth(tiny_model):
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    predictions = all_exit_predictions(tiny_model, x, t)
    errors = torch.stack([rms(predictions[:, i], predictions[:, -1]) for i in range(tiny_model.num_blocks)], 1)
    tau = float(errors[:, :-1].median())
    expected = (errors <= tau).float().argmax(1) + 1
    method = build("oracle", tiny_model, tau=tau)
    log, ctx = start(method, 8, tiny_model.num_blocks)
    with torch.no_grad():
        eps = method(x, t, None, ctx)
    assert log.exit_point[:, 0].tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1
    assert torch.allclose(eps, predictions[torch.arange(8), expected - 1], atol=1e-5)
    assert get_method("oracle").ceiling


def test_random_exit_matches_its_target_layer_ratio(tiny_model):
    method = build("random-exit", tiny_model, layer_ratio=0.55, seed=3)
    n = tiny_model.num_blocks
    draws = np.array([method.draw(i, s, None) for i in range(400) for s in range(10)])
    assert draws.min() >= 1 and draws.max() <= n
    assert draws.mean() / n == pytest.approx(0.55, abs=0.02)
    assert len(set(draws)) == n  # every exit point can occur


def test_random_exit_draws_depend_on_sample_and_step_only(tiny_model):
    method = build("random-exit", tiny_model, layer_ratio=0.6)
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 500)
    _, ctx = start(method, 6, tiny_model.num_blocks, step=2, rows=range(10, 16))
    method.begin(x, t, None, ctx)
    together = method.exit_points.tolist()
    alone = []
    for row in range(10, 16):
        _, ctx = start(method, 1, tiny_model.num_blocks, step=2, rows=[row])
        method.begin(x[:1], t[:1], None, ctx)
        alone += method.exit_points.tolist()
    assert together == alone


def test_random_exit_follows_a_recorded_profile(tmp_path, tiny_model):
    n = tiny_model.num_blocks
    histogram = np.zeros((2, n + 1), dtype=np.int64)
    histogram[0, 2] = 10           # step 0: always exit point 2
    histogram[1, [1, n]] = [5, 15]  # step 1: exit point 1 a quarter of the time, else full depth
    np.savez(tmp_path / "exits.npz", timesteps=np.array([999.0, 500.0]), timestep_exit_histogram=histogram)
    method = build("random-exit", tiny_model, profile=str(tmp_path))
    _, ctx = start(method, 400, n, timesteps=[999.0, 500.0])
    assert {method.draw(i, 0, method.step_probabilities(ctx)) for i in range(50)} == {2}
    _, ctx = start(method, 400, n, step=1, timesteps=[999.0, 500.0])
    draws = np.array([method.draw(i, 1, method.step_probabilities(ctx)) for i in range(2000)])
    assert set(draws) == {1, n}
    assert (draws == 1).mean() == pytest.approx(0.25, abs=0.03)


def test_random_exit_refuses_a_profile_of_other_steps(tmp_path, tiny_model):
    n = tiny_model.num_blocks
    histogram = np.zeros((2, n + 1), dtype=np.int64)
    histogram[:, n] = 1
    np.savez(tmp_path / "exits.npz", timesteps=np.array([999.0, 500.0]), timestep_exit_histogram=histogram)
    method = build("random-exit", tiny_model, profile=str(tmp_path / "exits.npz"))
    _, ctx = start(method, 2, n, timesteps=[999.0, 666.0, 333.0])
    with pytest.raises(UserError, match="same solver and num_steps"):
        method.begin(torch.zeros(2, 1, 8, 8), None, None, ctx)


def test_random_exit_refuses_non_exit_profiles_and_tiny_ratios(tmp_path, tiny_model):
    n = tiny_model.num_blocks
    np.savez(tmp_path / "exits.npz", timesteps=np.array([1.0]), timestep_exit_histogram=np.eye(1, n + 1, 0))
    with pytest.raises(UserError, match="not a prefix-exit cell"):
        build("random-exit", tiny_model, profile=str(tmp_path))
    with pytest.raises(UserError, match="below one block"):
        build("random-exit", tiny_model, layer_ratio=0.1)


def test_exit_network_of_a_u_vit_uses_its_final_head_and_of_adadiff_its_exit_heads(tmp_path, tiny_model):
    from adadiff_bench.checkpoints import save_checkpoint
    from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff, save_adadiff
    from adadiff_bench.methods.prefix_exit import exit_network
    torch.manual_seed(4)
    net = build_adadiff(TINY, AdaDiffConfig(heads="per-exit")).eval()
    with torch.no_grad():
        for head in net.exit_heads:  # heads that differ from the final one
            head.decoder_pred.bias.normal_()
    save_adadiff(tmp_path / "adadiff.pt", net, TINY)
    save_checkpoint(tmp_path / "uvit.pt", tiny_model, TINY)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    for path, model in (("uvit.pt", tiny_model), ("adadiff.pt", net.backbone)):
        backbone, heads = exit_network(str(tmp_path / path))
        with torch.no_grad():
            states = plain_hidden_states(model, x, t)
            for exit_point in (2, 5):
                expected = net.exit_head(exit_point, states[exit_point - 1], None) if path == "adadiff.pt" \
                    else model.head(states[exit_point - 1])
                assert torch.allclose(heads(exit_point, states[exit_point - 1], None), expected, atol=1e-6)
            # static-exit with that checkpoint runs that backbone and those heads
            method = build("static-exit", tiny_model, k=2, checkpoint=str(tmp_path / path))
            log, ctx = start(method, 4, model.num_blocks)
            assert method.backbone is backbone
            eps = method(x, t, None, ctx)
            assert torch.allclose(eps, heads(2, states[1], None), atol=1e-5)
    assert not torch.allclose(net.exit_head(2, states[1], None), net.backbone.head(states[1]), atol=1e-3)


def test_a_checkpoint_of_another_architecture_is_refused_before_running(tmp_path, tiny_model):
    import dataclasses

    from adadiff_bench.checkpoints import build_model, save_checkpoint
    wider = dataclasses.replace(TINY, embed_dim=48, num_heads=3)
    save_checkpoint(tmp_path / "wide.pt", build_model(wider), wider)
    with pytest.raises(UserError, match=r"\(channels, size, patch, width, blocks = \(1, 8, 2, 48, 5\)\) differs "
                                        r"from the run's model \(1, 8, 2, 32, 5\)") as error:
        build("calm", tiny_model, checkpoint=str(tmp_path / "wide.pt"))
    assert "\n" not in str(error.value)
