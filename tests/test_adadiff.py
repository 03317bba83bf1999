"""AdaDiff: real exits equal simulated ones, the exit rules, official checkpoints, the loss terms, FLOPs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.adadiff import (ESTIMATORS, AdaDiffConfig, AdaDiffTrainConfig, adadiff_losses,
                                           build_adadiff, load_adadiff, save_adadiff)
from adadiff_bench.steplog import StepLog
from conftest import TINY, context, plain_hidden_states


def random_adadiff(estimator="official", heads="shared", seed=0):
    torch.manual_seed(seed)
    net = build_adadiff(TINY, AdaDiffConfig(estimator=estimator, heads=heads)).eval()
    with torch.no_grad():  # spread the estimators' outputs so that thresholds split the batch
        for p in net.estimator.parameters():
            p.normal_(0, 0.5)
    return net


def make_method(tmp_path, net, **knobs):
    path = tmp_path / "adadiff.pt"
    save_adadiff(path, net, TINY)
    cls = get_method("adadiff")
    return cls(net.backbone, make_params(cls, {"checkpoint": str(path), **knobs}, "test"))


def run_step(method, x, t, num_blocks):
    log = StepLog(len(x), np.zeros(1), num_blocks)
    log.set_batch(np.arange(len(x)))
    log.set_step(0)
    method.start_batch(log)
    with torch.no_grad():
        eps = method(x, t, None, context(0, batch=len(x)))
    return eps, log


def first_exits(scalars, threshold):
    passing = scalars <= threshold
    passing[:, -1] = True
    return passing.float().argmax(1) + 1  # first exit point that passes


def spreading_threshold(scalars):
    """The threshold (among quantiles of the uncertainties) that spreads samples over the most exit points."""
    candidates = torch.quantile(scalars.flatten(), torch.linspace(0.02, 0.98, 49))
    return float(max(candidates, key=lambda c: len(set(first_exits(scalars, c).tolist()))))


def plain_exits(net, x, t):
    """Every exit's eps and uncertainty from plain block calls (not the backbone interface), all blocks run."""
    with torch.no_grad():
        states = plain_hidden_states(net.backbone, x, t)
        predictions = [net.exit_head(i, tokens, None) for i, tokens in enumerate(states, 1)]
        uncertainties = [net.estimator.uncertainty(i, tokens, t) for i, tokens in enumerate(states, 1)]
    return predictions, uncertainties


def brute_force(net, x, t):
    """Every exit's eps and scalar uncertainty, computing all blocks for every sample."""
    predictions, uncertainties = plain_exits(net, x, t)
    scalars = torch.stack([u.flatten(1).mean(1) if u.dim() > 1 else u for u in uncertainties], 1)
    return torch.stack(predictions, 1), scalars


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("heads", ["shared", "per-exit"])
def test_all_exits_for_training_equals_the_plain_computation(estimator, heads):
    net = random_adadiff(estimator, heads)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    with torch.no_grad():
        predictions, uncertainties = net.all_exits(x, t)
    expected_predictions, expected_uncertainties = plain_exits(net, x, t)
    assert len(predictions) == len(uncertainties) == net.num_exits == TINY.depth + 1
    for got, expected in zip(predictions + uncertainties, expected_predictions + expected_uncertainties):
        assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(predictions[-1], net.backbone(x, t), atol=1e-6)  # the last exit is the full network


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("heads", ["shared", "per-exit"])
def test_compacted_forward_equals_brute_force_at_each_chosen_exit(tmp_path, estimator, heads):
    net = random_adadiff(estimator, heads)
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,))
    predictions, scalars = brute_force(net, x, t)
    threshold = spreading_threshold(scalars)
    method = make_method(tmp_path, net, threshold=threshold)
    eps, log = run_step(method, x, t, net.num_exits)
    expected_exit = first_exits(scalars, threshold)
    assert torch.equal(torch.from_numpy(log.exit_point[:, 0].astype(np.int64)), expected_exit)
    assert 1 < len(set(expected_exit.tolist()))  # the test exercises several exit points
    chosen = predictions[torch.arange(16), expected_exit - 1]
    assert torch.allclose(eps, chosen, atol=1e-5)
    # blocks after the exit did not run
    ran = log.blocks_run[:, 0].sum(1)
    assert np.array_equal(ran, expected_exit.numpy())


def test_per_batch_rule_decides_once_for_the_whole_batch(tmp_path):
    net = random_adadiff()
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    _, scalars = brute_force(net, x, t)
    threshold = float(scalars.mean(0).median())
    batch = make_method(tmp_path, net, threshold=threshold, rule="per-batch")
    assert batch.batch_dependent and not make_method(tmp_path, net, threshold=threshold).batch_dependent
    _, log = run_step(batch, x, t, net.num_exits)
    mean_passes = (scalars.mean(0) <= threshold).tolist() + [True]
    expected = mean_passes.index(True) + 1
    assert (log.exit_point[:, 0] == expected).all()


