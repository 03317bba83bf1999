"""Feature-caching baselines (deepcache, fora, delta-dit): schedules, refresh = full, reuse = brute force
from the cached tensors, interval 1 = full, FLOPs vs dispatch count, batch independence, knob errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.steplog import StepLog
from conftest import TINY, context, plain_blocks

# TINY has 5 blocks in execution order: in-blocks 0, 1, mid-block 2, out-blocks 3, 4 (3 pops 1's skip, 4 pops 0's)
F = [1, 1, 1, 1, 1]
SCHEDULES = {  # (method, knobs): blocks run at each of 6 sampling steps
    ("deepcache", (("branch", 1), ("interval", 3))): [F, [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], F,
                                                      [1, 0, 0, 0, 1], [1, 0, 0, 0, 1]],
    ("deepcache", (("branch", 2), ("interval", 2))): [F, [1, 1, 0, 1, 1], F, [1, 1, 0, 1, 1], F, [1, 1, 0, 1, 1]],
    ("fora", (("interval", 2),)): [F, [0] * 5, F, [0] * 5, F, [0] * 5],
    # rear 2 blocks skipped at steps 0-2, front 2 from step 3; each stage starts with a full step
    ("delta-dit", (("boundary", 3), ("interval", 2), ("num_cached", 2))): [F, [1, 1, 1, 0, 0], F, F,
                                                                           [0, 0, 1, 1, 1], F],
    ("delta-dit", (("boundary", 0), ("interval", 3), ("num_cached", 4))): [F, [0, 0, 0, 0, 1], [0, 0, 0, 0, 1],
                                                                           F, [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)


def make(name, model, **knobs):
    cls = get_method(name)
    return cls(model, make_params(cls, knobs, "test"))


def run_steps(method, inputs):
    """Call `method` once per sampling step on the given (x, t) pairs, as the sampling loop would."""
    log = StepLog(len(inputs[0][0]), np.zeros(len(inputs)), method.model.num_blocks)
    log.set_batch(np.arange(len(inputs[0][0])))
    method.start_batch(log)
    outputs = []
    with torch.no_grad():
        for step, (x, t) in enumerate(inputs):
            log.set_step(step)
            outputs.append(method(x, t, None, context(step, np.zeros(len(inputs)), batch=len(x))))
    return outputs, log


def random_inputs(num_steps, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g))
            for _ in range(num_steps)]


def plain_trace(model, x, t):
    """Block.forward spelled out: per block its input (after the skip fusion), attention and MLP outputs, output."""
    with torch.no_grad():
        tokens = model.embed(x, t)
        trace = {"embed": tokens}
        num_in, skips = len(model.in_blocks), []
        for k, block in enumerate(model.block_list()):
            if k > num_in:
                tokens = block.skip_linear(torch.cat([tokens, skips.pop()], dim=-1))
            trace[k, "in"] = tokens
            trace[k, "attn"] = block.attn(block.norm1(tokens))
            tokens = tokens + trace[k, "attn"]
            trace[k, "mlp"] = block.mlp(block.norm2(tokens))
            tokens = trace[k, "out"] = tokens + trace[k, "mlp"]
            if k < num_in:
                skips.append(tokens)
    return trace


@pytest.mark.parametrize("name, knobs", list(SCHEDULES))
def test_blocks_run_at_each_step_follow_the_schedule(tiny_model, name, knobs):
    _, log = generate(Cell(name, knobs, "ddim", 6, 0), tiny_model, 2, 2)
    expected = np.array(SCHEDULES[name, knobs], dtype=bool)
    for sample in range(2):
        assert np.array_equal(log.blocks_run[sample], expected)
    assert (log.embed_calls == 1).all() and (log.head_calls == 1).all() and (log.exit_point == -1).all()
    reuse_steps = ~expected.all(axis=1)
    if name == "fora":  # only the two out-blocks' skip fusions ran on reuse steps
        skip_macs = 2 * (2 * 32 * 32) * 17
        assert np.array_equal(log.extra_macs[0], np.where(reuse_steps, skip_macs, 0.0))
    else:
        assert (log.extra_macs == 0).all()


@pytest.mark.parametrize("name, knobs", [("deepcache", {"branch": 2}), ("fora", {}),
                                         ("delta-dit", {"boundary": 0, "num_cached": 3}),
                                         ("delta-dit", {"boundary": 5, "num_cached": 3})])
def test_refresh_step_equals_the_full_model(tiny_model, name, knobs):
    inputs = random_inputs(1)
    (eps,), _ = run_steps(make(name, tiny_model, **knobs), inputs)
    with torch.no_grad():
        assert torch.equal(eps, tiny_model(*inputs[0]))


def assert_reuse_matches(model, method, expected_fn):
    """Step 0 refreshes, step 1 reuses: its eps equals `expected_fn(trace of step 0, x1, t1)` and not the full model's."""
    inputs = random_inputs(2)
    (_, eps), log = run_steps(method, inputs)
    assert not log.blocks_run[:, 1].all()  # step 1 did reuse
    x1, t1 = inputs[1]
    with torch.no_grad():
        expected = model.head(expected_fn(plain_trace(model, *inputs[0]), x1, t1))
        assert torch.allclose(eps, expected, atol=1e-5)
        assert not torch.allclose(eps, model(x1, t1), atol=1e-3)


