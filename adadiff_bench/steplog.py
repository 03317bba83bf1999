"""The step log: per sample and sampling step, which blocks ran and where the method exited.

Every method writes what it executed here; FLOPs, layer ratio and the per-timestep histograms are
all derived from it, so the savings of every family are counted in one place. The log only records:
the sampling loop points it at the batch and step being sampled, and methods learn where they are
from the sampling context (`diffusion.SamplingContext`), never from the log.

Conventions: blocks are numbered in execution order (in-blocks, mid-block, out-blocks); the exit
point of a prefix-exiting method is the number of blocks it ran (1..num_blocks, num_blocks = full
depth); methods that do not exit by prefix (caching, skipping) leave it at -1.

Under classifier-free guidance each sampling step runs the network twice, once per pass, each pass
with its own method object and its own log: the conditional pass's log holds the unconditional one's
(`unconditional`), `guidance_pass` says which pass a log records, and costs and layer ratio count both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class UnitCosts:
    """MACs per image of each piece of the network for one evaluation (measured with fvcore)."""
    embed: float
    blocks: np.ndarray  # (num_blocks,)
    head: float
    branches: np.ndarray | None = None  # (num_blocks, 3): each block's attn, mlp and skip-fusion part (BRANCHES)

    @property
    def full(self) -> float:
        """MACs of one whole-network evaluation: embed, every block, head."""
        return self.embed + float(self.blocks.sum()) + self.head


GUIDANCE_PASSES = ("single", "conditional", "unconditional")  # no guidance; CFG's two passes


class StepLog:
    def __init__(self, num_samples: int, timesteps: np.ndarray, num_blocks: int, guidance_pass: str = "single"):
        num_steps = len(timesteps)
        self.guidance_pass = guidance_pass
        self.unconditional: StepLog | None = None  # the unconditional pass's log, under guidance
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        self.num_blocks = num_blocks
        self.blocks_run = np.zeros((num_samples, num_steps, num_blocks), dtype=bool)
        self.exit_point = np.full((num_samples, num_steps), -1, dtype=np.int16)
        self.embed_calls = np.zeros((num_samples, num_steps), dtype=np.int16)
        self.head_calls = np.zeros((num_samples, num_steps), dtype=np.int16)
        self.extra_macs = np.zeros((num_samples, num_steps), dtype=np.float64)  # estimators, routers, ...
        self._rows = np.arange(0)
        self._whole_batch: np.ndarray | slice = self._rows  # what `_select(None)` indexes the log's rows with
        self._step = 0

    def add_unconditional_pass(self) -> StepLog:
        """Make this the conditional pass's log and give it a log for the unconditional pass (returned)."""
        self.guidance_pass = "conditional"
        self.unconditional = type(self)(len(self.blocks_run), self.timesteps, self.num_blocks, "unconditional")
        return self.unconditional

    def passes(self) -> list[StepLog]:
        """This log and, under guidance, the unconditional pass's."""
        return [self] if self.unconditional is None else [self, self.unconditional]

    # ---- where records go: set by the sampling loop (methods read the sampling context, not this) ----
    def set_batch(self, rows: np.ndarray) -> None:
        """The run-wide sample indices (rows of the log) of the batch being sampled."""
        self._rows = np.asarray(rows)
        self._whole_batch = _as_slice(self._rows, len(self.blocks_run))
        if self.unconditional is not None:
            self.unconditional.set_batch(rows)

    def set_step(self, step_index: int) -> None:
        self._step = step_index
        if self.unconditional is not None:
            self.unconditional.set_step(step_index)

    # ---- what methods record (`active` selects rows of the current batch; None = all) ------------
    def _select(self, active) -> np.ndarray | slice:
        if active is None:
            return self._whole_batch
        if isinstance(active, torch.Tensor):
            active = active.cpu().numpy()
        return self._rows[active]

    def ran_embed(self, active=None) -> None:
        self.embed_calls[self._select(active), self._step] += 1

    def ran_block(self, block: int, active=None) -> None:
        self.blocks_run[self._select(active), self._step, block] = True

    def ran_prefixes(self, exit_points: np.ndarray, active=None) -> None:
        """Blocks 1..exit_points[i] ran for the i-th selected row (a prefix-exit forward's record of one step)."""
        ran = np.arange(self.num_blocks) < np.asarray(exit_points)[:, None]
        self.blocks_run[self._select(active), self._step, :] |= ran

    def ran_head(self, active=None) -> None:
        self.head_calls[self._select(active), self._step] += 1

    def exited(self, exit_point: int, active=None) -> None:
        self.exit_point[self._select(active), self._step] = exit_point

    def add_macs(self, macs, active=None) -> None:
        """Compute outside the blocks, embedding and head (estimators, routers) for the selected rows
        (`macs`: one amount for all, or an array with one per selected row).

        A negative amount takes back the part of a logged block that did not run (a reused sublayer)."""
        self.extra_macs[self._select(active), self._step] += macs

    def ran_full(self, active=None) -> None:
        """The whole network once, for the selected samples of the batch (None = all)."""
        self.ran_depth(self.num_blocks, active)

    def ran_depth(self, depth: int, active=None) -> None:
        """The embedding, blocks 1..depth and the head once, exiting at `depth`, for the selected samples."""
        rows = self._select(active)
        self.embed_calls[rows, self._step] += 1
        self.blocks_run[rows, self._step, :depth] = True
        self.head_calls[rows, self._step] += 1
        self.exit_point[rows, self._step] = depth

    # ---- moving rows between processes and checkpoints ----------------------------------------------
    ROW_FIELDS = ("blocks_run", "exit_point", "embed_calls", "head_calls", "extra_macs")

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The log's records of the given samples (for a checkpoint or another process); the unconditional
        pass's under `unconditional/<field>`."""
        records = {name: getattr(self, name)[indices] for name in self.ROW_FIELDS}
        if self.unconditional is not None:
            records.update({f"unconditional/{k}": v for k, v in self.unconditional.rows(indices).items()})
        return records

    def set_rows(self, indices: np.ndarray, records: dict[str, np.ndarray]) -> None:
        """Put back records taken with `rows`."""
        for name in self.ROW_FIELDS:
            getattr(self, name)[indices] = records[name]
        if self.unconditional is not None:
            self.unconditional.set_rows(indices, {k.removeprefix("unconditional/"): v for k, v in records.items()
                                                  if k.startswith("unconditional/")})

    # ---- summaries ------------------------------------------------------------------------------
    def layer_ratio(self) -> float:
        """Mean fraction of blocks executed per (sample, step, guidance pass)."""
        return float(np.mean([log.blocks_run.mean() for log in self.passes()]))

    def macs_per_image(self, costs: UnitCosts) -> float:
        """MACs per image of every network evaluation, both guidance passes included."""
        return sum(log._own_macs_per_image(costs) for log in self.passes())

    def _own_macs_per_image(self, costs: UnitCosts) -> float:
        total = (self.embed_calls.sum() * costs.embed + self.head_calls.sum() * costs.head
                 + (self.blocks_run.sum(axis=(0, 1)) * costs.blocks).sum() + self.extra_macs.sum())
        return float(total / len(self.blocks_run))

    def exit_histogram(self) -> np.ndarray:
        """Counts of (sample, step) pairs by exit point 0..num_blocks; index 0 also holds 'no exit'."""
        points = np.clip(self.exit_point, 0, None).ravel()
        return np.bincount(points, minlength=self.num_blocks + 1)

    def exit_points_seen(self) -> np.ndarray:
        """The distinct exit points over every (sample, step) of every guidance pass, sorted (-1: no prefix exit)."""
        return np.unique(np.concatenate([log.exit_point.ravel() for log in self.passes()]))

    def timestep_exit_histogram(self) -> np.ndarray:
        """(num_steps, num_blocks + 1): per timestep, counts of samples by exit point."""
        points = np.clip(self.exit_point, 0, None)
        return np.stack([np.bincount(points[:, s], minlength=self.num_blocks + 1)
                         for s in range(points.shape[1])])

    def timestep_block_fraction(self) -> np.ndarray:
        """(num_steps, num_blocks): per timestep, the fraction of samples that ran each block."""
        return self.blocks_run.mean(axis=0)

    def summaries(self) -> dict[str, np.ndarray]:
        """Per-step histograms of this pass; under guidance the unconditional pass's as `unconditional_<name>`."""
        summaries = {"timesteps": self.timesteps, "exit_histogram": self.exit_histogram(),
                     "timestep_exit_histogram": self.timestep_exit_histogram(),
                     "timestep_block_fraction": self.timestep_block_fraction()}
        if self.unconditional is not None:
            summaries.update({f"unconditional_{k}": v for k, v in self.unconditional.summaries().items()
                              if k != "timesteps"})
        return summaries


