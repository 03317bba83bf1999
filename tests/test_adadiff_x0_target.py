"""AdaDiff's timestep-aware ablation: the uncertainty pseudo-label measured in x0 space (`target_space = "x0"`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.diffusion import schedule_alphas_cumprod
from adadiff_bench.errors import UserError
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.adadiff import AdaDiffTrainConfig, adadiff_losses
from adadiff_bench.methods.adadiff.method import on_demand_config
from adadiff_bench.methods.adadiff.training import uncertainty_targets, x0_error_scale


def test_the_x0_target_is_the_error_of_the_clean_image_an_exit_implies():
    """Closed form: x_t = alpha x0 + sigma eps and x0_hat = (x_t - sigma eps_hat) / alpha, so the target is
    tanh|x0_hat - x0| computed from the images themselves, at timesteps from nearly clean to nearly pure noise."""
    alpha_bar = schedule_alphas_cumprod("linear")
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 250, 600, 999])
    x0 = torch.rand(4, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 4, 4, generator=generator, dtype=torch.float64)
    eps_hat = eps + 0.01 * torch.randn(4, 1, 4, 4, generator=generator, dtype=torch.float64)
    alpha, sigma = alpha_bar[t].sqrt().view(-1, 1, 1, 1), (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    x0_hat = (x_t - sigma * eps_hat) / alpha
    expected = torch.tanh((x0_hat - x0).abs())
    [target] = uncertainty_targets([eps_hat.float()], eps.float(), per_pixel=True,
                                   error_scale=x0_error_scale(alpha_bar, t))
    assert torch.allclose(target.double(), expected, rtol=1e-4, atol=1e-6)
    # the eps-space target is the same without the scale; the two differ most at high noise
    [plain] = uncertainty_targets([eps_hat.float()], eps.float(), per_pixel=True)
    assert torch.allclose(plain.double(), torch.tanh((eps_hat - eps).abs()), atol=1e-6)
    assert (target[-1] > plain[-1]).all() and (target[0] < plain[0]).all()


def test_the_x0_target_reaches_the_uncertainty_loss_and_only_it():
    eps = torch.tensor([[[[0.5, -0.5]]], [[[0.1, 0.2]]]])
    predictions = [eps + 0.3, eps.clone()]
    uncertainties = [torch.full_like(eps, 0.4), torch.full_like(eps, 0.1)]
    scale = torch.tensor([0.5, 4.0])
    x0 = adadiff_losses(predictions, uncertainties, eps, AdaDiffTrainConfig(loss="paper", target_space="x0"),
                        per_pixel=True, error_scale=scale)
    plain = adadiff_losses(predictions, uncertainties, eps, AdaDiffTrainConfig(loss="paper"), per_pixel=True)
    u_hat = np.tanh(0.3 * np.array([0.5, 4.0]))                     # exit 1; exit 2 is exact: u_hat = 0
    expected_u = np.mean((0.4 - u_hat) ** 2) + 0.1 ** 2
    assert x0["u"].item() == pytest.approx(expected_u, rel=1e-5)
    assert x0["ual"].item() == pytest.approx(plain["ual"].item()) and x0["simple"] == plain["simple"]


def test_target_space_is_an_ablation_override_and_checked():
    params = make_params(get_method("adadiff"), {"train": "configs/adadiff_ablation_base.toml",
                                                 "target_space": "x0"}, "test")
    assert on_demand_config(params).task_config.target_space == "x0"
    with pytest.raises(UserError, match="target_space must be 'eps' or 'x0'"):
        AdaDiffTrainConfig(target_space="x1").validate("test")
