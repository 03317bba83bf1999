"""`pabee`: patience-based early exit (Zhou et al., "BERT Loses Patience", NeurIPS 2020).

PABEE runs an internal classifier after every layer and exits once `p` consecutive classifiers
agree. For eps regression, as the paper's own regression variant does, two consecutive exits
"agree" when their predictions differ by less than a threshold: here the per-sample RMS
difference <= `delta`. The counter resets whenever a pair disagrees; a sample exits after the
`p`-th agreeing pair in a row, with the last prediction (already computed, not recomputed).

Runs the exit head after every block (that cost is logged). The heads are AdaDiff's shared or per-exit
heads when `checkpoint` is an AdaDiff checkpoint. Differs from the paper: PABEE trains the internal
classifiers jointly with the backbone; here they are the heads of the checkpoint, trained by AdaDiff.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.prefix_exit import PrefixExit, PrefixParams, rms_distance
from adadiff_bench.methods.registry import register_method

from ._rows import ActiveRows


@dataclass
class PabeeParams(PrefixParams):
    patience: int = knob(2, "agreeing consecutive exit pairs in a row before a sample exits", at_least=1)
    delta: float = knob(0.1, "two consecutive exits agree when their eps differ by at most this RMS distance",
                        at_least=0)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.patience < 1:
            raise UserError(f"{where}: patience must be >= 1 agreeing pairs (got {self.patience})")
        if self.delta < 0:
            raise UserError(f"{where}: delta is an RMS distance and must be >= 0 (got {self.delta})")


@register_method
class Pabee(PrefixExit):
    name = "pabee"
    family = "early-exit"
    Params = PabeeParams

    def begin(self, x, t, y, ctx):
        self.previous = torch.zeros_like(x)                                      # last exit's eps, per row of the batch
        self.agreeing = torch.zeros(len(x), dtype=torch.long, device=x.device)  # consecutive agreeing pairs so far
        self.rows = ActiveRows(len(x))

    def policy(self, exit_point, tokens, state, t, active):
        predictions = self.predict(exit_point, tokens, state, active)
        rows = self.rows(active, predictions.device)
        if exit_point > 1:
            agree = rms_distance(predictions, self.previous[rows]) <= self.params.delta
            self.agreeing[rows] = torch.where(agree, self.agreeing[rows] + 1, 0)
        self.previous[rows] = predictions.to(self.previous.dtype)  # (autocast may hand a lower precision)
        return self.agreeing[rows] >= self.params.patience, predictions
