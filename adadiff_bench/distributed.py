"""Several processes sampling one run (torchrun): shards by sample index, gathers to rank 0, one writer.

    torchrun --nproc_per_node=N -m adadiff_bench run --config configs/demo.toml

Each sample draws its noise from its own generator seeded by (seed, index), so which process samples
which index changes no image: rank r samples the batches r, r + N, r + 2N, ... of a cell, and rank 0
gathers the images and step-log rows, computes the metrics and writes the results; the other ranks
write nothing. Processes talk over the gloo backend on the CPU (nccl on CUDA, each rank on cuda:LOCAL_RANK). Without torchrun's
environment (WORLD_SIZE unset or 1) everything runs in one process and nothing here is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def my_batches(self, starts: list[int]) -> list[int]:
        """The batch starts this process samples: every size-th batch, from its rank."""
        return starts[self.rank::self.size]

    def gather(self, item):
        """Every rank's `item`, in rank order, on every rank (a list of one item without torchrun)."""
        if not self.active:
            return [item]
        items = [None] * self.size
        dist.all_gather_object(items, item)
        return items

    def broadcast(self, item):
        """Rank 0's `item` on every rank."""
        if not self.active:
            return item
        box = [item]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def join_world(cuda: bool = False) -> World:
    """Join torchrun's process group when launched by it (nccl when the run is on CUDA, else gloo);
    a one-process world otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        if cuda:  # each rank on its own GPU: cuda:LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def leave_world(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def agree(world: World, decide):
    """Run `decide()` on rank 0 and hand its result, or its UserError, to every rank.

    Keeps every process on the same path: a bad input found by rank 0 stops all ranks with the same
    one-line error instead of leaving the others waiting.
    """
    outcome = None
    if world.is_main:
        try:
            outcome = ("ok", decide())
        except UserError as exc:
            outcome = ("error", str(exc))
    outcome = world.broadcast(outcome)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]
