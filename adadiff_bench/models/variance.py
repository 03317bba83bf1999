"""The learned variance of a learned-sigma network (DiT-XL/2's second half of output channels), on its way from
whichever head produced a sample's eps to the sampler that steps with it.

A method returns eps only, and decides per sample which head runs (an exit head after block k, the final one,
a shallow model's, or none on a step that reuses eps). The sampler of the DiT paper's FID (DDPM with
`variance_type = "learned_range"`) also needs, for every sample, the variance the same head predicted. So the
sampler opens a `VarianceSink` around each network evaluation, every learned-sigma head stores its variance
half there for the batch rows it computed (`store(rows, variance)`), and the sampler reads one variance per
row. A row no head computed in this evaluation keeps the variance of its last head output (a method that
reuses eps reuses the variance that came with it). Guidance's unconditional pass stores nothing (`ignored`):
the variance is the conditional pass's, as in DiT's own `forward_with_cfg`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ..errors import UserError


class VarianceSink:
    """One batch's learned variance, per row, across the network evaluations of a sampling run."""

    def __init__(self, batch: int):
        self.batch = batch
        self.values: torch.Tensor | None = None

    def store(self, rows: torch.Tensor | None, variance: torch.Tensor) -> None:
        if self.values is None:
            self.values = torch.full((self.batch, *variance.shape[1:]), float("nan"), device=variance.device)
        if rows is None:
            rows = torch.arange(self.batch, device=variance.device)
        self.values[rows] = variance.float()

    def read(self) -> torch.Tensor:
        """Every row's variance (float32); refused in one line when some row's eps came from no head."""
        if self.values is None or torch.isnan(self.values).flatten(1).any(1).any():
            raise UserError("the learned-variance sampler (ddpm-learned) got eps without a learned variance for some "
                            "samples: the network predicts no variance (learned sigma), or the method made eps without "
                            "running a head; use solver = \"ddpm\" (fixed variance)")
        return self.values


_SINK: ContextVar[VarianceSink | None] = ContextVar("variance_sink", default=None)


@contextmanager
def collecting(sink: VarianceSink | None) -> Iterator[None]:
    """Heads that run inside store their variance in `sink` (None: nowhere)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


@contextmanager
def ignored() -> Iterator[None]:
    """Heads that run inside store nothing (guidance's unconditional pass)."""
    with collecting(None):
        yield


def store(rows: torch.Tensor | None, variance: torch.Tensor) -> None:
    """A head's variance half for batch `rows` (None: the whole batch), kept when a sampler collects it."""
    sink = _SINK.get()
    if sink is not None:
        sink.store(rows, variance)
