"""Why exits pay off less on a GPU than their MACs say: how busy the GPU is, and what the host does per step.

For `full` and an exit method on the same model, batch and precision, one sampling run under torch.profiler
(after a warm-up run) gives, per sampling step:

- wall ms: the run's time between synchronisations, over its steps;
- GPU busy ms: the summed duration of the kernels and copies the GPU ran (one stream: they do not overlap);
- busy share: GPU busy / wall. Well below 1 means the GPU waits on the host: launches, Python, and the
  host reads that stop the host from queueing work ahead (each exit decision reads a mask on the host);
- kernels, host syncs (cudaStreamSynchronize and friends) and aten ops per step.

A method whose GPU busy time falls by its MACs ratio but whose wall time does not is bound by the host, not
by the arithmetic it skips. On the CPU (`--dry-run`) there are no kernels: it checks the code paths only.

    python benchmarks/gpu_profile.py --device cuda     # about 2 minutes on an H200 (3 batch sizes)
    python benchmarks/gpu_profile.py --dry-run         # on the CPU, tiny sizes
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import ADADIFF, BASE, SOLVER, UVIT_S2, markdown_table, on_device, sampler, write_report  # noqa: E402

from adadiff_bench.checkpoints import build_model, load_model  # noqa: E402
from adadiff_bench.device import device_name, resolve_device  # noqa: E402
from adadiff_bench.errors import UserError  # noqa: E402
from adadiff_bench.harness import Cell  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
HEADER = ["model", "method", "setting", "precision", "batch", "wall ms/step", "GPU busy ms/step", "busy share",
          "kernels/step", "host syncs/step", "aten ops/step"]


def is_device_event(event) -> bool:
    return getattr(event.device_type, "name", str(event.device_type)) in ("CUDA", "PrivateUse1")


def profile_run(run, device: torch.device) -> tuple[float, list]:
    """(wall seconds, profiler events) of one call of `run` after a warm-up call."""
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with warnings.catch_warnings(), profile(activities=activities) as prof:
        warnings.simplefilter("ignore")  # (torch's note that a profiler cycle keeps only its own events)
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        wall = time.perf_counter() - start
    return wall, list(prof.events())


def row(model_label: str, cell: Cell, setting: str, model, batch: int, precision: str, device) -> list[str]:
    wall, events = profile_run(sampler(cell, model, batch, precision), device)
    steps = cell.num_steps
    busy_us = sum(e.time_range.elapsed_us() for e in events if is_device_event(e))
    kernels = sum(1 for e in events if e.name in LAUNCH_CALLS)
    syncs = sum(1 for e in events if e.name in SYNC_CALLS)
    aten = sum(1 for e in events if e.name.startswith("aten::") and not is_device_event(e))
    wall_ms = wall * 1e3 / steps
    busy_ms = busy_us / 1e3 / steps
    print(f"[gpu_profile] {model_label} {cell.method} {setting} {precision} batch {batch}: wall {wall_ms:.2f} ms/step, "
          f"GPU busy {busy_ms:.2f}, {kernels / steps:.0f} kernels, {syncs / steps:.1f} syncs", file=sys.stderr,
          flush=True)
    return [model_label, cell.method, setting, precision, str(batch), f"{wall_ms:.3f}", f"{busy_ms:.3f}",
            f"{busy_ms / wall_ms:.2f}", f"{kernels / steps:.0f}", f"{syncs / steps:.1f}", f"{aten / steps:.0f}"]


def batch_rows(batch: int, digits, s2, digits_steps: int, s2_steps: int, device) -> list[list[str]]:
    """`full` and AdaDiff (threshold 0 and 0.2) on the digits model; `full` and random exits on the U-ViT-S/2."""
    def adadiff(threshold):
        return Cell("adadiff", (("checkpoint", str(ADADIFF)), ("threshold", threshold)), SOLVER, digits_steps, 0)

    rows = [row("digits U-ViT", Cell("full", (), SOLVER, digits_steps, 0), "", digits, batch, "fp32", device),
            row("digits U-ViT", adadiff(0.0), "threshold 0", digits, batch, "fp32", device),
            row("digits U-ViT", adadiff(0.2), "threshold 0.2", digits, batch, "fp32", device)]
    for precision in ("fp32", "bf16"):
        rows += [row("U-ViT-S/2 random", Cell("full", (), SOLVER, s2_steps, 0), "", s2, batch, precision, device),
                 row("U-ViT-S/2 random", Cell("random-exit", (("layer_ratio", 0.6),), SOLVER, s2_steps, 0),
                     "layer ratio 0.6", s2, batch, precision, device)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the code paths only")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda; cpu with --dry-run)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 16 64 256; 2 with --dry-run")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device or ("cpu" if args.dry_run else "cuda"), "--device")
    except UserError as error:
        print(f"gpu_profile: error: {error}", file=sys.stderr)
        return 2
    batches = args.batch_sizes or ([2] if args.dry_run else [16, 64, 256])
    if min(batches) < 1:
        print(f"gpu_profile: error: --batch-sizes must be positive (got {batches})", file=sys.stderr)
        return 2
    digits_steps, s2_steps = (2, 2) if args.dry_run else (25, 10)
    s2_config = dataclasses.replace(UVIT_S2, embed_dim=32, depth=2, num_heads=2) if args.dry_run else UVIT_S2
    digits, _ = on_device(load_model(BASE).eval(), device)
    torch.manual_seed(0)
    s2, _ = on_device(build_model(s2_config).eval(), device)
    rows = [r for batch in batches for r in batch_rows(batch, digits, s2, digits_steps, s2_steps, device)]
    dry = ", DRY RUN: no number here means anything" if args.dry_run else ""
    title = (f"**Where a GPU's time goes** ({device}, {device_name(device)}{dry}; digits {digits_steps} steps, "
             f"U-ViT-S/2 {s2_steps} steps, {SOLVER}; one profiled sampling run after a warm-up, per sampling step)")
    print(write_report(args.out, [title, markdown_table(HEADER, rows, 4)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
