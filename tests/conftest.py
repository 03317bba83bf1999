"""Shared fixtures: a tiny U-ViT checkpoint and a tiny run config, so that tests stay fast; and the helpers
that drive a method by hand (a sampling context) and recompute a U-ViT independently of the backbone
interface (plain module calls with an explicit skip list), so that tests check the interface against it."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.diffusion import SamplingContext, sample_generators
from adadiff_bench.testing import TINY_UVIT

torch.set_num_threads(int(os.environ.get("ADADIFF_TEST_THREADS", min(2, os.cpu_count() or 1))))

REPO = Path(__file__).resolve().parents[1]
# the backbone the digits comparisons share (the fine-tuned AdaDiff network's): shipped routers are trained on it
DIGITS_BACKBONE = REPO / "checkpoints" / "adadiff_digits_finetuned.pt"
TINY = TINY_UVIT  # the tiny U-ViT plugin authors test with too


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and immune to OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, tiny_model, TINY)
    return path


def with_keys(text: str, **values) -> str:
    """A TOML text with each `key = ...` line set to `key = value` (values written as TOML literals: pass
    strings already quoted); a key the text lacks is an error, so a changed shipped config fails loudly."""
    for key, value in values.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
        assert count == 1, f"{key} appears {count} times"
    return text


def tiny_training_toml(out_dir: Path, **train) -> str:
    """A `train` config for a 2-block width-16 U-ViT on the digits: 2 steps of 8 images on 1 thread unless `train`
    says otherwise (values as TOML literals: pass strings already quoted)."""
    keys = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "threads": 1, "out_dir": f'"{out_dir}"'} | train
    model = "img_size = 8\npatch_size = 2\nin_chans = 1\nembed_dim = 16\ndepth = 2\nnum_heads = 2\n"
    return '[data]\nname = "digits"\n\n[model]\n' + model + "\n[train]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


def write_run_config(tmp_path: Path, checkpoint: Path, extra_methods: str = "", **sections) -> Path:
    """A small run config: 32 samples, 3 steps, quick timing; `sections` override whole tables."""
    tables = {
        "sampling": 'solver = "ddim"\nnum_steps = 3\nnum_samples = 32\nbatch_size = 16',
        "metrics": 'inception = "off"\nkid_subset_size = 16\nisc_splits = 2',
        "timing": "num_samples = 8\nrepeats = 3\nwarmup_batches = 1\nthreads = 1",
    }
    tables.update(sections)
    text = f'name = "tiny"\ncheckpoint = "{checkpoint}"\nresults_dir = "{tmp_path / "results"}"\nseeds = [0]\n'
    text += "".join(f"\n[{name}]\n{body}\n" for name, body in tables.items())
    text += '\n[[methods]]\nname = "full"\nnum_steps = [2, 3]\n' + extra_methods
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


# ---- driving a method by hand, as the sampling loop would --------------------------------------------

def context(step: int = 0, timesteps=None, rows=None, batch: int | None = None, seed: int = 0) -> SamplingContext:
    """The sampling context of network evaluation `step`: `timesteps` the solver's whole schedule (default:
    `step + 1` zeros), `rows` the batch's run-wide sample indices (default 0..batch-1)."""
    timesteps = np.zeros(step + 1) if timesteps is None else np.asarray(timesteps, dtype=np.float64)
    rows = np.arange(batch) if rows is None else np.asarray(rows)
    return SamplingContext(step, timesteps, rows, sample_generators(seed, rows.tolist()))


# ---- an independent U-ViT: plain module calls, explicit long skips ------------------------------------

def plain_blocks(model, tokens: torch.Tensor, blocks: Iterable[int], skips: list) -> torch.Tensor:
    """Run U-ViT blocks `blocks` (execution order) with plain module calls: in-blocks append their output to
    `skips`, out-blocks call `block(x, skips.pop())`."""
    num_in, all_blocks = len(model.in_blocks), model.block_list()
    for k in blocks:
        tokens = all_blocks[k](tokens, skips.pop() if k > num_in else None)
        if k < num_in:
            skips.append(tokens)
    return tokens


def plain_hidden_states(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The tokens after every block (exit points 1..N), all blocks run for every sample."""
    tokens, skips, states = model.embed(x, t, y), [], []
    for k in range(len(model.block_list())):
        tokens = plain_blocks(model, tokens, [k], skips)
        states.append(tokens)
    return states
