"""`calm`: Confident Adaptive Language Modeling (Schuster et al., NeurIPS 2022), adapted to eps regression.

CALM exits a token's decoder at the first layer whose confidence passes a threshold. Two of its
training-free confidence measures carry over to a regression output:
- `variant = "state"` (CALM's hidden-state saturation): the cosine similarity of the hidden states
  after consecutive blocks, per sample over all tokens; exit when it is >= `tau`.
- `variant = "prediction"` (in place of CALM's softmax-based measures, which need class
  probabilities): consecutive exits' eps predictions agree, per-sample RMS difference <= `tau`.
  This runs the exit head after every block; the exiting prediction is the one already computed.

Differs from the paper: no calibration of `tau` (CALM picks it with Learn-then-Test to guarantee a
consistency level; here `tau` is swept to draw a curve), and the saturation check cannot fire after
the first block (there is no earlier block's state to compare with). The heads are AdaDiff's (set
`checkpoint` to an AdaDiff checkpoint), so CALM needs no training of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import Bounds, knob
from adadiff_bench.methods.prefix_exit import PrefixExit, PrefixParams, rms_distance
from adadiff_bench.methods.registry import register_method

from ._rows import ActiveRows

VARIANTS = ("state", "prediction")


@dataclass
class CalmParams(PrefixParams):
    variant: str = knob("state", "confidence measure: \"state\" (cosine similarity of consecutive hidden states) "
                                 "or \"prediction\" (RMS difference of consecutive exits' eps)", choices=VARIANTS)
    tau: float = knob(0.99, "exit threshold: similarity >= tau (state) or RMS difference <= tau (prediction)",
                      bounds_by=("variant", {"state": Bounds(-1.0, 1.0), "prediction": Bounds(0.0)}))

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.variant not in VARIANTS:
            raise UserError(f"{where}: variant must be 'state' or 'prediction' (got {self.variant!r})")
        if self.variant == "state" and not -1.0 <= self.tau <= 1.0:
            raise UserError(f"{where}: with variant 'state', tau is a cosine similarity in [-1, 1] (got {self.tau})")
        if self.variant == "prediction" and self.tau < 0:
            raise UserError(f"{where}: with variant 'prediction', tau is an RMS distance >= 0 (got {self.tau})")


@register_method
class Calm(PrefixExit):
    name = "calm"
    family = "early-exit"
    Params = CalmParams

    def begin(self, x, t, y, ctx):
        self.previous = None  # last exit point's state or prediction, for all rows of the batch
        self.batch_size = len(x)
        self.rows = ActiveRows(len(x))

    def policy(self, exit_point, tokens, state, t, active):
        if self.params.variant == "state":
            current, predictions = tokens, None  # (the similarity is a reduction, like a norm: not counted)
        else:
            current = predictions = self.predict(exit_point, tokens, state, active)
        rows = self.rows(active, current.device)
        if self.previous is None:  # nothing to compare with yet: nobody exits (a host mask, no GPU read)
            self.previous = torch.zeros(self.batch_size, *current.shape[1:], dtype=current.dtype, device=current.device)
            exiting = torch.zeros(len(active), dtype=torch.bool, device="cpu")
        elif self.params.variant == "state":
            exiting = F.cosine_similarity(current.flatten(1), self.previous[rows].flatten(1), dim=1) >= self.params.tau
        else:
            exiting = rms_distance(current, self.previous[rows]) <= self.params.tau
        self.previous[rows] = current.to(self.previous.dtype)
        return exiting if predictions is None else (exiting, predictions)
