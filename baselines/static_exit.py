"""`static-exit`: every sample, at every sampling step, exits after block k.

The fixed-depth baseline that reviewers asked AdaDiff for (Tang et al., ECCV 2024 compare against
it as "static" exiting): the same exit heads as AdaDiff, no estimator, no decision. Its curve comes
from sweeping `k`; the layer ratio is exactly k / num_blocks.

Knobs: `k` (exit point, 1..num_blocks), `checkpoint` (see `PrefixExit`: "" = the base model's own
final head at block k; an AdaDiff checkpoint = its backbone and exit heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.methods.prefix_exit import PrefixExit, PrefixParams, backbone_of
from adadiff_bench.methods.registry import register_method


@dataclass
class StaticExitParams(PrefixParams):
    k: int = knob(9, "the exit point: blocks run before every sample exits at every step", at_least=1,
                  valid="at most the model's number of blocks")

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.k < 1:
            raise UserError(f"{where}: k must be an exit point >= 1 (blocks run before exiting; got {self.k})")


@register_method
class StaticExit(PrefixExit):
    name = "static-exit"
    family = "early-exit"
    fixed_exit_point = True  # (k sets the exit: nothing decides)
    Params = StaticExitParams

    @classmethod
    def check(cls, params, model, where):
        super().check(params, model, where)
        num_blocks = backbone_of(params.checkpoint, model).num_blocks
        if params.k > num_blocks:
            raise UserError(f"{where}: k = {params.k} exceeds the model's {num_blocks} blocks; pick k in 1..{num_blocks}")

    def policy(self, exit_point, tokens, state, t, active):  # decided on the host: no GPU read
        return torch.full((len(active),), exit_point >= self.params.k, dtype=torch.bool, device="cpu")
