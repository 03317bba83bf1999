"""Peak memory of one piece of work: `peak_mem_mb` in the results.

On CUDA: the peak of torch's allocated device memory (`torch.cuda.max_memory_allocated`, reset
first). On the CPU: the process's peak resident set size (Linux `VmHWM`), reset first by writing
"5" to /proc/self/clear_refs, so each cell reports its own peak. The CPU figure is the whole
process's resident memory (interpreter, torch, model, data and the cell's own tensors), not the
cell's increment. Where the reset is not allowed the counter is the process's lifetime peak, and
`kind` says so.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

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
