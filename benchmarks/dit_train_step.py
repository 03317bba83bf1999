"""What does batch invariance cost a DiT's training? Training steps with the batch-invariant kernels and with
torch's own, side by side in one run.

Sampling runs a DiT's conditioning layers as one-row products and its SiLU and tanh GELU from `exp`, so that
a sample's image does not depend on its batch (`adadiff_bench/models/dit.py`). Training needs no such
contract, so while autograd records the DiT uses torch's batched kernels. This benchmark times optimiser
steps of a training config's DiT (its batch size and loss) both ways, back to back (A B A B ...), and prints
each way's median and the median of the pairs' ratios. The invariant way is forced by patching the switch
from outside; nothing in the suite changes.

    python benchmarks/dit_train_step.py --config configs/train_digits_dit.toml
"""
from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import numpy as np
import torch

from adadiff_bench.data import load_dataset
from adadiff_bench.diffusion import alphas_cumprod
from adadiff_bench.models import dit
from adadiff_bench.training import load_train_config, training_task


def step_seconds(task, optimizer, x0, y, invariant: bool) -> float:
    """Wall-clock of one optimiser step (loss, backward, AdamW), with the invariant kernels or torch's."""
    with mock.patch.object(dit, "training", lambda: False) if invariant else contextlib.nullcontext():
        started = time.perf_counter()
        loss = task.loss(x0, y, torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train_digits_dit.toml", help="a training config with [dit]")
    parser.add_argument("--repeats", type=int, default=7, help="pairs of steps timed (after one warm-up pair)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_train_config(args.config)
    if not config.dit:
        parser.error(f"{args.config} has no [dit] table: this benchmark times a DiT's training step")
    task = training_task(config, alphas_cumprod())
    task.model.train()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=config.train.lr)
    data = load_dataset(config.data)  # the first batch of the training data, as a step sees it
    x0, y = data.as_model_input()[:config.train.batch_size], data.labels[:config.train.batch_size]
    step_seconds(task, optimizer, x0, y, True), step_seconds(task, optimizer, x0, y, False)  # warm-up
    pairs = np.array([(step_seconds(task, optimizer, x0, y, True), step_seconds(task, optimizer, x0, y, False))
                      for _ in range(args.repeats)])
    ratios = pairs[:, 0] / pairs[:, 1]
    print(f"{args.config}: batch {config.train.batch_size}, {args.threads} threads, {args.repeats} pairs")
    print(f"  batch-invariant kernels: {np.median(pairs[:, 0]) * 1e3:.0f} ms/step (median)")
    print(f"  torch's kernels:         {np.median(pairs[:, 1]) * 1e3:.0f} ms/step (median)")
    print(f"  ratio invariant / torch's: {np.median(ratios):.2f}x (pairs' median; range "
          f"{ratios.min():.2f}-{ratios.max():.2f})")


if __name__ == "__main__":
    main()
