"""BERxiT: the exit rule with hand-set regressors, real exits vs brute force, the LTE loss, checkpoints
tied to their backbone's sha256, training through the CLI, FLOPs vs dispatch count."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adadiff_bench.checkpoints import build_model, save_checkpoint, sha256_file
from adadiff_bench.config import UViTConfig
from adadiff_bench.diffusion import add_noise, alphas_cumprod
from adadiff_bench.errors import UserError
from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.registry import baseline_module
from adadiff_bench.steplog import StepLog
from conftest import REPO, TINY, context, plain_hidden_states

berxit = baseline_module("berxit")
D = TINY.embed_dim


def save_regressor(tmp_path, backbone_path, weight, bias, name="berxit.pt"):
    """A BERxiT checkpoint with hand-set weights w, b on the given backbone checkpoint."""
    lte = berxit.LearningToExit(D, extras=1)
    with torch.no_grad():
        lte.linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).view(1, D))
        lte.linear.bias.fill_(bias)
    path = tmp_path / name
    berxit.save_berxit(path, lte, str(backbone_path), sha256_file(backbone_path))
    return path


def make_method(model, path, tau):
    cls = get_method("berxit")
    return cls(model, make_params(cls, {"checkpoint": str(path), "tau": tau}, "test"))


def start(method, batch, num_steps=1):
    log = StepLog(batch, np.zeros(num_steps), method.backbone.num_blocks)
    log.set_batch(np.arange(batch))
    log.set_step(0)
    method.start_batch(log)
    return log


def test_policy_exits_exactly_where_the_predicted_error_is_within_tau(tmp_path, tiny_model, tiny_checkpoint):
    weight = torch.zeros(D)
    weight[0] = 1.0  # u = sigmoid(mean of feature 0 over the patch tokens), so predicted error = softplus(z)
    method = make_method(tiny_model, save_regressor(tmp_path, tiny_checkpoint, weight, 0.0), tau=math.log(2.0))
    z = torch.tensor([-3.0, 1.0, -0.2, 0.2, -1.0, 3.0])
    tokens = torch.randn(len(z), 17, D)
    tokens[:, 1:, 0] = z[:, None]   # every patch token carries z in feature 0
    tokens[:, 0, 0] = 1000.0        # the time token is not pooled
    log = start(method, len(z))
    active = torch.arange(len(z))
    exiting = method.policy(1, tokens, None, torch.zeros(len(z)), active)
    assert exiting.tolist() == (F.softplus(z) <= math.log(2.0)).tolist() == (z < 0).tolist()
    assert (log.extra_macs[:, 0] == D).all()  # the regressor's cost, per sample and call
    # ... and that is what runs: one (B x D) @ (D x 1) product
    assert dispatch_flops(lambda: method.policy(1, tokens, None, torch.zeros(len(z)), active)) == 2 * D * len(z)


def brute_force(method, x, t):
    """Every exit's eps and the hand computation of its predicted error, all blocks run for every sample."""
    backbone, w, b = method.backbone, method.lte.linear.weight[0], method.lte.linear.bias[0]
    predictions, errors = [], []
    with torch.no_grad():
        for tokens in plain_hidden_states(backbone, x, t):
            predictions.append(backbone.head(tokens))
            errors.append(F.softplus(tokens[:, 1:].mean(1) @ w + b))  # -log(1 - sigmoid(a)) = softplus(a)
    return torch.stack(predictions, 1), torch.stack(errors, 1)


def first_exit(errors, tau):
    passing = errors <= tau
    passing[:, -1] = True
    return passing.float().argmax(1) + 1


def spreading_tau(errors):
    """A tau halfway between two predicted errors that spreads samples over the most exit points."""
    values = errors[:, :-1].flatten().sort().values
    candidates = ((values[1:] + values[:-1]) / 2).tolist()
    return max(candidates, key=lambda tau: len(set(first_exit(errors, tau).tolist())))


def test_real_exits_equal_brute_force_at_the_first_exit_within_tau(tmp_path, tiny_model, tiny_checkpoint):
    weight = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 20
    method = make_method(tiny_model, save_regressor(tmp_path, tiny_checkpoint, weight, 0.0), tau=0.0)
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,))
    predictions, errors = brute_force(method, x, t)
    method.params.tau = spreading_tau(errors)
    expected = first_exit(errors, method.params.tau)
    assert len(set(expected.tolist())) > 2
    log = start(method, 16)
    with torch.no_grad():
        eps = method(x, t, None, context(0, batch=16))
    assert log.exit_point[:, 0].tolist() == expected.tolist()
    assert torch.allclose(eps, predictions[torch.arange(16), expected - 1], atol=1e-5)
    assert log.blocks_run[:, 0].sum(1).tolist() == expected.tolist()  # nothing ran after the exit
    num_blocks = method.backbone.num_blocks  # the regressor is not asked at the last block
    assert log.extra_macs[:, 0].tolist() == (D * expected.clamp(max=num_blocks - 1)).tolist()


def test_lte_loss_against_hand_computation():
    eps = torch.tensor([[[[0.5, -0.5]]], [[[1.0, 0.0]]]])                # B=2, 1x1x2 images
    exit_1 = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 0.0]]]])
    exit_2 = torch.tensor([[[[0.5, 0.5]]], [[[0.0, 2.0]]]])
    e = np.array([[0.25, 0.5], [0.0, 2.5]])                           # per-sample MSE of exits 1, 2
    l = 1 - np.exp(-e)
    u = torch.tensor([[0.3, 0.2], [0.1, 0.9]])
    targets = torch.stack([berxit.lte_target(exit_1, eps), berxit.lte_target(exit_2, eps)], 1)
    assert np.allclose(targets.numpy(), l, atol=1e-6)
    expected = np.mean((u.numpy() - l) ** 2)
    assert berxit.lte_loss(u, targets).item() == pytest.approx(expected, rel=1e-5)


