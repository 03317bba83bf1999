"""`berxit`: learning to exit (Xin, Tang, Yu, Lin, "BERxiT: Early Exiting for BERT with Better Fine-Tuning
and Extension to Regression", EACL 2021; official code castorini/berxit).

BERxiT's learning-to-exit (LTE) module predicts, from the hidden state after layer i, how wrong that
layer's exit would be, and the model exits at the first layer whose prediction passes a threshold.
Followed here as the official code has it (`transformers/modeling_highway_bert.py`): one module
shared by all exit points, a single linear layer and a sigmoid, u_i = sigmoid(w^T h_i + b); for
regression its target is the exit's squared error mapped to [0, 1), l_i = 1 - exp(-e_i); the loss
is the mean squared difference (u_i - l_i)^2 over exits and samples; no timestep input.

On U-ViT: exit points follow every block in execution order (in-blocks, mid-block, out-blocks, whose
long skips the exit-aware forward compacts). h_i is the mean of the patch tokens after exit point i
(extra tokens dropped), in place of BERT's pooled [CLS] vector, which comes from a pooler inside
each off-ramp that the frozen exit heads here do not have. e_i is the per-sample mean squared error
of exit i's eps against the true noise (eps has unit variance, so 1 is the error of predicting 0).
At sampling, the predicted error -log(1 - u_i) (the inverse of the target's mapping) is compared
with `tau`: a sample exits at the first exit point where it is <= tau (the last block always exits).
Because the target is the absolute error, samples at small t (where every exit's eps is poor) stay
longer than samples at large t.

Costs: the blocks up to the exit, one head, and the regressor at every exit point it was called at
(embed_dim MACs per sample and call; the token mean is additions, not counted).

Differs from the paper: only the regressor trains, on a frozen backbone with frozen exit heads (here
AdaDiff's fine-tuned ones, not BERxiT's alternating fine-tuning); the official code trains the LTE
module in a stage of its own after fine-tuning, with the LTE loss alone. The official code exits when
u_i < threshold; here predicted error <= tau (the same rule on another scale, non-strict).
The checkpoint (`adadiff-bench train` with a `[berxit]` table) holds only the regressor and the path
and sha256 of the backbone checkpoint it was trained on; `checkpoint` names it, not a backbone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from adadiff_bench.checkpoints import (CheckpointFormat, atomic_torch_save, cached_checkpoint, load_checkpoint,
                                       register_format, sha256_file)
from adadiff_bench.diffusion import add_noise
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.prefix_exit import (EXIT_NETWORK_FORMATS, PrefixExit, backbone_and_heads,
                                               check_architecture, exit_network)
from adadiff_bench.methods.registry import Method, register_method
from adadiff_bench.training import Task

FORMAT = "adadiff-bench/berxit"
TRAIN_HINT = "train one with `adadiff-bench train --config configs/berxit_digits.toml`"


class LearningToExit(nn.Module):
    """BERxiT's LTE module, shared by every exit point: u_i = sigmoid(w^T h_i + b), h_i = mean patch token."""

    def __init__(self, embed_dim: int, extras: int):
        super().__init__()
        self.extras = extras
        self.linear = nn.Linear(embed_dim, 1)

    def logit(self, tokens: torch.Tensor) -> torch.Tensor:
        h = tokens[:, self.extras:].mean(1)
        return self.linear(h).squeeze(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(tokens))

    def predicted_error(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample eps MSE the regressor predicts, e = -log(1 - u) (the inverse of l = 1 - exp(-e)).

        -log(1 - sigmoid(a)) = softplus(a): computed from the logit, it does not saturate where u rounds to 1.
        """
        return F.softplus(self.logit(tokens))

    @property
    def macs_per_sample(self) -> int:
        return self.linear.in_features


def lte_target(prediction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The exit label l_i = 1 - exp(-e_i), e_i the per-sample mean squared error of an exit's eps (no gradient)."""
    e = (prediction - eps).pow(2).flatten(1).mean(1)
    return (1 - torch.exp(-e)).detach()


def lte_loss(u: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean over exits and samples of (u_i - l_i)^2, as the official code's MSELoss."""
    return (u - label).pow(2).mean()


# ---- checkpoints: the regressor plus the backbone it was trained on ---------------------------

def save_berxit(path, lte: LearningToExit, backbone: str, backbone_sha256: str, meta: dict | None = None) -> None:
    state = {k: v.detach().float().cpu().clone() for k, v in lte.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "version": 1, "embed_dim": lte.linear.in_features, "extras": lte.extras,
                       "state_dict": state, "backbone": str(backbone), "backbone_sha256": backbone_sha256,
                       "meta": meta or {}}, path)


@dataclass
class BerxitCheckpoint:
    lte: LearningToExit
    backbone: str          # the checkpoint it was trained on (path)
    backbone_sha256: str


def _load(payload: dict, path: str) -> BerxitCheckpoint:
    lte = LearningToExit(payload["embed_dim"], payload["extras"])
    lte.load_state_dict(payload["state_dict"])
    return BerxitCheckpoint(lte.eval().requires_grad_(False), payload["backbone"], payload["backbone_sha256"])


register_format(CheckpointFormat(FORMAT, "a BERxiT checkpoint (its regressor and its backbone's path)", _load,
                                 TRAIN_HINT))


def load_berxit(path: str, where: str = "berxit", device: torch.device | str = "cpu") -> tuple[LearningToExit, str]:
    """(regressor on `device`, backbone path), refusing a backbone that is missing or changed since training."""
    if not Path(path).is_file():
        raise UserError(f"{where}: BERxiT checkpoint {path!r} not found; fix the path or {TRAIN_HINT}")
    saved = cached_checkpoint(path, FORMAT, where, device=device)  # (one copy per device, kept)
    if not Path(saved.backbone).is_file():
        raise UserError(f"{where}: BERxiT checkpoint {path!r} was trained on backbone {saved.backbone!r}, which is "
                        f"missing; restore it or retrain the regressor")
    sha = sha256_file(saved.backbone)
    if sha != saved.backbone_sha256:
        raise UserError(f"{where}: backbone {saved.backbone!r} changed since BERxiT checkpoint {path!r} was trained on "
                        f"it (sha256 {sha[:12]}... != {saved.backbone_sha256[:12]}...); retrain the regressor")
    return saved.lte, saved.backbone


# ---- the method --------------------------------------------------------------------------------

@dataclass
class BerxitParams:
    checkpoint: str = knob("checkpoints/berxit_digits.pt", "the trained learning-to-exit regressor (it names the "
                                                          "backbone it was trained on)",
                           valid="an existing BERxiT checkpoint whose backbone file still matches")
    tau: float = knob(0.05, "exit at the first block whose predicted eps MSE, -log(1 - u), is <= tau "
                            "(0.05: layer ratio 0.83 on the digits model, dpm-solver++ 25 steps)", at_least=0)

    def validate(self, where: str) -> None:
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise UserError(f"{where}: tau is a predicted eps MSE and must be a finite number >= 0 (got {self.tau})")
        load_berxit(self.checkpoint, where)


@dataclass
class BerxitTrainConfig:
    """`[berxit]`: train BERxiT's learning-to-exit regressor on a frozen backbone.

    `base_checkpoint`: a U-ViT checkpoint, or an AdaDiff checkpoint whose backbone and exit heads are used.
    """
    base_checkpoint: str = knob("checkpoints/uvit_digits.pt", "the frozen network: a U-ViT, or an AdaDiff checkpoint "
                                                              "whose backbone and exit heads are used",
                                valid="a U-ViT or AdaDiff checkpoint file")


@register_method
class Berxit(PrefixExit):
    name = "berxit"
    family = "early-exit"
    Params = BerxitParams
    TrainConfig = BerxitTrainConfig
    reads = (FORMAT,)
    writes = FORMAT

    def __init__(self, model, params=None):
        Method.__init__(self, model, params)  # `checkpoint` names the regressor; the backbone comes from it
        self.lte, backbone = load_berxit(self.params.checkpoint, device=self.device)
        self.backbone, self.heads = exit_network(backbone, device=self.device)

    @classmethod
    def check(cls, params, model, where):
        """The step log and unit costs are the run's model's: the backbone must have its architecture."""
        backbone = exit_network(load_berxit(params.checkpoint, where)[1], where)[0]
        check_architecture(backbone, model, where, f"the backbone of BERxiT checkpoint {params.checkpoint!r}")

    def policy(self, exit_point, tokens, state, t, active):
        self.log.add_macs(self.lte.macs_per_sample, active)
        return self.lte.predicted_error(tokens) <= self.params.tau

    @classmethod
    def training_task(cls, config, alpha_bar):
        return training_task(config, alpha_bar)


# ---- training: the regressor on a frozen backbone and frozen exit heads ------------------------

def training_task(config, alpha_bar: torch.Tensor) -> Task:
    cfg: BerxitTrainConfig = config.task_config
    # a private copy (not the shared cached one): train() moves it to the device with the regressor
    net = load_checkpoint(cfg.base_checkpoint, EXIT_NETWORK_FORMATS, "[berxit] base_checkpoint").requires_grad_(False)
    backbone, heads = backbone_and_heads(net)
    backbone_sha256 = sha256_file(cfg.base_checkpoint)
    lte = LearningToExit(backbone.embed_dim, backbone.extras)

    def loss(x0, y, generator):
        t, eps, xt = add_noise(x0, generator, alpha_bar)
        u, label = [], []
        with torch.no_grad():
            tokens, state = backbone.begin(xt, t, y)
        for block in range(backbone.num_blocks):
            with torch.no_grad():  # the backbone and its exit heads stay frozen
                tokens = backbone.run_block(block, tokens, state)
                label.append(lte_target(heads(block + 1, tokens, state), eps))
            u.append(lte(tokens))
        return lte_loss(torch.stack(u, 1), torch.stack(label, 1))

    def export(path, ema, meta, half):  # a few KB: always float32
        save_berxit(path, ema, cfg.base_checkpoint, backbone_sha256, meta)

    def exit_predictions(ema, x, t, y):  # (the end report: eps of every exit of the frozen network)
        tokens, state = backbone.begin(x, t, y)
        outputs = []
        for block in range(backbone.num_blocks):
            tokens = backbone.run_block(block, tokens, state)
            outputs.append(heads(block + 1, tokens, state))
        return outputs

    return Task(lte, loss, export, backbone.config, frozen=(net,), base_checkpoint=cfg.base_checkpoint,
                predictions=exit_predictions)