def _as_slice(rows: np.ndarray, num_rows: int) -> np.ndarray | slice:
    """Consecutive increasing rows inside the log (a batch of the harness) as a slice: a record of the whole
    batch is then a view of the log, not a gather and a scatter (every network call makes one or several).
    Anything else stays an index array (which also keeps an out-of-range row an error)."""
    if rows.ndim == 1 and len(rows) and np.issubdtype(rows.dtype, np.integer) and 0 <= rows[0] \
            and rows[0] + len(rows) <= num_rows and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return rows


class NullStepLog(StepLog):
    """A step log that follows the sampling loop (batch rows, step) but records nothing.

    Used only to measure what the instrumentation itself costs (benchmarks/instrumentation_overhead.py).
    """

    def __init__(self, num_samples: int, timesteps: np.ndarray, num_blocks: int, guidance_pass: str = "single"):
        super().__init__(0, timesteps, num_blocks, guidance_pass)

    def _select(self, active) -> np.ndarray:
        return self._rows[:0]

    def ran_embed(self, active=None) -> None:
        pass

    def ran_block(self, block: int, active=None) -> None:
        pass

    def ran_head(self, active=None) -> None:
        pass

    def ran_prefixes(self, exit_points, active=None) -> None:
        pass

    def exited(self, exit_point: int, active=None) -> None:
        pass

    def add_macs(self, macs: float, active=None) -> None:
        pass

    def ran_depth(self, depth: int, active=None) -> None:  # (ran_full goes through it)
        pass
