"""`benchmarks/gpu_train.sh` on the CPU with a tiny training: it trains in stages that resume one another up to
the config's cap, and sends the resume state back in parts that join into the file a rerun resumes from."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_training_toml


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_stages_resume_each_other_and_the_parts_join_into_the_resume_state(tmp_path):
    out_dir, sent = tmp_path / "train", tmp_path / "out"
    sent.mkdir()
    config = tmp_path / "train.toml"
    config.write_text(tiny_training_toml(out_dir, steps=4, checkpoint_every=1, holdout=0))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(sent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_train.sh"), str(config), "300", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "steps up to 2 of 4" in done.stdout and "steps up to 4 of 4" in done.stdout
    assert "resuming from" in (sent / "gpu_train.log").read_text()  # (the second stage went on from the first)
    joined = tmp_path / "joined.pt"
    joined.write_bytes(b"".join(part.read_bytes() for part in sorted(sent.glob("last.pt.part-*"))))
    assert joined.read_bytes() == (out_dir / "last.pt").read_bytes()
    assert torch.load(joined, map_location="cpu", weights_only=False)["step"] == 4


def test_a_bad_call_is_one_line_and_exit_status_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    for args in ([], [str(bad), "10"], [str(tmp_path / "missing.toml"), "10"], [str(bad), "soon"]):
        done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_train.sh"), *args], capture_output=True,
                              text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "gpu_train.sh:" in done.stderr, args
