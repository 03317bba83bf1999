"""Step-skipping and caching baselines: decision rules, exact reuse, real costs, batch independence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.diffusion import solver_timesteps
from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.steplog import StepLog
from conftest import context, plain_blocks

SOLVER, STEPS = "dpm-solver++", 10
# settings that skip or reuse some steps of the tiny random model's sampling runs
IN_SAMPLING = {"adaptive-diffusion": {"threshold": 0.2, "max_skips": 2},
               "teacache": {"threshold": 1.0},
               "first-block-cache": {"threshold": 0.15}}
# settings that split a batch of `drifting_inputs` (the tiny model's own trajectories are too alike)
ON_DRIFT = {"adaptive-diffusion": {"threshold": 0.1, "max_skips": 2},
            "teacache": {"threshold": 0.2},
            "first-block-cache": {"threshold": 0.3}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)


def cell(name: str, knobs: dict | None = None) -> Cell:
    return Cell(name, tuple(sorted((knobs or {}).items())), SOLVER, STEPS, 0)


def knobbed(model, name: str, knobs: dict):
    cls = get_method(name)
    return cls(model, make_params(cls, knobs, "test"))


class Recorder:
    """Wraps a method and keeps every step's (x, t, eps)."""

    def __init__(self, method):
        self.method, self.model, self.calls = method, method.model, []

    def start_batch(self, log):
        self.method.start_batch(log)

    def __call__(self, x, t, y, ctx):
        eps = self.method(x, t, y, ctx)
        self.calls.append((x.clone(), t.clone(), eps.clone()))
        return eps


def feed(method, inputs: torch.Tensor) -> StepLog:
    """Feed `inputs` (step, sample, C, H, W) as the model inputs of consecutive solver steps."""
    num_steps, batch = inputs.shape[:2]
    timesteps = solver_timesteps(SOLVER, num_steps)
    log = StepLog(batch, timesteps, method.model.num_blocks)
    log.set_batch(np.arange(batch))
    method.start_batch(log)
    with torch.no_grad():
        for step in range(num_steps):
            log.set_step(step)
            t = torch.full((batch,), float(timesteps[step]))
            method(inputs[step], t, None, context(step, timesteps, batch=batch))
    return log


def drifting_inputs() -> torch.Tensor:
    """x_k = n_0 + c k^p n_1 for three samples: a slow and a faster straight drift, and a cubic one."""
    n_0, n_1 = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    c, p = torch.tensor([0.01, 0.1, 0.01]).view(3, 1, 1, 1), torch.tensor([1.0, 1.0, 3.0]).view(3, 1, 1, 1)
    return torch.stack([n_0 + c * k ** p * n_1 for k in range(STEPS)])


def computed(log: StepLog) -> np.ndarray:
    """(sample, step): did the last block run, i.e. did the network (or the cached part of it) run?"""
    return log.blocks_run[:, :, -1]


def split_batch(ran: np.ndarray) -> bool:
    """Some step had samples that computed and samples that reused in the same batch."""
    return any(ran[:, s].any() and not ran[:, s].all() for s in range(ran.shape[1]))


def last_computed_step(ran: np.ndarray, row: int, step: int) -> int:
    return int(np.flatnonzero(ran[row, :step + 1])[-1])


def run_blocks(model, tokens, first=0, skips=None):
    """U-ViT blocks first..N on `tokens` (`skips`: long skips of the blocks before `first`), plain block calls."""
    return plain_blocks(model, tokens, range(first, len(model.block_list())), [] if skips is None else list(skips))


# ---- AdaptiveDiffusion's rule on constructed latents ---------------------------------------------

def expected_runs(first_skip: int, max_skips: int, num_steps: int) -> list[bool]:
    """Skippable from step `first_skip` on, at most `max_skips` skipped steps in a row."""
    runs, in_a_row = [], 0
    for step in range(num_steps):
        skip = step >= first_skip and in_a_row < max_skips
        in_a_row = in_a_row + 1 if skip else 0
        runs.append(not skip)
    return runs


@pytest.mark.parametrize("estimator, first_cubic_skip", [("paper", 6), ("official", 5)])
def test_third_order_estimator_skips_exactly_where_expected(tiny_model, estimator, first_cubic_skip):
    # sample 0, x_k = k^2: no third difference, so it skips from step 4 (the first decision) when the cap allows.
    # sample 1, x_k = k^3: paper: ||D^3 x|| = 6 < 0.1 ||x_{k-1} - x_{k-2}|| = 0.1 (3k^2 - 9k + 7) from k = 6;
    #                      official: |d_k - 2 d_{k-1} + d_{k-2}| / 2 = 3 < 0.1 (3k^2 - 9k + 7) from k = 5.
    k = torch.arange(12, dtype=torch.float32)
    latents = torch.stack([k ** 2, k ** 3], 1).view(12, 2, 1, 1, 1).expand(12, 2, 1, 8, 8).contiguous()
    method = knobbed(tiny_model, "adaptive-diffusion", {"threshold": 0.1, "max_skips": 2, "estimator": estimator})
    ran = computed(feed(method, latents))
    assert ran[0].tolist() == [True] * 4 + [False, False, True] * 2 + [False, False]
    assert ran[0].tolist() == expected_runs(4, 2, 12)
    assert ran[1].tolist() == expected_runs(first_cubic_skip, 2, 12)


