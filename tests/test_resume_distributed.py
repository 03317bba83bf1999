"""Runs that survive SIGKILL, one writer per run, and torchrun: 2 processes give the 1-process samples bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adadiff_bench.cli import main
from adadiff_bench.results import RunStore
from conftest import REPO, write_run_config

# what a rerun or another process count may change: the clock, memory and how many processes ran
NOT_COMPARED = ("time_per_image_s", "time_per_image_s_iqr", "reference_time_per_image_s", "speedup",
                "timing_repeats", "timing_other_cores", "peak_mem_mb", "peak_mem_kind", "processes",
                "time_per_image_s_ranks")

SLOW_PLUGIN = '''
"""A test plugin: `full`, slowed down, that notes every batch it starts sampling in BATCH_LOG."""
import os, time
from adadiff_bench.methods import Method, register_method

@register_method
class SlowFull(Method):
    name = "slow-full"

    def __call__(self, x, t, y, ctx):
        if ctx.step == 0:  # a batch starts
            with open(os.environ["BATCH_LOG"], "a") as notes:
                notes.write(f"{ctx.num_steps} {int(ctx.rows[0])}\\n")
        time.sleep(0.04)
        eps = self.model(x, t, y)
        self.log.ran_full()
        return eps
'''
RUN_WITH_PLUGIN = "import slow_plugin, sys; from adadiff_bench.cli import main; sys.exit(main(sys.argv[1:]))"


def compared(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in NOT_COMPARED if c in frame.columns]).reset_index(drop=True)


@pytest.fixture
def slow_setup(tmp_path, tiny_checkpoint):
    """A 3-cell config of the slow plugin (6 batches per cell) and the environment that loads it."""
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    config = write_run_config(tmp_path, tiny_checkpoint, timing="enabled = false",
                              sampling='solver = "ddim"\nnum_steps = 3\nnum_samples = 24\nbatch_size = 4',
                              metrics='inception = "off"\nkid_subset_size = 8\nisc_splits = 2\nprc = false')
    config.write_text(config.read_text().replace('name = "full"\nnum_steps = [2, 3]',
                                                 'name = "slow-full"\nnum_steps = [2, 3, 4]'))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "BATCH_LOG": str(tmp_path / "batches.txt"),
           "OMP_NUM_THREADS": "1"}
    return config, env


def start_run(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN_WITH_PLUGIN, "run", "--config", str(config), "--no-progress"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL the run as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_nothing_corrupt(partial: Path) -> None:
    """Every file of the partial run loads: atomic writes leave whole files or none (and no temp files)."""
    for path in partial.rglob("*"):
        assert not path.name.endswith(".tmp"), f"temporary file left: {path}"
        if path.suffix == ".npz":
            with np.load(path) as archive:
                [archive[key] for key in archive.files]
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_killed_runs_resume_to_the_uninterrupted_result(slow_setup, tmp_path):
    config, env = slow_setup
    reference_config = tmp_path / "reference.toml"
    reference_config.write_text(config.read_text().replace(str(tmp_path / "results"), str(tmp_path / "reference")))
    assert subprocess.run([sys.executable, "-c", RUN_WITH_PLUGIN, "run", "--config", str(reference_config),
                           "--no-progress"], env={**env, "BATCH_LOG": os.devnull}, cwd=REPO).returncode == 0

    store = RunStore(tmp_path / "results", "tiny")
    cells = lambda: sorted(store.partial.glob("cells/*/row.json"))  # noqa: E731
    batches = lambda: list(store.partial.glob("progress/*/batch_*.npz"))  # noqa: E731
    kill_points = [lambda: len(batches()) >= 2,                        # inside the first cell
                   lambda: len(cells()) >= 1,                           # between cells (or just after)
                   lambda: len(cells()) >= 1 and len(batches()) >= 3]  # inside a later cell
    for ready in kill_points:
        kill_when(start_run(config, env), ready)
        assert_nothing_corrupt(store.partial)
    done_before = {path.parent.name: path.stat().st_mtime_ns for path in cells()}
    assert done_before, "no cell finished before the last kill"

    finished = start_run(config, env)
    output, _ = finished.communicate(timeout=300)
    assert finished.returncode == 0, output
    assert output.count(": already done, kept") == len(done_before)
    for cell_id, mtime in done_before.items():  # completed cells were kept, not computed again
        assert (tmp_path / "results" / "tiny" / "cells" / cell_id / "row.json").stat().st_mtime_ns == mtime
    resumed = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    reference = pd.read_csv(tmp_path / "reference" / "tiny" / "results.csv")
    pd.testing.assert_frame_equal(compared(resumed), compared(reference))
    for cell_id in reference["cell_id"]:
        with np.load(tmp_path / "results" / "tiny" / "cells" / cell_id / "samples.npz") as a, \
                np.load(tmp_path / "reference" / "tiny" / "cells" / cell_id / "samples.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"])
    # every batch was sampled once, except at most the one in flight at each of the 3 kills
    started = (tmp_path / "batches.txt").read_text().splitlines()
    assert 3 * 6 <= len(started) <= 3 * 6 + len(kill_points)
    assert not (tmp_path / "results" / "tiny" / "progress").exists()


def test_a_second_writer_of_the_same_run_is_refused(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, timing="enabled = false")
    holder = RunStore(tmp_path / "results", "tiny")
    holder.acquire_lock()
    try:
        assert main(["run", "--config", str(config), "--no-progress"]) == 2
        assert "being written by another process" in capsys.readouterr().err
    finally:
        holder.release_lock()
    assert main(["run", "--config", str(config), "--no-progress"]) == 0  # free again once released


DISTRIBUTED_METHODS = '''
[[methods]]
name = "static-exit"
k = 3
[[methods]]
name = "calm"
[[methods]]
name = "deepcache"
[[methods]]
name = "teacache"
[[methods]]
name = "random-exit"
'''


def test_two_processes_on_gloo_give_the_one_process_samples_bit_for_bit(tmp_path, tiny_checkpoint):
    config = write_run_config(tmp_path, tiny_checkpoint, extra_methods=DISTRIBUTED_METHODS,
                              timing="num_samples = 8\nrepeats = 3\nwarmup_batches = 1\nthreads = 1",
                              sampling='solver = "ddim"\nnum_steps = 3\nnum_samples = 30\nbatch_size = 4')
    two = tmp_path / "two.toml"
    two.write_text(config.read_text().replace(str(tmp_path / "results"), str(tmp_path / "two")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "adadiff_bench", "run", "--config", str(two), "--no-progress"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    one = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    both = pd.read_csv(tmp_path / "two" / "tiny" / "results.csv")
    assert (both["processes"] == 2).all() and (one["processes"] == 1).all()
    pd.testing.assert_frame_equal(compared(one), compared(both))  # FID, IS, KID, FLOPs, layer ratio: identical
    for cell_id in one["cell_id"]:
        with np.load(tmp_path / "results" / "tiny" / "cells" / cell_id / "samples.npz") as a, \
                np.load(tmp_path / "two" / "tiny" / "cells" / cell_id / "samples.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]), cell_id
    assert launched.stdout.count("results written to") == 1  # one writer
    info = json.loads((tmp_path / "two" / "tiny" / "run.json").read_text())
    assert info["machine"]["processes"] == 2
