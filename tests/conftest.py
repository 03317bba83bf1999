"""Shared fixtures: a tiny U-ViT checkpoint and a tiny run config, so that tests stay fast."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.config import UViTConfig

torch.set_num_threads(int(os.environ.get("ADADIFF_TEST_THREADS", min(2, os.cpu_count() or 1))))

REPO = Path(__file__).resolve().parents[1]
TINY = UViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, tiny_model, TINY)
    return path


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
