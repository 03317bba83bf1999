"""`oracle`: exit at the first block whose eps is within `tau` of the full-depth eps. A ceiling, not a method.

It first runs the whole network to know the answer, then exits every sample at the first exit point
whose prediction has per-sample RMS error <= `tau` against that full-depth eps. No uncertainty
estimator can choose better exits at that layer ratio, so its FID at a layer ratio is the bound an
estimator could reach with the same heads (an AdaDiff checkpoint's, via `checkpoint`).

Cost, logged as executed: the full pass (as extra MACs), then the blocks up to the exit and the head
at every exit point. Its `layer_ratio` is that of its exits; its GFLOPs are the real ones, higher than
`full`'s. Rows are marked `ceiling = True` and reports label them as such; it is never timed against
other methods as a competitor.
"""
from __future__ import annotations

from dataclasses import dataclass

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.flops import unit_costs
from adadiff_bench.methods.prefix_exit import PrefixExit, PrefixParams, rms_distance
from adadiff_bench.methods.registry import register_method

from ._rows import ActiveRows


@dataclass
class OracleParams(PrefixParams):
    tau: float = knob(0.1, "exit at the first block whose eps is within this RMS error of the full-depth eps",
                      at_least=0)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.tau < 0:
            raise UserError(f"{where}: tau is an RMS error and must be >= 0 (got {self.tau})")


@register_method
class Oracle(PrefixExit):
    name = "oracle"
    family = "early-exit"
    Params = OracleParams
    ceiling = True

    def start_batch(self, log) -> None:
        super().start_batch(log)
        self.full_macs = unit_costs(self.backbone).full  # (measured here, not under the sampling loop's autocast)

    def begin(self, x, t, y, ctx):
        self.target = self.backbone(x, t, y)  # the full-depth answer a real method cannot know
        self.log.add_macs(self.full_macs)
        self.rows = ActiveRows(len(x))

    def policy(self, exit_point, tokens, state, t, active):
        predictions = self.predict(exit_point, tokens, state, active)
        target = self.target[self.rows(active, predictions.device)]
        return rms_distance(predictions, target) <= self.params.tau, predictions
