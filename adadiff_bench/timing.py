"""The wall-clock protocol every cell uses.

A separate timed pass (not the sampling that feeds the metrics): warm-up first, a fixed thread
count, then `repeats` rounds that alternate the reference and the cell (A B A B ...), so drifts of
a shared machine hit both alike. Reported: the median time per image, its interquartile range,
and `speedup` = median(reference) / median(cell). On CUDA each call is timed with CUDA events
between synchronisations (kernels run asynchronously, so a host clock alone would stop early).

Alternating protects a ratio from slow drifts, not a time from a machine that is busy throughout, so the
pass also records how many cores other processes kept busy while it ran (`timing_other_cores`, from the
kernel's CPU counters minus this process's own CPU time; Linux only, NaN elsewhere). On a small machine this
matters more than it looks: beside a 2-thread training, 2-thread sampling on 2 cores ran 25-60x slower.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class Timing:
    time_per_image_s: float
    time_per_image_s_iqr: float
    reference_time_per_image_s: float
    speedup: float
    timing_repeats: int
    timing_num_samples: int  # images in each timed call
    timing_other_cores: float = math.nan  # cores other processes kept busy, on average, during the timed calls


def time_once(fn: Callable[[], None], num_images: int, device: torch.device = torch.device("cpu")) -> float:
    """Seconds per image of one call of `fn` (CUDA events on a CUDA device, perf_counter otherwise)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / num_images  # elapsed_time is in ms
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) / num_images


def cpu_counters() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has spent busy since boot, CPU seconds this process has used), or None
    where the kernel does not say (no /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
        ticks = [int(value) for value in fields[1:9]]
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if fields[:1] != ["cpu"] or len(ticks) < 8:
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cores(before: tuple[float, float] | None, after: tuple[float, float] | None, seconds: float) -> float:
    """Cores that other processes kept busy, on average, over `seconds` between two `cpu_counters` readings."""
    if before is None or after is None or seconds <= 0:
        return math.nan
    machine, own = after[0] - before[0], after[1] - before[1]
    return max(machine - own, 0.0) / seconds


def iqr(values: list[float]) -> float:
    q75, q25 = np.percentile(values, [75, 25])
    return float(q75 - q25)


def measure(cell: Callable[[], None], reference: Callable[[], None] | None, num_images: int, repeats: int,
            warmup: Callable[[], None] | None = None, device: torch.device = torch.device("cpu"),
            progress: bool = False, desc: str = "time") -> Timing:
    """Interleaved timing of `cell` against `reference` (None when the cell is the reference).

    With `progress`, a bar on stderr counts the timed calls (each of `num_images` images)."""
    if warmup is not None:
        warmup()
    cell_times, reference_times = [], []
    calls = repeats * (1 if reference is None else 2)
    counters, started = cpu_counters(), time.perf_counter()
    with tqdm(total=calls, desc=desc, disable=not progress, leave=False, unit="call") as bar:
        for _ in range(repeats):
            if reference is not None:
                reference_times.append(time_once(reference, num_images, device))
                bar.update()
            cell_times.append(time_once(cell, num_images, device))
            bar.update()
    busy_elsewhere = other_cores(counters, cpu_counters(), time.perf_counter() - started)
    cell_median = float(np.median(cell_times))
    reference_median = float(np.median(reference_times)) if reference is not None else cell_median
    return Timing(cell_median, iqr(cell_times), reference_median, reference_median / cell_median, repeats,
                  num_images, busy_elsewhere)
