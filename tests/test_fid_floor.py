"""`benchmarks/fid_floor.py`: the FID of real images drawn from the reference, the floor a sampler's FID sits on."""
from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "fid_floor.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fid_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_falls_as_n_grows_and_each_seed_draws_its_own_images(tmp_path, monkeypatch):
    # FID's small-n bias shrinks about as 1/n: the floor of 100 real images lies well above that of 1,000
    monkeypatch.chdir(REPO)
    fid_floor = load_script()
    small = fid_floor.floor("configs/digits_full.toml", 100, [0, 1], str(tmp_path))
    large = fid_floor.floor("configs/digits_full.toml", 1000, [0, 1], str(tmp_path))
    mean = {name: statistics.mean(row["fid_digits_cnn"] for row in rows) for name, rows in (("small", small),
                                                                                             ("large", large))}
    assert mean["small"] > 3 * mean["large"] > 0
    assert small[0]["fid_digits_cnn"] != small[1]["fid_digits_cnn"]  # two seeds, two draws
    assert [row["n"] for row in small + large] == [100, 100, 1000, 1000]
    assert fid_floor.summary(large)[0].startswith("fid_digits_cnn floor at n = 1000: ")


def test_a_missing_config_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "nope.toml" in done.stderr
