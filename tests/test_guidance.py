"""Classifier-free guidance: one weight w, U-ViT's s = w - 1, a null label (or null context), both passes logged
and counted."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model
from adadiff_bench.diffusion import sample
from adadiff_bench.errors import UserError
from adadiff_bench.flops import unit_costs
from adadiff_bench.guidance import check_guidance, guided, label_classes, null_condition, null_context, null_label
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.methods import get_method
from conftest import TINY

NUM_CLASSES = 1001  # ImageNet's embedding: 1000 classes and the null label 1000
W = 1.4             # U-ViT's ImageNet scale s = 0.4


@pytest.fixture
def imagenet_like():
    """A tiny U-ViT with ImageNet's 1001-row label embedding."""
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY, num_classes=NUM_CLASSES)).eval()


def uvit_cfg(model, s: float):
    """U-ViT's own combination, written as in its evaluation scripts' terms: eps_c + s (eps_c - eps_u),
    with the null label 1000 in the unconditional call."""
    def denoiser(x, t, y, ctx):
        eps_c = model(x, t, y)
        eps_u = model(x, t, torch.full_like(y, 1000))
        return eps_c + s * (eps_c - eps_u)
    return denoiser


def test_guided_equals_two_explicit_passes_with_uvits_formula(imagenet_like):
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 999.0]), torch.tensor([0, 7, 999])
    plain = lambda x, t, y, ctx: imagenet_like(x, t, y)  # noqa: E731
    ours = guided(plain, plain, W, null_condition(imagenet_like))(x, t, y, None)
    assert torch.allclose(ours, uvit_cfg(imagenet_like, W - 1)(x, t, y, None), atol=1e-6)
    assert not torch.allclose(ours, imagenet_like(x, t, y), atol=1e-4)  # guidance changes eps


def test_the_null_label_is_1000_and_never_drawn(imagenet_like):
    seen = []

    def recording(x, t, y, ctx):
        seen.append(y.clone())
        return imagenet_like(x, t, y)
    sample(guided(recording, recording, W, null_condition(imagenet_like)), "ddim", 3, (1, 8, 8), range(64), seed=0,
           num_classes=label_classes(imagenet_like, W))
    conditional, unconditional = torch.stack(seen[0::2]), torch.stack(seen[1::2])
    assert (unconditional == 1000).all()
    assert conditional.max() < 1000 and len(conditional[0].unique()) > 10
    assert label_classes(imagenet_like, 1.0) == NUM_CLASSES  # without guidance: today's draw, unchanged
    imagenet_like.null_label = 1000  # a model that names its null label never draws it, guided or not
    assert label_classes(imagenet_like, 1.0) == label_classes(imagenet_like, W) == 1000
    assert (null_condition(imagenet_like)(torch.tensor([3, 5])) == 1000).all()


def test_harness_guidance_matches_uvits_sampler(imagenet_like):
    """generate() under guidance = the same sampling loop with U-ViT's two calls per step written out."""
    cell = Cell("full", (), "dpm-solver++", 4, seed=2, guidance=W)
    images, log = generate(cell, imagenet_like, 6, 4)
    reference = torch.cat([sample(uvit_cfg(imagenet_like, W - 1), "dpm-solver++", 4, (1, 8, 8), rows, seed=2,
                                  num_classes=1000) for rows in (range(0, 4), range(4, 6))])
    assert torch.allclose(images, reference, atol=1e-5)
    unguided, _ = generate(dataclasses.replace(cell, guidance=1.0), imagenet_like, 6, 4)
    assert not torch.allclose(images, unguided, atol=1e-3)


def test_both_passes_are_logged_and_counted(imagenet_like):
    cell = Cell("full", (), "ddim", 3, seed=0, guidance=W)
    _, log = generate(cell, imagenet_like, 5, 5)
    _, single = generate(dataclasses.replace(cell, guidance=1.0), imagenet_like, 5, 5)
    costs = unit_costs(imagenet_like)
    assert single.unconditional is None and single.guidance_pass == "single"
    assert log.guidance_pass == "conditional" and log.unconditional.guidance_pass == "unconditional"
    assert log.unconditional.blocks_run.all() and log.blocks_run.all()
    assert log.macs_per_image(costs) == pytest.approx(2 * single.macs_per_image(costs))
    assert log.macs_per_image(costs) == pytest.approx(2 * 3 * costs.full)
    summaries = log.summaries()
    assert np.array_equal(summaries["unconditional_timestep_exit_histogram"],
                          log.unconditional.timestep_exit_histogram())
    assert "unconditional_timestep_exit_histogram" not in single.summaries()


def test_step_log_rows_carry_both_passes(imagenet_like):
    _, log = generate(Cell("static-exit", (("k", 2),), "ddim", 3, seed=0, guidance=W), imagenet_like, 4, 4)
    records = log.rows(np.arange(4))
    assert any(k.startswith("unconditional/") for k in records)
    _, fresh = generate(Cell("full", (), "ddim", 3, seed=0, guidance=W), imagenet_like, 4, 4)
    fresh.set_rows(np.arange(4), records)
    assert np.array_equal(fresh.unconditional.exit_point, log.unconditional.exit_point)
    assert (fresh.unconditional.exit_point == 2).all()