def test_patience_exits_at_the_second_passing_in_block(tmp_path):
    net = random_adadiff()
    num_in = len(net.backbone.in_blocks)
    x, t = torch.randn(32, 1, 8, 8), torch.randint(0, 1000, (32,))
    _, scalars = brute_force(net, x, t)
    threshold = spreading_threshold(scalars)
    _, log = run_step(make_method(tmp_path, net, threshold=threshold, patience=True), x, t, net.num_exits)
    for i in range(32):
        passes = (scalars[i] <= threshold).tolist()
        passes[-1] = True
        expected = None
        seen = 0
        for point, ok in enumerate(passes, 1):
            if ok and point <= num_in:
                seen += 1
                if seen == 2:
                    expected = point
                    break
            elif ok:
                expected = point
                break
        assert log.exit_point[i, 0] == expected


def official_forward(state, x, t, thres, uvit=TINY, certainties=None, model=None):
    """The official AdaDiff inference rule at batch size 1, written from its description (ADADIFF.md):
    plain module calls with an explicit skip list, not the backbone interface. Each block's mean
    certainty is appended to `certainties` when given; `model`: the U-ViT already built from `state`."""
    from adadiff_bench.models.backbone import unpatchify
    model = model or official_uvit(state, uvit)
    num_in, blocks = len(model.in_blocks), model.block_list()
    with torch.no_grad():
        tokens = model.embed(x, t)
        skips, patient = [], False
        for block in range(len(blocks)):
            tokens = blocks[block](tokens, skips.pop() if block > num_in else None)
            if block < num_in:
                skips.append(tokens)
            weight, bias = state[f"lte_classifer.{block}.lte.weight"], state[f"lte_classifer.{block}.lte.bias"]
            certainty = unpatchify(torch.sigmoid(tokens[:, model.extras:] @ weight.T + bias), model.in_chans)
            if certainties is not None:
                certainties.append(float(certainty.mean()))
            if certainty.mean() > thres:
                if block < num_in:
                    if patient:
                        return model.head(tokens), block + 1
                    patient = True
                else:
                    return model.head(tokens), block + 1
        return model.head(tokens), len(blocks)


def official_uvit(state, uvit):
    """A U-ViT with the backbone weights of an official AdaDiff state dict (plain strict load)."""
    from adadiff_bench.checkpoints import build_model, load_state_dict_strict
    model = build_model(uvit).eval()
    load_state_dict_strict(model, {k: v for k, v in state.items() if not k.startswith("lte_")}, "official")
    return model


def test_official_state_dict_loads_strictly_and_matches_the_official_rule(tmp_path):
    torch.manual_seed(3)
    from adadiff_bench.checkpoints import build_model
    state = dict(build_model(TINY).state_dict())
    patch_dim = TINY.patch_size ** 2 * TINY.in_chans
    for i in range(TINY.depth + 1):  # the documented official names and shapes
        state[f"lte_classifer.{i}.lte.weight"] = torch.randn(patch_dim, TINY.embed_dim) * 0.5
        state[f"lte_classifer.{i}.lte.bias"] = torch.randn(patch_dim) * 0.5
    torch.save(state, tmp_path / "official.pt")
    net = load_adadiff(tmp_path / "official.pt", uvit=TINY)  # strict: every key used, none missing
    save_adadiff(tmp_path / "converted.pt", net, TINY)
    cls = get_method("adadiff")
    exits_seen = set()
    for seed in range(12):
        x, t = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.tensor([100 * seed])
        certainties = [0.3, 0.45, 0.5, 0.55, 0.6]
        thres = certainties[seed % len(certainties)]
        method = cls(net.backbone, make_params(cls, {"checkpoint": str(tmp_path / "converted.pt"), "threshold": thres,
                                                     "threshold_kind": "official-certainty", "rule": "per-batch",
                                                     "patience": True}, "test"))
        eps, log = run_step(method, x, t, net.num_exits)
        expected_eps, expected_exit = official_forward(state, x, t, thres)
        assert log.exit_point[0, 0] == expected_exit
        assert torch.allclose(eps, expected_eps, atol=1e-6)
        exits_seen.add(expected_exit)
    assert len(exits_seen) > 1


