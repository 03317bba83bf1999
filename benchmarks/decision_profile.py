"""Where does the time of an exit-aware forward go? Each part's share of a sampling run, `full` beside `adadiff`.

The parts are wrapped from outside (nothing in the suite changes) and timed with perf_counter, each
counting its own time only (a part's time excludes the parts it calls):

- blocks, embed, head: the backbone's `run_block`, `begin`, `head` (exit heads included);
- estimator: AdaDiff's uncertainty estimator (`scalar`, or the `raw_on_host` that sampling calls, its read
  of the result included), and mask: the host's map of its raw values and the threshold rule
  (`uncertainty_of_raw`, `exits`; the one-`max` "nobody passes" test counts as glue);
- compaction: the blocks' state shrinking to the samples still running (`SkipStack.subset`);
- step log: every StepLog record; solver: the scheduler's step;
- forward glue: the rest of the denoiser call (the policy's closure, reading the mask on the host,
  index arithmetic, Python); deciding = estimator + mask + compaction + forward glue.

Shares of a few percent move with the shared machine's load, so each setting also gets a count that does
not: the aten ops per sampling step (one run, counted below autograd). After a block has filled the caches
every op pays a cold start several times its warm cost (the last line of each batch: one small op timed
right after each block of a forward, again at once, and in a loop), so on this CPU the op count, not the
arithmetic, prices a decision.

Threshold 0 is the calibration setting: nothing exits before the last block, so everything adadiff
spends beyond `full` is the price of deciding. On a GPU the shares mean little (kernels run
asynchronously); this is a CPU tool.

    python benchmarks/decision_profile.py --batch-sizes 64 1
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adadiff_bench import diffusion, steplog
from adadiff_bench.checkpoints import cached_checkpoint, load_model
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.models import uvit

STEP_LOG_RECORDS = ("ran_embed", "ran_block", "ran_head", "exited", "add_macs", "ran_full", "ran_depth", "ran_prefixes")


class PartClock:
    """Exclusive wall-clock time per labelled part (a part's time excludes the parts it calls)."""

    def __init__(self):
        self.seconds = collections.Counter()
        self._stack: list[str] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # (a record this version of the suite does not have)
            return
        clock = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            clock._stack.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                clock._stack.pop()
                spent = time.perf_counter() - start
                clock.seconds[label] += spent
                if clock._stack:
                    clock.seconds[clock._stack[-1]] -= spent

        setattr(owner, name, timed)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(cell: Cell, model, batch: int, method) -> float:
    """aten ops per sampling step of one run of `batch` samples."""
    with OpCounter() as counter:
        generate(cell, model, batch, batch, method=method)
    return counter.ops / cell.num_steps


def cold_start(model, batch: int, forwards: int = 20) -> tuple[float, float, float]:
    """Median microseconds of one small op (an add on 64 floats) run right after each block of a forward, run
    again at once, and run in a loop with nothing between: what a decision's every op pays after a block."""
    x, t = torch.randn(batch, model.in_chans, model.img_size, model.img_size), torch.full((batch,), 500.0)
    probe = torch.zeros(64)
    after_block, again = [], []
    with torch.no_grad():
        for _ in range(forwards):
            tokens, state = model.begin(x, t, None)
            for block in range(model.num_blocks):
                tokens = model.run_block(block, tokens, state)
                start = time.perf_counter()
                probe.add(1)
                middle = time.perf_counter()
                probe.add(1)
                after_block.append(middle - start)
                again.append(time.perf_counter() - middle)
        in_loop = []
        for _ in range(len(after_block)):
            start = time.perf_counter()
            probe.add(1)
            in_loop.append(time.perf_counter() - start)
    return tuple(float(np.median(times)) * 1e6 for times in (after_block, again, in_loop))


def instrument(clock: PartClock, estimator_class) -> None:
    from adadiff_bench.methods.adadiff.method import AdaDiff
    from adadiff_bench.methods.full import Full

    clock.wrap(uvit.UViT, "run_block", "blocks")
    clock.wrap(uvit.UViT, "begin", "embed")
    clock.wrap(uvit.UViT, "head", "head")
    clock.wrap(uvit.UViTHead, "forward", "head")
    clock.wrap(estimator_class, "scalar", "estimator")
    clock.wrap(estimator_class, "raw_on_host", "estimator")  # (what sampling calls)
    clock.wrap(estimator_class, "uncertainty_of_raw", "mask")
    clock.wrap(AdaDiff, "exits", "mask")
    clock.wrap(uvit.SkipStack, "subset", "compaction")
    for record in STEP_LOG_RECORDS:
        clock.wrap(steplog.StepLog, record, "step log")
    for scheduler_class, _ in diffusion.SOLVER_SETTINGS.values():
        clock.wrap(scheduler_class, "step", "solver")
    clock.wrap(AdaDiff, "__call__", "forward glue")
    clock.wrap(Full, "__call__", "forward glue")


def profile(cell: Cell, model, batch: int, clock: PartClock, images: int) -> tuple[float, dict[str, float], float]:
    """(seconds per image, share of each part in the sampling run, aten ops per step) over about `images` images."""
    method = build_method(cell, model)
    generate(cell, model, batch, batch, method=method)  # warm-up
    clock.seconds.clear()
    runs = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(runs):
        generate(cell, model, batch, batch, method=method)
    total = time.perf_counter() - start
    shares = {label: seconds / total for label, seconds in clock.seconds.items()}
    shares["other (sampling loop)"] = 1 - sum(shares.values())
    return total / runs / batch, shares, ops_per_step(cell, model, batch, method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/adadiff_digits_finetuned.pt")
    parser.add_argument("--base", default="checkpoints/uvit_digits.pt")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--images", type=int, default=192, help="images per setting (several runs at small batches)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.base)
    clock = PartClock()
    instrument(clock, type(cached_checkpoint(args.checkpoint).estimator))
    cells = {"full": Cell("full", (), "dpm-solver++", 25, 0),
             f"adadiff t={args.threshold:g}": Cell("adadiff", (("checkpoint", args.checkpoint),
                                                                ("threshold", args.threshold)), "dpm-solver++", 25, 0)}
    print(f"threads={args.threads} dpm-solver++ 25 steps; share of each part in a sampling run (exclusive time)")
    for batch in args.batch_sizes:
        results = {name: profile(cell, model, batch, clock, max(args.images, batch)) for name, cell in cells.items()}
        labels = sorted({label for _, shares, _ in results.values() for label in shares},
                        key=lambda label: -results[next(iter(results))][1].get(label, 0))
        print(f"\nbatch {batch}: " + ", ".join(f"{name} {seconds * 1e3:.2f} ms/image, {ops:.0f} aten ops/step"
                                               for name, (seconds, _, ops) in results.items()))
        print("| part | " + " | ".join(results) + " |")
        print("|---|" + "---:|" * len(results))
        for label in labels:
            print(f"| {label} | " + " | ".join(f"{shares.get(label, 0) * 100:.1f}%" for _, shares, _ in results.values()) + " |")
        deciding = [sum(shares.get(k, 0) for k in ("estimator", "mask", "compaction", "forward glue"))
                    for _, shares, _ in results.values()]
        print("| deciding (estimator + mask + compaction + glue) | " + " | ".join(f"{d * 100:.1f}%" for d in deciding) + " |",
              flush=True)
        first, second, alone = cold_start(model, batch)
        print(f"a 64-float add right after a block: {first:.1f} us; again at once: {second:.1f} us; in a loop: "
              f"{alone:.1f} us (medians)", flush=True)


if __name__ == "__main__":
    main()