def test_each_pass_keeps_its_own_cache(imagenet_like):
    """DeepCache under guidance: the unconditional pass reuses its own deep features, never the conditional
    pass's (a single method object for both passes would mix them)."""
    cell = Cell("deepcache", (("interval", 2),), "ddim", 4, seed=1, guidance=W)
    images, log = generate(cell, imagenet_like, 4, 4)

    def two_objects_by_hand(rows):
        conditional, unconditional = (build_method(cell, imagenet_like) for _ in range(2))
        return sample_with(conditional, unconditional, rows)

    def sample_with(conditional, unconditional, rows):
        from adadiff_bench.steplog import StepLog
        from adadiff_bench.diffusion import solver_timesteps
        logs = [StepLog(4, solver_timesteps("ddim", 4), imagenet_like.num_blocks) for _ in range(2)]
        for method, step_log in zip((conditional, unconditional), logs):
            step_log.set_batch(np.asarray(rows))
            method.start_batch(step_log)

        def on_step(ctx):
            for step_log in logs:
                step_log.set_step(ctx.step)
        return sample(guided(conditional, unconditional, W, null_label(1000)), "ddim", 4, (1, 8, 8), rows, seed=1,
                      num_classes=1000, on_step=on_step)

    assert torch.allclose(images, two_objects_by_hand(range(4)), atol=1e-6)
    shared = build_method(cell, imagenet_like)
    assert not torch.allclose(images, sample_with(shared, shared, range(4)), atol=1e-4)
    assert not log.unconditional.blocks_run.all()  # the cache really skipped blocks in the second pass


def test_null_context_for_text_conditioning():
    empty_prompt = torch.randn(77, 16)
    contexts = torch.randn(3, 77, 16)
    null = null_context(empty_prompt)
    assert torch.equal(null(contexts), empty_prompt.expand(3, 77, 16))

    class TextNet(torch.nn.Module):
        null_context = empty_prompt
        num_classes = -1
    assert torch.equal(null_condition(TextNet())(contexts), empty_prompt.expand(3, 77, 16))
    seen = []
    denoiser = guided(lambda x, t, c, ctx: seen.append(c) or x * c.mean(), lambda x, t, c, ctx: seen.append(c) or x,
                      2.0, null)
    x = torch.ones(3, 1, 2, 2)
    out = denoiser(x, torch.zeros(3), contexts, None)
    assert torch.equal(seen[0], contexts) and torch.equal(seen[1], empty_prompt.expand(3, 77, 16))
    assert torch.allclose(out, x + 2.0 * (x * contexts.mean() - x))
    check_guidance(2.0, TextNet(), "config")  # a null context is enough


def test_guidance_needs_a_null_condition(tiny_model):
    with pytest.raises(UserError, match="guidance = 1.4 needs a conditional model"):
        check_guidance(W, tiny_model, "config")
    check_guidance(1.0, tiny_model, "config")


def test_guidance_below_one_is_refused(tmp_path, tiny_checkpoint):
    from adadiff_bench.config import load_run_config
    from conftest import write_run_config
    path = write_run_config(tmp_path, tiny_checkpoint, sampling='solver = "ddim"\nguidance = 0.4')
    with pytest.raises(UserError, match="guidance must be >= 1 .*U-ViT's scale s is guidance - 1"):
        load_run_config(path)
    path = write_run_config(tmp_path, tiny_checkpoint, sampling='solver = "ddim"\nschedule = "vp"')
    with pytest.raises(UserError, match="solver 'ddim' does not run schedule 'vp'; with this schedule use one of "
                                        "euler-maruyama"):
        load_run_config(path)
    assert get_method("full")  # (the registry is loaded for the harness tests above)


def test_a_guided_vp_run_records_its_schedule_and_both_passes(tmp_path):
    """End to end: a class-conditional tiny model (10 digits + the null label) on the continuous VP schedule with
    Euler-Maruyama and guidance; each row says which schedule and weight it ran, FLOPs count both passes."""
    import json

    import pandas as pd

    from adadiff_bench.checkpoints import save_checkpoint
    from adadiff_bench.cli import main
    from conftest import write_run_config
    config = dataclasses.replace(TINY, num_classes=11)
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_checkpoint(tmp_path / "cond.pt", model, config)
    sampling = 'solver = "euler-maruyama"\nschedule = "vp"\nguidance = 1.4\nnum_samples = 16\nbatch_size = 16'
    path = write_run_config(tmp_path, tmp_path / "cond.pt", sampling=sampling, timing="enabled = false")
    assert main(["run", "--config", str(path), "--no-progress"]) == 0
    run_dir = tmp_path / "results" / "tiny"
    frame = pd.read_csv(run_dir / "results.csv")
    assert (frame["schedule"] == "vp").all() and (frame["guidance"] == 1.4).all()
    full_macs = unit_costs(model).full
    assert np.allclose(frame["macs_per_image"], 2 * frame["num_steps"] * full_macs)  # two passes per step
    run = json.loads((run_dir / "run.json").read_text())
    assert run["solvers"]["euler-maruyama"]["end_time"] == 1e-3