def test_official_release_on_the_cifar10_preset_matches_the_official_rule(tmp_path):
    """A full-size U-ViT-S/2 AdaDiff release (random weights, estimators perturbed): loaded with no config
    (its preset found by shapes), it exits where the independent re-implementation does."""
    from adadiff_bench.checkpoints import build_model, cached_checkpoint
    from adadiff_bench.models.presets import PRESETS
    uvit = PRESETS["cifar10_uvit_s2"].network
    torch.manual_seed(5)
    reference = build_model(uvit).eval()
    state = dict(reference.state_dict())
    patch_dim, width = uvit.patch_size ** 2 * uvit.in_chans, uvit.embed_dim
    for i in range(uvit.depth + 1):  # the official names and shapes; logits of order one
        state[f"lte_classifer.{i}.lte.weight"] = torch.randn(patch_dim, width) / width ** 0.5
        state[f"lte_classifer.{i}.lte.bias"] = torch.randn(patch_dim) * 0.5
    release = tmp_path / "nnet_ema.pth"
    torch.save(state, release)
    cls = get_method("adadiff")
    net = cached_checkpoint(release, cls.reads)  # what the method loads, with no U-ViT config given
    assert (net.backbone.embed_dim, net.backbone.num_blocks, net.backbone.patch_size) == (512, 13, 2)
    exits_seen = set()
    for seed in range(2):
        x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), torch.tensor([250 * seed + 1])
        certainties = []
        official_forward(state, x, t, 1.0, uvit, certainties, reference)  # never exits: every block's certainty
        ordered = sorted(certainties)
        for k in (2, 8):  # thresholds halfway between two blocks' certainties
            thres = (ordered[k] + ordered[k + 1]) / 2
            knobs = {"checkpoint": str(release), "threshold": thres, "threshold_kind": "official-certainty",
                     "rule": "per-batch", "patience": True}
            eps, log = run_step(cls(net.backbone, make_params(cls, knobs, "test")), x, t, net.num_exits)
            expected_eps, expected_exit = official_forward(state, x, t, thres, uvit, model=reference)
            assert log.exit_point[0, 0] == expected_exit
            assert torch.allclose(eps, expected_eps, atol=1e-5)
            exits_seen.add(expected_exit)
    assert len(exits_seen) > 1


def test_loss_terms_against_hand_computed_values():
    eps = torch.tensor([[[[0.5, -0.5]]]])                         # B=1, 1x1x2 image
    predictions = [torch.tensor([[[[0.0, 0.0]]]]), torch.tensor([[[[0.5, 0.0]]]])]
    uncertainties = [torch.tensor([[[[0.2, 0.4]]]]), torch.tensor([[[[0.1, 0.3]]]])]
    t1, t2 = np.tanh(0.5), np.tanh(0.0)
    u_hat = [[t1, t1], [0.0, t1]]
    err = [[0.25, 0.25], [0.0, 0.25]]
    simple = np.mean(err[1])
    u_terms = [np.mean([(0.2 - u_hat[0][0]) ** 2, (0.4 - u_hat[0][1]) ** 2]),
               np.mean([(0.1 - u_hat[1][0]) ** 2, (0.3 - u_hat[1][1]) ** 2])]
    paper = adadiff_losses(predictions, uncertainties, eps, AdaDiffTrainConfig(loss="paper"), per_pixel=True)
    assert paper["simple"].item() == pytest.approx(simple)
    assert paper["u"].item() == pytest.approx(sum(u_terms), rel=1e-5)
    ual = np.mean([(1 - 0.2) * 0.25, (1 - 0.4) * 0.25]) + np.mean([(1 - 0.1) * 0.0, (1 - 0.3) * 0.25])
    assert paper["ual"].item() == pytest.approx(ual, rel=1e-5)
    assert paper["total"].item() == pytest.approx(simple + sum(u_terms) + ual, rel=1e-5)

    official = adadiff_losses(predictions, uncertainties, eps, AdaDiffTrainConfig(loss="official"), per_pixel=True)
    certainty = np.array([1 - 0.3, 1 - 0.2])
    weights = certainty / certainty.sum()
    assert official["u"].item() == pytest.approx(np.mean(u_terms), rel=1e-5)
    assert official["ual"].item() == pytest.approx(weights[0] * 0.25 + weights[1] * 0.125, rel=1e-5)


def test_official_weights_carry_gradient_unless_detached():
    eps = torch.zeros(2, 1, 2, 2)
    predictions = [torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)]
    for detach in (False, True):
        uncertainties = [torch.full((2, 1, 2, 2), 0.5, requires_grad=True) for _ in range(2)]
        loss = adadiff_losses(predictions, uncertainties, eps, AdaDiffTrainConfig(beta_ual=1, lambda_u=0,
                                                                                  detach_weights=detach), True)
        loss["ual"].backward() if loss["ual"].requires_grad else None
        grad = uncertainties[0].grad
        assert (grad is None or grad.abs().sum() == 0) == detach


