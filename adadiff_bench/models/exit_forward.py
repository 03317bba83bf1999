"""The one exit-aware forward every early-exit method uses.

It runs a backbone block by block through the backbone interface. After each exit point an exit
policy names the samples that exit there; their hidden states go through the head once, and the
rest of the batch carries on as a smaller batch (the blocks' state, e.g. U-ViT's long skips, is
compacted alike). A sample that has exited computes
nothing more, so the savings are real compute, and every block, head and policy call is written
to the step log.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..steplog import StepLog
from .backbone import Backbone, BlockState


class ExitPolicy(Protocol):
    """Decides, after exit point `exit_point` (= blocks run so far), which active samples exit."""

    def __call__(self, exit_point: int, tokens: torch.Tensor, state: BlockState, t: torch.Tensor,
                 active: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Boolean mask over the active samples (True = exit now). `active` are their rows in the batch,
        `tokens`, `state` and `t` theirs only.

        A policy that decides from the exit's own eps prediction (and logged that head call) returns
        (mask, predictions of all active samples): the exiting ones are taken from it, not recomputed.
        """
        ...


class ExitHeads(Protocol):
    def __call__(self, exit_point: int, tokens: torch.Tensor, state: BlockState) -> torch.Tensor:
        """eps prediction from the hidden state after `exit_point` blocks (`state`: those samples' block state)."""
        ...


def shared_head(model: Backbone) -> ExitHeads:
    """Every exit goes through the backbone's own final head (the official AdaDiff code)."""
    return lambda exit_point, tokens, state: model.head(tokens, state)


def exit_aware_forward(model: Backbone, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                       policy: ExitPolicy, log: StepLog, heads: ExitHeads | None = None) -> torch.Tensor:
    """eps for a batch where each sample stops at the first exit point its policy chooses."""
    heads = heads or shared_head(model)
    num_blocks = model.num_blocks
    eps = torch.empty_like(x)
    active = torch.arange(len(x))
    tokens, state = model.begin(x, t, y)
    log.ran_embed()
    for block in range(num_blocks):
        tokens = model.run_block(block, tokens, state)
        log.ran_block(block, active)
        exit_point = block + 1
        if exit_point == num_blocks:
            exiting = torch.ones(len(active), dtype=torch.bool)
        else:
            exiting = policy(exit_point, tokens, state, t[active], active)
        predictions = None
        if isinstance(exiting, tuple):
            exiting, predictions = exiting
        if exiting.any():
            rows = active[exiting]
            if predictions is None:
                eps[rows] = heads(exit_point, tokens[exiting], state.subset(exiting))
                log.ran_head(rows)
            else:
                eps[rows] = predictions[exiting]
            log.exited(exit_point, rows)
            staying = ~exiting
            active, tokens, state = active[staying], tokens[staying], state.subset(staying)
        if len(active) == 0:
            break
    return eps
