"""`benchmarks/gpu_tree.sh aside|back`, run in a throwaway git repository: the committed run folders leave the
tree and come back unchanged, and nothing is overwritten when both copies exist."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None,
                                reason="needs bash and git")


def run(script, *args, env):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)


def test_aside_and_back_move_the_run_folders_out_of_the_tree_and_return_them(tmp_path):
    repo, aside = tmp_path / "repo", tmp_path / "aside"
    (repo / "benchmarks").mkdir(parents=True)
    script = repo / "benchmarks" / "gpu_tree.sh"
    shutil.copy(REPO / "benchmarks" / "gpu_tree.sh", script)
    files = {"results/digits_full/cells/a.json": "{}", "results/.adadiff_cache/x/weights.pt": "w",
             "reports/ablation/leaderboard.md": "| x |", "results/demo/kept.csv": "a,b",
             "results/a_later_run/cells/b.json": "[]", "results/README.md": "#"}
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)  # (the committed folders are git's)
    (repo / "results/train/run").mkdir(parents=True)  # a local training's folder, never committed: it stays
    env = {**os.environ, "GPU_TREE_ASIDE": str(aside)}

    done = run(script, "aside", env=env)
    assert done.returncode == 0, done.stderr
    assert "MiB" in done.stdout
    assert not (repo / "results/digits_full").exists() and not (repo / "reports/ablation").exists()
    assert not (repo / "results/a_later_run").exists()  # (no list to update when a run is committed)
    assert (aside / "results/.adadiff_cache/x/weights.pt").read_text() == "w"
    assert (repo / "results/demo/kept.csv").exists()  # (the demo's run is not on the list: it stays)
    assert (repo / "results/README.md").exists() and (repo / "results/train/run").is_dir()

    done = run(script, "back", env=env)
    assert done.returncode == 0, done.stderr
    assert {name: (repo / name).read_text() for name in files} == files

    (aside / "results/digits_full").mkdir(parents=True)  # a stale copy beside the real one: refused, kept
    done = run(script, "back", env=env)
    assert done.returncode == 2 and "both" in done.stderr
    assert (repo / "results/digits_full/cells/a.json").read_text() == "{}"

    done = run(script, env=env)
    assert done.returncode == 2 and "usage" in done.stderr