def test_dispatch_flops_drop_by_the_fraction_the_step_log_says(tmp_path):
    from adadiff_bench.harness import Cell, generate
    net = random_adadiff()
    path = tmp_path / "a.pt"
    save_adadiff(path, net, TINY)
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,))
    _, scalars = brute_force(net, x, t)
    cell = Cell("adadiff", (("checkpoint", str(path)), ("threshold", spreading_threshold(scalars))), "ddim", 3, 0)
    full = Cell("full", (), "ddim", 3, 0)
    n = 8
    flops_exit = dispatch_flops(lambda: generate(cell, net.backbone, n, 4))
    flops_full = dispatch_flops(lambda: generate(full, net.backbone, n, 4))
    _, log = generate(cell, net.backbone, n, 4)
    _, full_log = generate(full, net.backbone, n, 4)
    costs = unit_costs(net.backbone)
    assert log.layer_ratio() < 1.0
    assert log.macs_per_image(costs) == pytest.approx(flops_exit / 2 / n, rel=0.01)
    ratio_logged = log.macs_per_image(costs) / full_log.macs_per_image(costs)
    assert ratio_logged == pytest.approx(flops_exit / flops_full, rel=0.01)


def test_threshold_out_of_range_is_refused(tmp_path):
    from adadiff_bench.errors import UserError
    with pytest.raises(UserError, match=r"threshold must be in \[0, 1\]"):
        make_params(get_method("adadiff"), {"threshold": 1.5}, "test")


def test_uncertainty_maps_are_saved_for_chosen_steps(tmp_path):
    from adadiff_bench.harness import Cell, build_method, generate
    net = random_adadiff()
    path = tmp_path / "a.pt"
    save_adadiff(path, net, TINY)
    cell = Cell("adadiff", (("checkpoint", str(path)), ("map_samples", 3), ("map_steps", "0,2"), ("threshold", 0.5)),
                "ddim", 3, 0)
    method = build_method(cell, net.backbone)
    method.record_artifacts = True
    _, log = generate(cell, net.backbone, 5, 2, method=method)
    maps = method.artifacts()["uncertainty_maps"]
    assert list(maps["steps"]) == [0, 2] and maps["maps"].shape == (2, 3, net.num_exits - 1, 1, 8, 8)
    assert maps["inputs"].shape == (2, 3, 1, 8, 8) and not np.isnan(maps["inputs"]).any()
    for k, step in enumerate([0, 2]):
        for sample in range(3):
            exit_point = log.exit_point[sample, step]
            visited = ~np.isnan(maps["maps"][k, sample, :, 0, 0, 0])
            # maps exist exactly at the exit points the sample reached before exiting (the last one needs none)
            assert visited.sum() == min(exit_point, net.num_exits - 1)
            assert np.all((maps["maps"][k, sample][visited] >= 0) & (maps["maps"][k, sample][visited] <= 1))
    # the timed pass (record_artifacts False) records nothing
    assert build_method(cell, net.backbone).artifacts() == {}


def test_a_registered_estimator_is_picked_by_name_for_building_saving_and_loading(tmp_path):
    from adadiff_bench.errors import UserError
    from adadiff_bench.methods.adadiff import Estimator, register_estimator

    class HalfEstimator(Estimator):
        """Uncertainty 0.5 for every sample, through one linear layer per exit (zero weights, zero bias)."""

        def __init__(self, backbone, config=None):
            super().__init__(backbone, config)
            self.linear = torch.nn.ModuleList([torch.nn.Linear(self.embed_dim, 1) for _ in range(self.num_exits)])
            for layer in self.linear:
                torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)

        def uncertainty(self, exit_point, tokens, t):
            return torch.sigmoid(self.linear[exit_point - 1](tokens.mean(1))).squeeze(-1)

        def _per_exit_linears(self):
            return [self.linear[0]]

        def _rows(self, num_tokens):
            return 1

    with pytest.raises(ValueError, match="already taken"):
        register_estimator("official", HalfEstimator)
    register_estimator("test-half", HalfEstimator)
    try:
        AdaDiffConfig(estimator="test-half").validate("test")
        net = build_adadiff(TINY, AdaDiffConfig(estimator="test-half")).eval()
        save_adadiff(tmp_path / "half.pt", net, TINY)
        loaded = load_adadiff(tmp_path / "half.pt")
        assert isinstance(loaded.estimator, HalfEstimator) and loaded.config.estimator == "test-half"
        x, t = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,))
        for threshold, exit_point in ((0.5, 1), (0.4, net.num_exits)):  # u = 0.5 everywhere: exit at 1 or never
            method = make_method(tmp_path, loaded, threshold=threshold)
            eps, log = run_step(method, x, t, net.num_exits)
            assert (log.exit_point[:, 0] == exit_point).all()
            assert (log.extra_macs[:, 0] == TINY.embed_dim * min(exit_point, net.num_exits - 1)).all()
    finally:
        ESTIMATORS.pop("test-half", None)
    with pytest.raises(UserError, match="unknown estimator 'test-half'"):
        AdaDiffConfig(estimator="test-half").validate("test")
