"""AdaDiff decides on the host with fewer ops: the same uncertainties and decisions as the device ops, bit for bit.

`Estimator.scalar_on_host` (what sampling calls after every block) must equal `scalar` exactly for every
estimator, and `AdaDiff.exits` on host floats must equal torch's comparisons of the float32 tensor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model
from adadiff_bench.methods.adadiff.estimators import ESTIMATORS
from adadiff_bench.methods.adadiff.method import AdaDiff, AdaDiffParams
from adadiff_bench.methods.adadiff.network import AdaDiffConfig
from conftest import TINY


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_scalar_on_host_is_scalar(name, batch):
    torch.manual_seed(batch)
    backbone = build_model(TINY).eval()
    estimator = ESTIMATORS[name](backbone, AdaDiffConfig(estimator=name))
    for module in estimator.modules():  # spread the outputs so the sigmoid is not flat
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    with torch.no_grad():
        x = torch.randn(batch, TINY.in_chans, TINY.img_size, TINY.img_size)
        t = torch.randint(0, 1000, (batch,))
        tokens, state = backbone.begin(x, t, None)
        for exit_point in range(1, backbone.num_blocks + 1):
            tokens = backbone.run_block(exit_point - 1, tokens, state)
            expected = estimator.scalar(exit_point, tokens, t).numpy()
            got = estimator.scalar_on_host(exit_point, tokens, t)
            assert got.dtype == np.float32 and np.array_equal(got, expected), (name, exit_point)


def torch_rule(uncertainty: torch.Tensor, params: AdaDiffParams) -> torch.Tensor:
    """The rule as device ops on the float32 tensor (what the host comparison must reproduce)."""
    if params.rule == "per-batch":
        uncertainty = uncertainty.mean().expand_as(uncertainty)
    if params.threshold_kind == "official-certainty":
        return (1.0 - uncertainty) > params.threshold
    return uncertainty <= params.threshold


@pytest.mark.parametrize("kind", ["uncertainty", "official-certainty"])
@pytest.mark.parametrize("rule", ["per-sample", "per-batch"])
def test_host_rule_matches_the_device_rule(kind, rule):
    generator = torch.Generator().manual_seed(0)
    method = AdaDiff.__new__(AdaDiff)  # the rule alone: no checkpoint needed
    for trial in range(300):
        u = torch.rand(int(torch.randint(1, 9, (1,), generator=generator)), generator=generator)
        # thresholds on the samples' own values (ties) and their float32 neighbours, and plain decimals
        edge = float(u[0]) if kind == "uncertainty" else float(1.0 - u[0])
        for threshold in (edge, float(np.nextafter(np.float32(edge), 1)), float(np.nextafter(np.float32(edge), 0)),
                          0.1, 0.3, 0.7):
            method.params = AdaDiffParams(threshold=threshold, threshold_kind=kind, rule=rule, checkpoint="")
            expected = torch_rule(u, method.params).numpy()
            assert np.array_equal(method.exits(u.numpy()), expected), (trial, threshold, u)


def test_a_double_quotient_rounds_to_the_float32_quotient():
    """The official estimator's host read divides float32 sums by the count in double: rounding that quotient
    to float32 must give the float32 division (torch's mean on the CPU), for sums and counts of every size."""
    generator = np.random.default_rng(0)
    spread = generator.random(200_000) * 10.0 ** generator.integers(-3, 7, 200_000)
    sums = np.concatenate([spread, np.arange(1, 5000)]).astype(np.float32)
    counts = generator.integers(1, 1 << 20, len(sums)).astype(np.float32)
    in_double = (sums.astype(np.float64) / counts.astype(np.float64)).astype(np.float32)
    assert np.array_equal(in_double, sums / counts)
    tensor_sums, tensor_counts = torch.from_numpy(sums), torch.from_numpy(counts)
    assert np.array_equal(in_double, (tensor_sums / tensor_counts).numpy())

