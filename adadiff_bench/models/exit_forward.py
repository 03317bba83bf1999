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

import numpy as np
import torch

from ..device import rows_on
from ..steplog import StepLog
from .backbone import Backbone, BlockState


class ExitPolicy(Protocol):
    """Decides, after exit point `exit_point` (= blocks run so far), which active samples exit."""

    def __call__(self, exit_point: int, tokens: torch.Tensor, state: BlockState, t: torch.Tensor,
                 active: torch.Tensor) -> torch.Tensor | np.ndarray | tuple[torch.Tensor, torch.Tensor]:
        """Boolean mask over the active samples (True = exit now). `active` are their rows in the batch,
        `tokens`, `state` and `t` theirs only; `active` is a host tensor, the others on the model's device.
        A mask on the host (a numpy array or a CPU tensor) costs no synchronisation (a policy that decides
        without reading the GPU, or one that read what it needed itself).

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
                       policy: ExitPolicy, log: StepLog, heads: ExitHeads | None = None,
                       policy_macs: float = 0.0) -> torch.Tensor:
    """eps for a batch where each sample stops at the first exit point its policy chooses.

    `policy_macs`: MACs of one policy call on one sample (an estimator), logged once per step for
    every call made. What it costs to decide is kept small: at most one host read per block (the
    policy's mask; none when the policy decides on the host), no compaction while nobody leaves,
    and compaction by index (`index_select` with indices copied asynchronously on a GPU).
    """
    heads = heads or shared_head(model)
    last = model.num_blocks
    active = torch.arange(len(x), device="cpu")  # host: the batch rows still running (policies and the log index them)
    exit_at = np.full(len(x), last)         # host: each row's exit point
    eps = None
    tokens, state = model.begin(x, t, y)
    log.ran_embed()
    for block in range(last - 1):
        tokens = model.run_block(block, tokens, state)
        mask, predictions = _decision(policy(block + 1, tokens, state, t, active))
        leaving = _on_host(mask)
        if not leaving.any():
            continue
        gone, kept = np.flatnonzero(leaving), np.flatnonzero(~leaving)
        rows = active[gone]
        eps = _exit(eps, x, block + 1, rows, rows_on(gone, x.device), tokens, state, predictions, heads, log)
        exit_at[rows.numpy()] = block + 1
        if len(kept) == 0:
            break
        stay = rows_on(kept, x.device)
        active, tokens, t, state = active[kept], tokens.index_select(0, stay), t.index_select(0, stay), \
            state.subset(stay)
    else:  # the last block: every sample still running exits through the final head
        tokens = model.run_block(last - 1, tokens, state)
        eps = _exit(eps, x, last, active, None, tokens, state, None, heads, log)
    log.ran_prefixes(exit_at)
    if policy_macs:
        log.add_macs(policy_macs * np.minimum(exit_at, last - 1))
    return eps


def _decision(decision) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask, predictions or None) from what a policy returned."""
    return decision if isinstance(decision, tuple) else (decision, None)


def _on_host(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """The policy's mask as a host array: the block's one synchronisation when the mask is on a GPU."""
    if isinstance(mask, np.ndarray):
        return mask
    return mask.cpu().numpy() if mask.device.type != "cpu" else mask.numpy()


def _exit(eps, x, exit_point, rows, index, tokens, state, predictions, heads, log) -> torch.Tensor:
    """Write the eps of the exiting rows (`index` of the active batch; None = all of it) and log their exit."""
    if predictions is None:
        out = heads(exit_point, tokens if index is None else tokens.index_select(0, index),
                    state if index is None else state.subset(index))
        log.ran_head(rows)
    else:
        out = predictions if index is None else predictions.index_select(0, index)
    log.exited(exit_point, rows)
    if eps is None and len(rows) == len(x):  # the whole batch exits together: no scatter needed
        return out
    eps = torch.empty(x.shape, dtype=out.dtype, device=x.device) if eps is None else eps
    eps[rows_on(rows.numpy(), x.device)] = out.to(eps.dtype)
    return eps