@pytest.mark.parametrize("max_skips", [1, 3])
def test_max_skips_caps_consecutive_skips(tiny_model, max_skips):
    line = torch.arange(15.0).view(15, 1, 1, 1, 1).expand(15, 1, 1, 8, 8)  # no third difference: always skippable
    method = knobbed(tiny_model, "adaptive-diffusion", {"threshold": 0.5, "max_skips": max_skips})
    assert computed(feed(method, line))[0].tolist() == expected_runs(4, max_skips, 15)


# ---- threshold 0 is the full network; reuse equals a brute-force recomputation ------------------

@pytest.mark.parametrize("name", ["solver-steps", "adaptive-diffusion", "teacache", "first-block-cache"])
def test_threshold_zero_equals_full_exactly(tiny_model, name):
    knobs = {} if name == "solver-steps" else {"threshold": 0.0}
    images, log = generate(cell(name, knobs), tiny_model, 4, 4)
    reference, full_log = generate(cell("full"), tiny_model, 4, 4)
    assert torch.equal(images, reference)
    for field in ("blocks_run", "exit_point", "embed_calls", "head_calls"):
        assert np.array_equal(getattr(log, field), getattr(full_log, field))


@torch.no_grad()
def test_adaptive_diffusion_reuses_each_samples_last_computed_eps(tiny_model):
    method = Recorder(knobbed(tiny_model, "adaptive-diffusion", ON_DRIFT["adaptive-diffusion"]))
    ran = computed(feed(method, drifting_inputs()))
    assert split_batch(ran)
    for step, (x, t, eps) in enumerate(method.calls):
        for row in range(len(x)):
            x_s, t_s, _ = method.calls[last_computed_step(ran, row, step)]
            assert torch.allclose(eps[row], tiny_model(x_s[row:row + 1], t_s[row:row + 1])[0], atol=1e-5)


@torch.no_grad()
def test_teacache_decisions_and_reuse_match_brute_force(tiny_model):
    threshold = ON_DRIFT["teacache"]["threshold"]
    method = Recorder(knobbed(tiny_model, "teacache", ON_DRIFT["teacache"]))
    ran = computed(feed(method, drifting_inputs()))
    assert split_batch(ran)
    embedded = [tiny_model.embed(x, t) for x, t, _ in method.calls]
    for row in range(ran.shape[0]):
        accumulated = 0.0
        for step, (_, _, eps) in enumerate(method.calls):
            if 0 < step < STEPS - 1:  # the first and the last step always compute
                now, before = embedded[step][row], embedded[step - 1][row]
                accumulated += float((now - before).abs().mean() / before.abs().mean())
                assert ran[row, step] == (accumulated >= threshold)
            assert ran[row, step] or 0 < step < STEPS - 1
            accumulated = 0.0 if ran[row, step] else accumulated
            tokens_s = embedded[last_computed_step(ran, row, step)][row:row + 1]
            residual = run_blocks(tiny_model, tokens_s) - tokens_s
            assert torch.allclose(eps[row], tiny_model.head(embedded[step][row:row + 1] + residual)[0], atol=1e-5)


@torch.no_grad()
def test_first_block_cache_decisions_and_reuse_match_brute_force(tiny_model):
    threshold = ON_DRIFT["first-block-cache"]["threshold"]
    method = Recorder(knobbed(tiny_model, "first-block-cache", ON_DRIFT["first-block-cache"]))
    log = feed(method, drifting_inputs())
    ran = computed(log)
    assert split_batch(ran) and log.blocks_run[:, :, 0].all() and (log.head_calls == 1).all()
    for row in range(ran.shape[0]):
        def first_block(step):  # (output, residual) of the first block for this sample
            x, t, _ = method.calls[step]
            tokens = tiny_model.embed(x[row:row + 1], t[row:row + 1])
            output = tiny_model.in_blocks[0](tokens)
            return output, output - tokens
        for step, (_, _, eps) in enumerate(method.calls):
            output, residual = first_block(step)
            if step > 0:
                reference = first_block(last_computed_step(ran, row, step - 1))[1]
                change = float((residual - reference).abs().mean() / reference.abs().mean())
                assert ran[row, step] == (change >= threshold)
            output_s = first_block(last_computed_step(ran, row, step))[0]
            cached = run_blocks(tiny_model, output_s, first=1, skips=[output_s]) - output_s
            assert torch.allclose(eps[row], tiny_model.head(output + cached)[0], atol=1e-5)


# ---- per-sample decisions, costs, determinism, cache sizes, knobs --------------------------------

