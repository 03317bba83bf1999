"""AdaDiff's training objective: L = L_simple + lambda L_u + beta L_UAL, from a base checkpoint.

Pseudo-label of uncertainty per exit i: u_hat_i = tanh(|g_i(L_i) - eps|) per pixel (its mean for
per-sample estimators), detached. Two forms, as in ADADIFF.md:
- paper:    L_u = sum_i ||u_i - u_hat_i||^2;  L_UAL = sum_i (1 - u_i) ||g_i(L_i) - eps||^2
- official: L_u = mean_i ||u_i - u_hat_i||^2; L_UAL = sum_i w_i ||g_i(L_i) - eps||^2 with w_i the
            batch-mean certainty (1 - u_i) of exit i, normalised to sum to 1 over exits, not detached
            unless `detach_weights`.
`target_space = "x0"` (an ablation) measures the pseudo-label in x0 space instead:
u_hat_i = tanh(|g_i - eps| sigma_t / alpha_t), the exit's error on the clean image it implies.
(||.||^2 is a mean over pixels and batch.) With `freeze_backbone`, everything of the base model, its
final head included, stays fixed: only the estimators (and per-exit heads, if chosen) train.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...checkpoints import load_model
from ...config import TrainFile
from ...diffusion import add_noise
from ...errors import UserError
from ...knobs import knob
from ...training import Task
from .checkpoint import save_adadiff
from .estimators import ESTIMATORS
from .network import AdaDiffConfig, AdaDiffNetwork


@dataclass
class AdaDiffTrainConfig:
    """`[adadiff]`: train AdaDiff's estimators (and optionally the backbone) from a base checkpoint.

    `loss`: "official" (L_u averaged over layers; L_UAL with batch-mean certainty weights normalised
    over layers) or "paper" (L_u summed over layers; L_UAL = sum_i (1 - u_i) ||g_i - eps||^2).
    """
    base_checkpoint: str = knob("checkpoints/uvit_digits.pt", "the U-ViT checkpoint AdaDiff is built on",
                                valid="a U-ViT checkpoint file")
    estimator: str = knob("official", "the uncertainty estimator after each block (official: the released code's; "
                                      "timestep, probe, attention: ablations; plugins may add more)",
                          choices=lambda: tuple(ESTIMATORS))
    heads: str = knob("shared", "exit heads: the backbone's final head shared by every exit (official) or one "
                                "trained head per exit", choices=("shared", "per-exit"))
    timestep_weights: str = knob("shared", "the timestep estimator's weights w_t: one set for all t, or one per "
                                           "timestep bucket", choices=("shared", "bucketed"))
    loss: str = knob("official", "\"official\": L_u averaged over layers, L_UAL weighted by batch-mean certainty "
                                 "normalised over layers; \"paper\": L_u summed, L_UAL = sum_i (1 - u_i) "
                                 "||g_i - eps||^2", choices=("official", "paper"))
    detach_weights: bool = knob(False, "official loss: no gradient through the certainty weights of L_UAL")
    estimator_lr: float = knob(0.0, "learning rate of the freshly initialised estimators (and per-exit heads) when "
                                    "it should differ from [train] lr, e.g. a fine-tuned backbone at the official "
                                    "4e-4 beside estimators that start from scratch; 0 = [train] lr", at_least=0)
    freeze_backbone: bool = knob(True, "keep the base model (final head included) fixed: only the estimators "
                                       "(and per-exit heads) train")
    lambda_u: float = knob(1.0, "weight lambda of the uncertainty-regression term L_u", at_least=0)
    beta_ual: float = knob(1.0, "weight beta of the uncertainty-aware layer loss L_UAL", at_least=0)
    target_space: str = knob("eps", "what the pseudo-label u_hat measures: \"eps\" (tanh|g_i - eps|, the paper's) or "
                                    "\"x0\" (the exit's error in x0 space, tanh(|g_i - eps| sigma_t / alpha_t): a "
                                    "timestep-aware target, an ablation)", choices=("eps", "x0"))

    # keys added after states were saved, with the value that reproduces those states (resuming fills them in)
    added_keys: ClassVar[dict] = {"estimator_lr": 0.0}

    def validate(self, where: str) -> None:
        if self.loss not in ("official", "paper"):
            raise UserError(f"{where}: loss must be 'official' or 'paper' (got {self.loss!r})")
        if self.target_space not in ("eps", "x0"):
            raise UserError(f"{where}: target_space must be 'eps' or 'x0' (got {self.target_space!r})")
        if self.lambda_u < 0 or self.beta_ual < 0 or self.estimator_lr < 0:
            raise UserError(f"{where}: lambda_u, beta_ual and estimator_lr must be >= 0")
        AdaDiffConfig(self.estimator, self.heads, self.timestep_weights).validate(where)


def uncertainty_targets(predictions: list[torch.Tensor], eps: torch.Tensor, per_pixel: bool,
                        error_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """u_hat_i = tanh(|g_i - eps| * error_scale), per pixel or its per-sample mean; no gradient.
    `error_scale` (B,): None for the eps-space target, `x0_error_scale` for the x0-space one."""
    scale = 1.0 if error_scale is None else error_scale.view(-1, *([1] * (eps.dim() - 1)))
    targets = [torch.tanh((p - eps).abs() * scale).detach() for p in predictions]
    return targets if per_pixel else [u.flatten(1).mean(1) for u in targets]


def x0_error_scale(alpha_bar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sigma_t / alpha_t per sample: x0_hat = (x_t - sigma_t eps_hat) / alpha_t, so |x0_hat - x0| = that |eps_hat - eps|."""
    a = alpha_bar[t.cpu()].double()
    return ((1 - a) / a).sqrt().float().to(t.device)


