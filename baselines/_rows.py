"""Batch rows kept on the host, as indices into state on the model's device (a helper: registers no method).

The exit-aware forward and the step log hold batch rows on the host. A baseline that indexes its own
per-sample tensors (on the model's device) with them copies them over once, pinned and without waiting
on a GPU; indexing a GPU tensor with host rows directly would copy and synchronise at every call.
"""
from __future__ import annotations

import torch

from adadiff_bench.device import rows_on


class ActiveRows:
    """The exit-aware forward's active rows (a host tensor) as an index into per-batch state on the device:
    all of it (no copy, no gather) while the whole batch runs, then the rows' device copy, made once each
    time the batch shrinks (the forward hands the same `active` to every policy call until then)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.active: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def __call__(self, active: torch.Tensor, device: torch.device) -> torch.Tensor | slice:
        if len(active) == self.batch_size:
            return slice(None)
        if active is not self.active:
            self.active, self.index = active, rows_on(active, device)
        return self.index