@pytest.mark.parametrize("branch", [1, 2])
def test_deepcache_reuse_step_plugs_the_cached_deep_features_into_the_shallow_blocks(tiny_model, branch):
    def expected(trace0, x1, t1):
        skips = []
        plain_blocks(tiny_model, tiny_model.embed(x1, t1), range(branch), skips)  # fresh D_1..D_m
        deep = trace0[4 - branch, "out"]  # what entered U_m at step 0
        return plain_blocks(tiny_model, deep, range(5 - branch, 5), skips)

    assert_reuse_matches(tiny_model, make("deepcache", tiny_model, branch=branch, interval=2), expected)


def test_fora_reuse_step_adds_the_cached_attention_and_mlp_outputs(tiny_model):
    def expected(trace0, x1, t1):
        tokens, skips = tiny_model.embed(x1, t1), []
        for k, block in enumerate(tiny_model.block_list()):
            if k > 2:  # out-blocks fuse the fresh skip
                tokens = block.skip_linear(torch.cat([tokens, skips.pop()], dim=-1))
            tokens = tokens + trace0[k, "attn"] + trace0[k, "mlp"]
            if k < 2:
                skips.append(tokens)
        return tokens

    assert_reuse_matches(tiny_model, make("fora", tiny_model, interval=2), expected)


@pytest.mark.parametrize("num_cached", [1, 3])
def test_delta_dit_rear_range_adds_its_cached_delta(tiny_model, num_cached):
    start = 5 - num_cached

    def expected(trace0, x1, t1):
        skips = []
        tokens = plain_blocks(tiny_model, tiny_model.embed(x1, t1), range(start), skips)
        range_input0 = trace0[start - 1, "out"]
        return tokens + (trace0[4, "out"] - range_input0)

    method = make("delta-dit", tiny_model, boundary=10, interval=2, num_cached=num_cached)
    assert_reuse_matches(tiny_model, method, expected)


@pytest.mark.parametrize("num_cached", [2, 3, 4])
def test_delta_dit_front_range_rebuilds_the_skips_it_swallows(tiny_model, num_cached):
    def expected(trace0, x1, t1):
        embed1, delta = tiny_model.embed(x1, t1), {k: trace0[k, "out"] - trace0["embed"] for k in range(5)}
        # in-blocks in the range whose out-block runs after it: skip = fresh range input + cached offset
        skips = [embed1 + delta[i] if 4 - i >= num_cached else None for i in range(2)]
        for k in range(3, num_cached):  # out-blocks inside the range pop theirs unused
            skips.pop()
        tokens = embed1 + delta[num_cached - 1]
        return plain_blocks(tiny_model, tokens, range(num_cached, 5), skips)

    method = make("delta-dit", tiny_model, boundary=0, interval=2, num_cached=num_cached)
    assert_reuse_matches(tiny_model, method, expected)


@pytest.mark.parametrize("name, knobs, tensors", [
    ("deepcache", {}, 1), ("fora", {}, 2 * 5),
    ("delta-dit", {"boundary": 0, "num_cached": 2}, 2),   # Δ of the range = skip 1's offset, plus skip 0's
    ("delta-dit", {"boundary": 0, "num_cached": 4}, 2),   # skip 0's offset and the range's Δ
    ("delta-dit", {"boundary": 10, "num_cached": 3}, 1),  # a rear range exports no skips
])
def test_cache_bytes_count_every_tensor_held_across_steps(tiny_model, name, knobs, tensors):
    method = make(name, tiny_model, **knobs)
    run_steps(method, random_inputs(2, batch=3))
    assert method.cache_bytes == tensors * 3 * 17 * 32 * 4  # batch x tokens x width x float32