def test_training_loss_is_the_lte_loss_over_every_exit_of_the_frozen_backbone(tiny_checkpoint):
    from adadiff_bench.config import TrainFile
    from adadiff_bench.methods.prefix_exit import exit_network
    alpha_bar = alphas_cumprod()
    config = TrainFile(task="berxit", task_config=berxit.BerxitTrainConfig(base_checkpoint=str(tiny_checkpoint)))
    task = berxit.training_task(config, alpha_bar)
    x0 = torch.randn(4, 1, 8, 8)
    loss = task.loss(x0, None, torch.Generator().manual_seed(5))
    t, eps, xt = add_noise(x0, torch.Generator().manual_seed(5), alpha_bar)
    model, lte = exit_network(str(tiny_checkpoint))[0], task.model
    with torch.no_grad():
        states = plain_hidden_states(model, xt, t)
    terms = []
    for tokens in states:
        target = 1 - torch.exp(-(model.head(tokens) - eps).pow(2).mean((1, 2, 3)))
        terms.append((torch.sigmoid(lte.linear(tokens[:, 1:].mean(1))).squeeze(1) - target).pow(2))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    loss.backward()  # only the regressor learns
    assert lte.linear.weight.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_training_through_the_cli_writes_a_small_checkpoint_that_round_trips(tmp_path, tiny_checkpoint):
    from adadiff_bench.cli import main
    text = (REPO / "configs" / "berxit_digits.toml").read_text()
    text = text.replace('"checkpoints/adadiff_digits_finetuned.pt"', f'"{tiny_checkpoint}"')
    text = text.replace("steps = 500", "steps = 4").replace("batch_size = 128", "batch_size = 8")
    text = text.replace('"results/train/berxit_digits"', f'"{tmp_path / "run"}"')
    text = text.replace('"checkpoints/berxit_digits.pt"', f'"{tmp_path / "out.pt"}"')
    (tmp_path / "berxit.toml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "berxit.toml"), "--no-progress"]) == 0
    assert (tmp_path / "out.pt").stat().st_size < 10_000  # the regressor and a reference, no backbone
    lte, backbone = berxit.load_berxit(str(tmp_path / "out.pt"))
    assert backbone == str(tiny_checkpoint)
    torch.manual_seed(0)  # the seeded initialisation the training started from
    initial = berxit.LearningToExit(D, 1)
    assert not torch.equal(lte.linear.weight, initial.linear.weight)
    berxit.save_berxit(tmp_path / "again.pt", lte, backbone, sha256_file(backbone))
    again, _ = berxit.load_berxit(str(tmp_path / "again.pt"))
    assert all(torch.equal(a, b) for a, b in zip(lte.state_dict().values(), again.state_dict().values()))


def test_a_changed_or_missing_backbone_is_refused_in_one_line(tmp_path, tiny_checkpoint):
    path = save_regressor(tmp_path, tiny_checkpoint, torch.zeros(D), 0.0)
    cls = get_method("berxit")
    make_params(cls, {"checkpoint": str(path)}, "test")  # accepted as trained
    torch.manual_seed(7)
    save_checkpoint(tiny_checkpoint, build_model(TINY), TINY)  # another backbone under the same name
    with pytest.raises(UserError, match="changed since BERxiT checkpoint") as changed:
        make_params(cls, {"checkpoint": str(path)}, "test")
    tiny_checkpoint.unlink()
    with pytest.raises(UserError, match="which is missing") as missing:
        make_params(cls, {"checkpoint": str(path)}, "test")
    for error in (changed, missing):
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="not found"):
        make_params(cls, {"checkpoint": str(tmp_path / "nothing.pt")}, "test")


def test_bad_knobs_and_foreign_files_are_refused(tmp_path, tiny_checkpoint):
    cls = get_method("berxit")
    path = save_regressor(tmp_path, tiny_checkpoint, torch.zeros(D), 0.0)
    with pytest.raises(UserError, match="tau is a predicted eps MSE"):
        make_params(cls, {"checkpoint": str(path), "tau": -0.1}, "test")
    with pytest.raises(UserError, match="not a BERxiT checkpoint"):
        make_params(cls, {"checkpoint": str(tiny_checkpoint)}, "test")  # a U-ViT, not a regressor
    shallow = build_model(UViTConfig(**{**TINY.__dict__, "depth": 2}))
    with pytest.raises(UserError, match="differs from the run's model"):
        cls.check(make_params(cls, {"checkpoint": str(path)}, "test"), shallow, "test")


def test_dispatch_flops_match_the_step_log(tmp_path, tiny_model, tiny_checkpoint):
    weight = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 20
    path = save_regressor(tmp_path, tiny_checkpoint, weight, 0.0)
    method = make_method(tiny_model, path, tau=0.0)
    _, errors = brute_force(method, torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,)))
    cell = Cell("berxit", (("checkpoint", str(path)), ("tau", spreading_tau(errors))), "ddim", 3, 0)
    n = 8
    flops = dispatch_flops(lambda: generate(cell, tiny_model, n, 4))
    _, log = generate(cell, tiny_model, n, 4)
    assert 0 < log.layer_ratio() < 1 and log.extra_macs.sum() > 0
    assert log.macs_per_image(unit_costs(tiny_model)) == pytest.approx(flops / 2 / n, rel=0.01)
