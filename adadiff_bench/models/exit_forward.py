"""The one exit-aware forward every early-exit method uses.

It runs a backbone block by block through the backbone interface. After each exit point an exit
policy names the samples that exit there; their hidden states go through the head once (a head that
every exit shares runs once per forward, on all the samples that left, wherever they left), and the
rest of the batch carries on as a smaller batch (the blocks' state, e.g. U-ViT's long skips, is
compacted alike). A sample that has exited computes nothing more, so the savings are real compute,
and every block, head and policy call is written to the step log.
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
                 active: torch.Tensor) -> torch.Tensor | np.ndarray | tuple[torch.Tensor, torch.Tensor] | None:
        """Boolean mask over the active samples (True = exit now), or None: none of them exits here (a
        policy that knows it without building a mask saves the forward from testing one). `active` are their
        rows in the batch, `tokens`, `state` and `t` theirs only (read them, never write them); `active` is a
        host tensor, the others on the model's device. A mask on the host (a numpy array or a CPU tensor)
        costs no synchronisation (a policy that decides without reading the GPU, or one that read what it
        needed itself).

        A policy that decides from the exit's own eps prediction (and logged that head call) returns
        (mask, predictions of all active samples): the exiting ones are taken from it, not recomputed.
        """
        ...


class ExitHeads(Protocol):
    def __call__(self, exit_point: int, tokens: torch.Tensor, state: BlockState | None) -> torch.Tensor:
        """eps prediction from the hidden state after `exit_point` blocks (`state`: those samples' block state,
        None where the backbone's head does not read it)."""
        ...


class SharedHead:
    """Every exit goes through one head (the official AdaDiff code: the backbone's final head).

    The exit-aware forward then gathers the samples that exit at different blocks and runs the head on
    them once, at the end of the forward (where the backbone's head does not read the block state)."""
    shared = True

    def __init__(self, head):
        self.head = head

    def __call__(self, exit_point: int, tokens: torch.Tensor, state: BlockState | None) -> torch.Tensor:
        return self.head(tokens, state)


def shared_head(model: Backbone) -> SharedHead:
    """The backbone's own final head at every exit."""
    return SharedHead(model.head)


def exit_aware_forward(model: Backbone, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                       policy: ExitPolicy, log: StepLog, heads: ExitHeads | None = None,
                       policy_macs: float = 0.0) -> torch.Tensor:
    """eps for a batch where each sample stops at the first exit point its policy chooses.

    `policy_macs`: MACs of one policy call on one sample (an estimator), logged once per step for
    every call made. What it costs to decide is kept small: at most one host read per block (the
    policy's mask; none when the policy decides on the host), no compaction while nobody leaves (and no
    mask tested when the policy says so with None), compaction by index (`index_select` with indices copied
    asynchronously on a GPU), one call of a shared head for all the samples of the forward, wherever they
    left, and a batch that leaves all at one exit point logged and finished as one forward of that depth.
    """
    heads = heads or shared_head(model)
    exits = _Exits(model, x, heads, log)
    last = model.num_blocks
    active = _all_rows(len(x))  # host: the batch rows still running (policies and the log index them)
    exit_at = None              # host: each row's exit point, from the first exit on
    tokens, state = model.begin(x, t, y)
    for block in range(last - 1):
        tokens = model.run_block(block, tokens, state)
        decision = policy(block + 1, tokens, state, t, active)
        if decision is None:  # nobody exits here
            continue
        mask, predictions = _decision(decision)
        leaving = _on_host(mask)
        if not leaving.any():
            continue
        if exits.empty and predictions is None and leaving.all():  # the whole batch leaves here, together
            return _whole_batch(model, heads, log, block + 1, tokens, state, policy_macs)
        gone, kept = np.flatnonzero(leaving), np.flatnonzero(~leaving)
        rows = active[gone]
        if exit_at is None:
            exit_at = np.full(len(x), last)
        exits.add(block + 1, rows, rows_on(gone, x.device), tokens, state, predictions)
        exit_at[rows.numpy()] = block + 1
        if len(kept) == 0:
            break
        stay = rows_on(kept, x.device)
        active, tokens, t, state = active[kept], tokens.index_select(0, stay), t.index_select(0, stay), \
            state.subset(stay)
    else:  # the last block: every sample still running exits through the final head
        tokens = model.run_block(last - 1, tokens, state)
        if exits.empty:  # the whole batch ran every block
            return _whole_batch(model, heads, log, last, tokens, state, policy_macs)
        exits.add(last, active, None, tokens, state, None)
    log.ran_embed()
    log.ran_prefixes(exit_at)
    if policy_macs:
        log.add_macs(policy_macs * np.minimum(exit_at, last - 1))
    return exits.eps()


def _whole_batch(model: Backbone, heads: ExitHeads, log: StepLog, exit_point: int, tokens: torch.Tensor,
                 state: BlockState, policy_macs: float) -> torch.Tensor:
    """eps when every sample of the batch leaves at `exit_point` together (the last one included): logged as
    one forward of that depth, and the head run on the tokens as they are (no gathering, no scatter)."""
    log.ran_depth(exit_point)
    if policy_macs:
        log.add_macs(policy_macs * min(exit_point, model.num_blocks - 1))
    return heads(exit_point, tokens, state if model.head_reads_state else None)


_ALL_ROWS: dict[int, torch.Tensor] = {}


def _all_rows(count: int) -> torch.Tensor:
    """torch.arange(count) on the host, made once per batch size: a new one would cost a factory op every
    forward, right after the solver's step (a policy reads `active`, never writes it)."""
    rows = _ALL_ROWS.get(count)
    if rows is None:
        rows = _ALL_ROWS[count] = torch.arange(count, device="cpu")
    return rows


def shared_row_indices() -> dict[int, torch.Tensor]:
    """The host row indices made so far, by batch size (the conformance check makes sure no policy wrote into one)."""
    return dict(_ALL_ROWS)


def _decision(decision) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask, predictions or None) from what a policy returned."""
    return decision if isinstance(decision, tuple) else (decision, None)


def _on_host(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """The policy's mask as a host array: the block's one synchronisation when the mask is on a GPU."""
    if isinstance(mask, np.ndarray):
        return mask
    return mask.cpu().numpy() if mask.device.type != "cpu" else mask.numpy()


class _Exits:
    """The eps of the samples that have left: computed as they leave, or, through a shared head that does not
    read the block state, from their hidden states gathered into one head call at the end of the forward."""

    def __init__(self, model: Backbone, x: torch.Tensor, heads: ExitHeads, log: StepLog):
        self.x, self.heads, self.log, self.last = x, heads, log, model.num_blocks
        self.reads_state = model.head_reads_state
        self.gather = getattr(heads, "shared", False) and not self.reads_state
        self.done: list[tuple[torch.Tensor, torch.Tensor]] = []     # (host batch rows, their eps)
        self.waiting: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host batch rows, their hidden states)

    def add(self, exit_point: int, rows: torch.Tensor, index: torch.Tensor | None, tokens: torch.Tensor,
            state: BlockState, predictions: torch.Tensor | None) -> None:
        """Samples `rows` leave after `exit_point` blocks; `index`: theirs among the active ones (None = all)."""
        def mine(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if index is None else tensor.index_select(0, index)

        if predictions is not None:  # the policy ran their head itself (and logged it)
            self.done.append((rows, mine(predictions)))
        elif self.gather:
            self.waiting.append((rows, mine(tokens)))
            self.log.ran_head(rows)
        else:
            own_state = (state if index is None else state.subset(index)) if self.reads_state else None
            self.done.append((rows, self.heads(exit_point, mine(tokens), own_state)))
            self.log.ran_head(rows)
        self.log.exited(exit_point, rows)

    @property
    def empty(self) -> bool:
        """Nobody has left yet."""
        return not self.done and not self.waiting

    def eps(self) -> torch.Tensor:
        """eps of the whole batch, in its row order."""
        events = len(self.done) + len(self.waiting)
        done = list(self.done)
        if self.waiting:
            rows, hidden = zip(*self.waiting)
            done.append((_joined(rows), self.heads(self.last, _joined(hidden), None)))
        if events == 1 and len(done[0][0]) == len(self.x):  # the whole batch left at once, in order: no scatter
            return done[0][1]
        eps = torch.empty(self.x.shape, dtype=done[0][1].dtype, device=self.x.device)
        for rows, out in done:
            eps[rows_on(rows.numpy(), self.x.device)] = out.to(eps.dtype)
        return eps


def _joined(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
