"""A run you can watch: the timed pass shows a bar, a line per computed cell gives the overall ETA, and the
timed pass holds no more images than the run samples unless the config asks for more."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from adadiff_bench.cli import main
from adadiff_bench.config import DEFAULT_TIMED_SAMPLES, TimingConfig, timed_samples
from conftest import write_run_config

SAMPLING = 'solver = "ddim"\nnum_steps = 3\nnum_samples = 16\nbatch_size = 16'
QUICK_TIMING = "repeats = 3\nwarmup_batches = 0\nthreads = 1"


def run_rows(tmp_path, checkpoint, timing: str, progress: bool) -> pd.DataFrame:
    config = write_run_config(tmp_path, checkpoint, sampling=SAMPLING, timing=timing)
    assert main(["run", "--config", str(config)] + ([] if progress else ["--no-progress"])) == 0
    return pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")


def test_timed_count_defaults_to_the_smaller_of_the_default_and_n():
    for sampled in (1, 16, DEFAULT_TIMED_SAMPLES, 1000):
        assert timed_samples(TimingConfig(), sampled) == min(DEFAULT_TIMED_SAMPLES, sampled)
    assert timed_samples(TimingConfig(num_samples=500), 16) == 500


def test_two_cell_run_shows_the_timing_bar_and_the_eta(tmp_path, tiny_checkpoint, capsys):
    rows = run_rows(tmp_path, tiny_checkpoint, QUICK_TIMING, progress=True)
    err = capsys.readouterr().err
    assert len(rows) == 2
    assert "time 16 images" in err  # the timed pass's bar, at the capped count
    etas = re.findall(r"(\d)/2 cells computed, elapsed .+?, about (.+?) left", err)
    assert [e[0] for e in etas] == ["1", "2"]
    assert etas[-1][1] == "0 s"  # nothing left after the last cell


def test_no_progress_hides_the_bar_and_the_eta(tmp_path, tiny_checkpoint, capsys):
    run_rows(tmp_path, tiny_checkpoint, QUICK_TIMING, progress=False)
    err = capsys.readouterr().err
    assert "time 16 images" not in err and "cells computed" not in err


@pytest.mark.parametrize("timing, expected", [(QUICK_TIMING, 16), ("num_samples = 40\n" + QUICK_TIMING, 40)])
def test_timed_count_is_capped_at_n_unless_given(tmp_path, tiny_checkpoint, timing, expected):
    rows = run_rows(tmp_path, tiny_checkpoint, timing, progress=False)
    assert (rows["timing_num_samples"] == expected).all()
