"""ASE: the time-dependent drop schedule, the dropped-block forward against a brute-force one, FLOPs,
fine-tuning for the schedule, the shipped checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model, load_model, read_checkpoint
from adadiff_bench.config import TrainFile, UViTConfig
from adadiff_bench.diffusion import alphas_cumprod
from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.registry import baseline_module
from adadiff_bench.steplog import StepLog
from adadiff_bench.training import load_train_config
from conftest import REPO, TINY, context

ase = baseline_module("ase")
AseTrainConfig = ase.AseTrainConfig


def ase_file(**table) -> TrainFile:
    """A training config with an `[ase]` table, as `load_train_config` makes one."""
    return TrainFile(task="ase", task_config=AseTrainConfig(**table))


def make_method(model, checkpoint, **knobs):
    cls = get_method("ase")
    return cls(model, make_params(cls, {"checkpoint": str(checkpoint), **knobs}, "test"))


def run_step(method, x, t):
    log = StepLog(len(x), np.zeros(1), method.net.num_blocks)
    log.set_batch(np.arange(len(x)))
    log.set_step(0)
    method.start_batch(log)
    with torch.no_grad():
        return method(x, t, None, context(0, batch=len(x))), log


def brute_force(model, x, t, n_drop):
    """One sample at a time, the U-ViT forward written out with ASE's U-ViT rule: the last out-blocks dropped
    but still fusing their skip, then the mid-block, then the deepest in-blocks with their pairs."""
    num_in = len(model.in_blocks)
    outputs = []
    with torch.no_grad():
        for i in range(len(x)):
            n = int(n_drop[i])
            in_kept, out_kept = num_in - max(0, n - num_in - 1), num_in - min(n, num_in)
            h = model.embed(x[i:i + 1], t[i:i + 1])
            skips = []
            for k, block in enumerate(model.in_blocks):
                h = block(h) if k < in_kept else h
                skips.append(h if k < in_kept else None)
            if n <= num_in:
                h = model.mid_block(h)
            for j, block in enumerate(model.out_blocks):
                skip = skips[num_in - 1 - j]
                if j < out_kept:
                    h = block(h, skip)
                elif skip is not None:
                    h = block.skip_linear(torch.cat([h, skip], dim=-1))
            outputs.append(model.head(h))
    return torch.cat(outputs)


@pytest.mark.parametrize("num_in", [2, 6])
def test_schedule_drops_more_blocks_at_noisier_steps_and_higher_strength(num_in):
    num_blocks = 2 * num_in + 1
    t = torch.arange(1000)
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    counts = torch.stack([ase.drop_counts(t, s, num_blocks) for s in strengths])
    assert (counts[0] == 0).all()                       # strength 0 = the full network
    assert (counts[:, 1:] >= counts[:, :-1]).all()      # never fewer drops at larger t
    assert (counts[1:] >= counts[:-1]).all()            # never fewer drops at higher strength
    assert (counts[:, :100] == 0).all()                 # the least noisy bucket runs everything
    assert counts[2].max() == num_in                    # 0.5: up to every out-block (the paper's range)
    assert counts[4].max() == counts[5].max() == num_blocks - 1
    model = build_model(UViTConfig(img_size=4, patch_size=2, embed_dim=8, depth=2 * num_in, num_heads=1))
    plans = [ase.drop_plan(n, model) for n in range(num_blocks)]
    runs = np.array([plan.runs for plan in plans])
    assert (runs.sum(1) == num_blocks - np.arange(num_blocks)).all()
    assert (runs[1:] <= runs[:-1]).all() and runs[:, 0].all()  # nested; the first in-block always runs


def test_drop_plan_on_u_vit_keeps_the_skip_fusion_of_dropped_out_blocks():
    # 13 blocks: in 0-5, mid 6, out 7-12 (out-block 12 pops in-block 0's skip)
    shape = dict(img_size=4, patch_size=2, embed_dim=8, depth=12, num_heads=1)
    model = build_model(UViTConfig(**shape))
    two = ase.drop_plan(2, model)
    assert two.runs == (True,) * 11 + (False, False) and two.fuses == (False,) * 11 + (True, True)
    eight = ase.drop_plan(8, model)  # all out-blocks, the mid-block and the deepest in-block (5) dropped
    assert eight.runs == (True,) * 5 + (False,) * 8
    assert eight.fuses == (False,) * 8 + (True,) * 5  # out-block 7 pairs with the dropped in-block 5
    assert ase.drop_plan(0, model) == ase.DropPlan((True,) * 13, (False,) * 13)
    # a backbone without long skips (no skip_linear) has nothing to fuse
    assert ase.drop_plan(3, build_model(UViTConfig(**shape, skip=False))).fuses == (False,) * 13


def test_dropped_block_forward_equals_brute_force_per_sample(tiny_model, tiny_checkpoint):
    method = make_method(tiny_model, tiny_checkpoint, strength=1.0)
    t = torch.tensor([999, 50, 950, 450, 650, 250, 850, 550, 750, 999])
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps, log = run_step(method, x, t)
    n_drop = ase.drop_counts(t, 1.0, tiny_model.num_blocks)
    assert set(n_drop.tolist()) == set(range(tiny_model.num_blocks))  # every drop count is exercised
    assert torch.allclose(eps, brute_force(tiny_model, x, t, n_drop), atol=1e-5)
    expected_runs = np.array([ase.drop_plan(int(n), tiny_model).runs for n in n_drop])
    assert (log.blocks_run[:, 0] == expected_runs).all()
    assert (log.exit_point == -1).all() and (log.embed_calls == 1).all() and (log.head_calls == 1).all()
    # strength 0 is the plain U-ViT forward
    assert torch.allclose(run_step(make_method(tiny_model, tiny_checkpoint, strength=0.0), x, t)[0],
                          tiny_model(x, t), atol=1e-6)


def test_step_log_flops_match_the_dispatcher_and_batch_size_changes_nothing(tiny_model, tiny_checkpoint):
    cell = Cell("ase", (("checkpoint", str(tiny_checkpoint)), ("strength", 1.0)), "ddim", 5, 0)
    n = 4
    images, log = generate(cell, tiny_model, n, 2)  # first: loads the checkpoint and measures its unit costs (fvcore)
    flops = dispatch_flops(lambda: generate(cell, tiny_model, n, 2))
    costs = unit_costs(tiny_model)
    assert log.macs_per_image(costs) == pytest.approx(flops / 2 / n, rel=0.01)
    assert (log.extra_macs > 0).any()  # the skip fusions of dropped out-blocks are counted
    per_step = log.blocks_run.sum(2)[0]  # ddim 5 steps visit t = 999, 799, 599, 399, 199
    assert per_step.tolist() == [1, 2, 3, 4, 5] and log.layer_ratio() == pytest.approx(15 / 25)
    one_by_one, single = generate(cell, tiny_model, n, 1)
    assert torch.allclose(images, one_by_one, atol=1e-5) and (single.blocks_run == log.blocks_run).all()


def test_fine_tuning_trains_only_what_the_schedule_runs(tiny_model, tiny_checkpoint):
    config = ase_file(base_checkpoint=str(tiny_checkpoint), strengths=[1.0])
    task = ase.training_task(config, alphas_cumprod())
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    loss = task.loss(x0, None, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.requires_grad
    # at the noisiest bucket, strength 1 runs only in-block 1 and the last out-block's skip fusion
    model = task.model
    t = torch.full((4,), 999)
    eps = ase.ase_forward(model, x0[:4], t, None, ase.drop_counts(t, 1.0, model.num_blocks))
    eps.pow(2).mean().backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.in_blocks[0]) and has_grad(model.out_blocks[-1].skip_linear)
    assert not any(has_grad(m) for m in (model.in_blocks[1], model.mid_block, model.out_blocks[0]))
    assert not has_grad(model.out_blocks[-1].attn) and not has_grad(model.out_blocks[0].skip_linear)


def test_ase_table_trains_and_exports_a_loadable_half_precision_checkpoint(tmp_path, tiny_checkpoint):
    from adadiff_bench.training import train
    toml = tmp_path / "ase.toml"
    toml.write_text(f'[ase]\nbase_checkpoint = "{tiny_checkpoint}"\nstrengths = [0.5, 1.0]\n\n[train]\nsteps = 2\n'
                    f'batch_size = 8\nwarmup_steps = 1\nthreads = 1\nout_dir = "{tmp_path / "out"}"\n'
                    f'export = "{tmp_path / "ase.pt"}"\n')
    train(load_train_config(toml), progress=False)
    payload = read_checkpoint(tmp_path / "ase.pt")
    assert payload["state_dict"]["pos_embed"].dtype == torch.float16
    assert payload["meta"]["ase_strengths"] == [0.5, 1.0]
    assert load_model(tmp_path / "ase.pt").num_blocks == TINY.depth + 1


def test_knobs_are_validated(tmp_path, tiny_model, tiny_checkpoint):
    cls = get_method("ase")
    with pytest.raises(UserError, match="strength must be a number >= 0"):
        make_params(cls, {"strength": -0.5}, "test")
    with pytest.raises(UserError, match="not found"):
        make_params(cls, {"checkpoint": str(tmp_path / "missing.pt")}, "test")
    empty = tmp_path / "empty.toml"  # the [ase] table is validated when the training config is read
    empty.write_text(f'[ase]\nbase_checkpoint = "{tiny_checkpoint}"\nstrengths = []\n')
    with pytest.raises(UserError, match=r"\[ase\]: strengths must list numbers >= 0") as error:
        load_train_config(empty)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"strengths must list numbers >= 0"):
        AseTrainConfig(base_checkpoint=str(tiny_checkpoint), strengths=[-1.0]).validate("[ase]")
    digits = load_model(REPO / "checkpoints" / "uvit_digits.pt")
    with pytest.raises(UserError, match="not a fine-tune of the run's backbone"):
        cls.check(make_params(cls, {"checkpoint": str(tiny_checkpoint)}, "test"), digits, "test")


def test_shipped_checkpoint_fine_tunes_the_digits_model_and_is_the_default(monkeypatch):
    monkeypatch.chdir(REPO)
    path = REPO / ase.DEFAULT_CHECKPOINT
    assert path.stat().st_size < 8 * 2 ** 20
    assert read_checkpoint(path)["state_dict"]["pos_embed"].dtype == torch.float16
    digits = load_model(REPO / "checkpoints" / "uvit_digits.pt")
    cls = get_method("ase")
    params = make_params(cls, {}, "test")
    assert params.checkpoint == ase.DEFAULT_CHECKPOINT
    cls.check(params, digits, "test")  # same architecture as the base model
    assert load_model(path).num_blocks == 13
