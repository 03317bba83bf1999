"""`bash benchmarks/gpu.sh --dry-run` on the CPU: every step of the GPU run up to the first CUDA call (packages,
environment, the CUDA tests collected, benchmarks/gpu_check.py and gpu_profile.py at tiny sizes) ends well and
prints the tables, so a GPU's scarce minutes are not spent on a broken script. About 40 s on 2 idle cores."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_dry_run_prints_every_table(tmp_path):
    report = tmp_path / "gpu-dry-run.md"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)  # (set only on the device machine: the log would be copied there)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(report)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tests collected" in done.stdout  # (the CUDA tests, collected only)
    text = report.read_text()
    assert text.startswith("## GPU check: ") and "DRY RUN" in text and text in done.stdout
    for header in ("| model | method | setting | precision | batch | layer ratio | ideal speed-up |",
                   "| model (`full`) | batch | steps | fp32 ms/image (IQR) | bf16 ms/image (IQR) |",
                   "| feature space | samples / reference | on the device | FID (harness) | FID (direct) |"):
        assert header in text, header
    # 2 batch sizes x (3 AdaDiff thresholds; 2 random-exit layer ratios x 2 precisions)
    assert text.count("| adadiff |") == 6 and text.count("| random-exit |") == 8
    assert "| digits-cnn |" in text and "| inception |" in text and "| NO |" not in text
    # the profile: 7 rows at the dry run's one batch size, in its own report beside the check's
    profile = (tmp_path / "gpu-dry-run-profile.md").read_text()
    assert profile.startswith("**Where a GPU's time goes**") and "DRY RUN" in profile and profile in done.stdout
    assert "| host syncs/step | aten ops/step |" in profile and profile.count("| digits U-ViT |") == 3
    assert profile.count("| U-ViT-S/2 random |") == 4
    assert not list(REPO.glob("benchmarks/results/gpu-*dry*"))  # nothing written into the repository