def adadiff_losses(predictions, uncertainties, eps, cfg: AdaDiffTrainConfig, per_pixel: bool,
                   error_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three terms and their weighted total, for one batch (`error_scale`: see `uncertainty_targets`)."""
    targets = uncertainty_targets(predictions, eps, per_pixel, error_scale)
    simple = (predictions[-1] - eps).pow(2).mean()
    u_terms = torch.stack([(u - u_hat).pow(2).mean() for u, u_hat in zip(uncertainties, targets)])
    errors = [(p - eps).pow(2) for p in predictions]
    if cfg.loss == "paper":
        l_u = u_terms.sum()
        ual = sum(((1 - _broadcast(u, e)) * e).mean() for u, e in zip(uncertainties, errors))
    else:
        l_u = u_terms.mean()
        certainty = torch.stack([1 - u.mean() for u in uncertainties])
        if cfg.detach_weights:
            certainty = certainty.detach()
        weights = certainty / certainty.sum()
        ual = sum(w * e.mean() for w, e in zip(weights, errors))
    total = simple + cfg.lambda_u * l_u + cfg.beta_ual * ual
    return {"total": total, "simple": simple, "u": l_u, "ual": ual}


def _broadcast(u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample uncertainty (B,) viewed against a (B, C, H, W) error."""
    return u if u.dim() == like.dim() else u.view(-1, *([1] * (like.dim() - 1)))


def adadiff_task(config: TrainFile, alpha_bar: torch.Tensor) -> Task:
    """The `[adadiff]` table's task: AdaDiff's network built on the base checkpoint, trained with its objective."""
    cfg: AdaDiffTrainConfig = config.task_config
    backbone = load_model(cfg.base_checkpoint)
    net = AdaDiffNetwork(backbone, AdaDiffConfig(cfg.estimator, cfg.heads, cfg.timestep_weights))
    if cfg.freeze_backbone:
        net.backbone.requires_grad_(False)

    def loss(x0, y, generator):
        # t and eps drawn by the CPU generator, moved to x0's device; the network autocast, its loss terms in fp32
        t, eps, xt = add_noise(x0, generator, alpha_bar)
        predictions, uncertainties = net.all_exits(xt, t, y, backbone_grad=not cfg.freeze_backbone)
        predictions, uncertainties = [p.float() for p in predictions], [u.float() for u in uncertainties]
        scale = x0_error_scale(alpha_bar, t) if cfg.target_space == "x0" else None
        return adadiff_losses(predictions, uncertainties, eps, cfg, net.estimator.per_pixel, scale)["total"]

    def export(path, ema, meta, half):
        save_adadiff(path, ema, backbone.config, {**meta, "base_checkpoint": cfg.base_checkpoint,
                                                  "freeze_backbone": cfg.freeze_backbone, "loss": cfg.loss}, half)

    fresh = (net.estimator,) + ((net.exit_heads,) if net.exit_heads is not None else ())
    return Task(net, loss, export, backbone.config, base_checkpoint=cfg.base_checkpoint,
                predictions=lambda ema, x, t, y: ema.all_exits(x, t, y)[0], fresh=fresh,
                fresh_lr=cfg.estimator_lr or None)
