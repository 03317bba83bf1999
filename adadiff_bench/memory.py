"""Peak memory of one piece of work (`peak_mem_mb` in the results), and the memory a cell's samples will take
(`check_sampling_memory`, before anything is sampled).

On CUDA: the peak of torch's allocated device memory (`torch.cuda.max_memory_allocated`, reset
first). On the CPU: the process's peak resident set size (Linux `VmHWM`), reset first by writing
"5" to /proc/self/clear_refs, so each cell reports its own peak. The CPU figure is the whole
process's resident memory (interpreter, torch, model, data and the cell's own tensors), not the
cell's increment. Where the reset is not allowed the counter is the process's lifetime peak, and
`kind` says so.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

from .errors import UserError

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.mb` and `peak.kind`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mb = float("nan")
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda peak allocated"
        else:
            self.kind = "peak resident (process)" if reset_resident_peak() else "peak resident (process lifetime)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = resident_peak_mb()


def reset_resident_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def resident_peak_mb() -> float:
    """The process's peak resident set size in MiB (VmHWM, else getrusage's lifetime maximum)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


# ---- what a cell's samples will hold, checked before sampling --------------------------------------------------

def sampling_bytes(num_samples: int, num_steps: int, num_blocks: int, network_values: int,
                   image_values: int | None = None) -> int:
    """The least memory a cell's samples and step log take (bytes). Per sample: the step log (a flag per block,
    three int16 and a float64 per step); a pixel model's output (`network_values` per image: float32 batches, their
    concatenation and a NaN-free copy, then uint8: 13 bytes a value). A latent model (`image_values` per decoded
    image) holds its float32 latent batches and their concatenation (8 bytes a latent value), then its decoded
    images as uint8, each batch converted as soon as it is decoded (1 byte a value; one batch of float32 images
    at a time is left out)."""
    per_sample = num_steps * (num_blocks + 14)
    if image_values is None:
        return num_samples * (per_sample + 13 * network_values)
    return num_samples * (per_sample + 8 * network_values + image_values)


def machine_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the system does not say."""
    if not hasattr(os, "sysconf"):
        return None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_sampling_memory(num_samples: int, num_steps: int, num_blocks: int, network_values: int,
                          image_values: int | None, where: str, total: int | None = None) -> None:
    """Refuse a cell whose samples and step log cannot fit in `total` bytes (this machine's memory by default)."""
    total = machine_memory_bytes() if total is None else total
    needed = sampling_bytes(num_samples, num_steps, num_blocks, network_values, image_values)
    if total is None or needed <= total:
        return
    what = "their images and step log" if image_values is None else "their latents, decoded images and step log"
    raise UserError(f"{where}: {num_samples} samples at {num_steps} steps need about {needed / 2**30:.0f} GiB for "
                    f"{what}, more than this machine's {total / 2**30:.0f} GiB; lower [sampling] num_samples")