@pytest.mark.parametrize("name", list(ON_DRIFT))
def test_a_samples_decisions_and_eps_do_not_depend_on_its_batch(tiny_model, name):
    inputs = drifting_inputs()
    together = Recorder(knobbed(tiny_model, name, ON_DRIFT[name]))
    ran = computed(feed(together, inputs))
    assert split_batch(ran)
    for row in range(inputs.shape[1]):
        alone = Recorder(knobbed(tiny_model, name, ON_DRIFT[name]))
        assert computed(feed(alone, inputs[:, row:row + 1]))[0].tolist() == ran[row].tolist()
        for (_, _, eps), (_, _, eps_alone) in zip(together.calls, alone.calls):
            assert torch.allclose(eps[row], eps_alone[0], atol=1e-5)


@pytest.mark.parametrize("name", list(IN_SAMPLING))
def test_logged_macs_match_the_dispatch_count(tiny_model, name):
    costs = unit_costs(tiny_model)
    logs = []  # a short sampling run (batches of 3), and drifting inputs that split a batch
    flops = dispatch_flops(lambda: logs.append(generate(cell(name, IN_SAMPLING[name]), tiny_model, 6, 3)[1]))
    assert 0 < logs[0].layer_ratio() < 1
    assert logs[0].macs_per_image(costs) == pytest.approx(flops / 2 / 6, rel=0.01)
    flops = dispatch_flops(lambda: logs.append(feed(knobbed(tiny_model, name, ON_DRIFT[name]), drifting_inputs())))
    assert split_batch(computed(logs[1]))
    assert logs[1].macs_per_image(costs) == pytest.approx(flops / 2 / 3, rel=0.01)


@pytest.mark.parametrize("name", list(IN_SAMPLING))
def test_batch_size_does_not_change_images_and_runs_are_deterministic(tiny_model, name):
    one_by_one, log_1 = generate(cell(name, IN_SAMPLING[name]), tiny_model, 4, 1)
    batched, log_4 = generate(cell(name, IN_SAMPLING[name]), tiny_model, 4, 4)
    again, _ = generate(cell(name, IN_SAMPLING[name]), tiny_model, 4, 4)
    assert torch.allclose(one_by_one, batched, atol=1e-5)
    assert np.array_equal(log_1.blocks_run, log_4.blocks_run) and log_4.layer_ratio() < 1
    assert torch.equal(batched, again)


@pytest.mark.parametrize("name, bytes_per_sample", [
    ("adaptive-diffusion", 5 * 64 * 4),      # four latents and one eps, 1x8x8 float32
    ("teacache", 2 * 17 * 32 * 4),           # previous input and residual, 17 tokens x 32
    ("first-block-cache", 2 * 17 * 32 * 4),  # first-block residual and remaining-stack residual
])
def test_cache_bytes_report_what_is_held(tiny_model, name, bytes_per_sample):
    method = knobbed(tiny_model, name, IN_SAMPLING[name])
    generate(cell(name, IN_SAMPLING[name]), tiny_model, 6, 3, method=method)
    assert method.cache_bytes == 3 * bytes_per_sample


@pytest.mark.parametrize("name, knobs, message", [
    ("adaptive-diffusion", {"threshold": -0.1}, "threshold must be a number >= 0"),
    ("adaptive-diffusion", {"threshold": float("nan")}, "threshold must be a number >= 0"),
    ("adaptive-diffusion", {"max_skips": 0}, "max_skips must be >= 1"),
    ("adaptive-diffusion", {"estimator": "third"}, "estimator must be 'paper' or 'official'"),
    ("teacache", {"threshold": -1}, "threshold must be a number >= 0"),
    ("teacache", {"rescale": "1.0,abc"}, "rescale must list polynomial coefficients"),
    ("first-block-cache", {"threshold": float("inf")}, "threshold must be a number >= 0"),
    ("first-block-cache", {"treshold": 0.1}, "did you mean 'threshold'"),
    ("solver-steps", {"num_steps": 10}, "unknown key 'num_steps'"),
])
def test_bad_knobs_are_refused_with_one_line(name, knobs, message):
    with pytest.raises(UserError, match=message) as error:
        make_params(get_method(name), knobs, "methods[0]")
    assert "\n" not in str(error.value)


def test_teacache_rescale_polynomial_is_applied(tiny_model):
    # rescale "2,0" doubles every distance: the decisions of half the threshold without rescaling
    inputs, threshold = drifting_inputs(), ON_DRIFT["teacache"]["threshold"]
    doubled = feed(knobbed(tiny_model, "teacache", {"threshold": threshold, "rescale": "2,0"}), inputs)
    halved = feed(knobbed(tiny_model, "teacache", {"threshold": threshold / 2}), inputs)
    plain = feed(knobbed(tiny_model, "teacache", {"threshold": threshold}), inputs)
    assert np.array_equal(doubled.blocks_run, halved.blocks_run)
    assert not np.array_equal(doubled.blocks_run, plain.blocks_run)