@pytest.mark.parametrize("name", ["deepcache", "fora", "delta-dit"])
def test_interval_one_equals_full_exactly(tiny_model, name):
    knobs = (("interval", 1), ("num_cached", 3)) if name == "delta-dit" else (("interval", 1),)
    images, log = generate(Cell(name, knobs, "ddim", 5, 0), tiny_model, 3, 3)
    full, _ = generate(Cell("full", (), "ddim", 5, 0), tiny_model, 3, 3)
    assert torch.equal(images, full) and log.blocks_run.all()


CELLS = [Cell("deepcache", (("interval", 2),), "ddim", 5, 0), Cell("fora", (("interval", 2),), "ddim", 5, 0),
         Cell("delta-dit", (("boundary", 2), ("interval", 2), ("num_cached", 2)), "ddim", 5, 0)]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.method)
def test_logged_macs_equal_the_dispatch_count(tiny_model, cell):
    n = 4
    costs = unit_costs(tiny_model)  # measured once before any sampling, as the harness does
    flops = dispatch_flops(lambda: generate(cell, tiny_model, n, 2))
    _, log = generate(cell, tiny_model, n, 2)
    _, full_log = generate(Cell("full", (), "ddim", 5, 0), tiny_model, n, 2)
    assert log.macs_per_image(costs) < 0.9 * full_log.macs_per_image(costs)
    assert log.macs_per_image(costs) == pytest.approx(flops / 2 / n, rel=0.01)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.method)
def test_batch_size_does_not_change_the_images(tiny_model, cell):
    one, _ = generate(cell, tiny_model, 4, 1)
    four, _ = generate(cell, tiny_model, 4, 4)
    assert torch.allclose(one, four, atol=1e-5)


@pytest.mark.parametrize("name, knobs, message", [
    ("deepcache", {"interval": 0}, "interval must be >= 1"),
    ("deepcache", {"branch": 0}, "branch must be >= 1"),
    ("fora", {"interval": -2}, "interval must be >= 1"),
    ("delta-dit", {"interval": 0}, "interval must be >= 1"),
    ("delta-dit", {"boundary": -1}, "boundary must be a sampling-step index >= 0"),
    ("delta-dit", {"num_cached": 0}, "num_cached must be >= 1"),
])
def test_bad_knobs_are_refused_with_one_line(name, knobs, message):
    with pytest.raises(UserError, match=message):
        make_params(get_method(name), knobs, "test")


@pytest.mark.parametrize("name, knobs, message", [
    ("deepcache", (("branch", 3),), r"branch = 3 exceeds the model's 2 in-blocks; pick branch in 1\.\.2"),
    ("delta-dit", (("num_cached", 5),), r"num_cached = 5 leaves none of the model's 5 blocks to run"),
])
def test_knobs_beyond_the_model_are_refused(tiny_model, name, knobs, message):
    cls = get_method(name)
    with pytest.raises(UserError, match=message):
        cls.check(make_params(cls, dict(knobs), "test"), tiny_model, "test")


def test_deepcache_refuses_a_backbone_without_long_skips_in_one_line():
    import dataclasses

    from adadiff_bench.checkpoints import build_model
    no_skips = build_model(dataclasses.replace(TINY, skip=False)).eval()
    assert all(no_skips.skip_partner(i) is None for i in range(no_skips.num_blocks))
    cls = get_method("deepcache")
    with pytest.raises(UserError, match="this backbone has no long skips") as error:
        cls.check(make_params(cls, {}, "test"), no_skips, "methods[1]")
    assert str(error.value).startswith("methods[1]: DeepCache") and "\n" not in str(error.value)
    # the methods that do not need long skips accept it, and still equal the full model on a refresh step
    for name, knobs in (("fora", {}), ("delta-dit", {"boundary": 0, "num_cached": 2})):
        get_method(name).check(make_params(get_method(name), knobs, "test"), no_skips, "test")
        inputs = random_inputs(2)
        (refreshed, _), _ = run_steps(make(name, no_skips, **knobs), inputs)
        with torch.no_grad():
            assert torch.equal(refreshed, no_skips(*inputs[0]))
