"""The instruments themselves: the timing protocol, peak memory, the step-log switch, the metric pass against
torch-fidelity, clean-fid and brute force, the bootstrap interval, the reference cache's key, multi-seed tables."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pandas as pd
import pytest
import scipy.spatial.distance
import torch
import torch_fidelity

from adadiff_bench import timing
from adadiff_bench.cli import main
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import Dataset, load_dataset
from adadiff_bench.harness import Cell, generate
from adadiff_bench.memory import PeakMemory
from adadiff_bench.metrics import bootstrap, cleanfid_backend, quality
from adadiff_bench.metrics.classifier import ASSET_PATH, EXTRACTOR_NAME, load_classifier
from adadiff_bench.report.tables import leaderboard, to_markdown
from conftest import write_run_config

METRICS = MetricsConfig(inception="off", kid_subset_size=100, isc_splits=5)
# each column of a feature space and the key torch-fidelity's calculate_metrics returns it under
FIDELITY_KEYS = (("fid", "", torch_fidelity.KEY_METRIC_FID),
                 ("is", "_mean", torch_fidelity.KEY_METRIC_ISC_MEAN), ("is", "_std", torch_fidelity.KEY_METRIC_ISC_STD),
                 ("kid", "_mean", torch_fidelity.KEY_METRIC_KID_MEAN), ("kid", "_std", torch_fidelity.KEY_METRIC_KID_STD),
                 ("precision", "", torch_fidelity.KEY_METRIC_PRECISION), ("recall", "", torch_fidelity.KEY_METRIC_RECALL))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


def subset(data: Dataset, indices) -> Dataset:
    """Some of `data`'s images as a data set of their own (with its own hash)."""
    images = data.images[indices]
    return Dataset(data.name, images, data.labels[indices], hashlib.sha256(images.numpy().tobytes()).hexdigest())


# ---- time -------------------------------------------------------------------------------------

def test_timing_interleaves_cell_and_reference_and_reports_medians(monkeypatch):
    clock, calls = [0.0], []
    durations = {"cell": iter([3.0, 1.0, 2.0]), "reference": iter([4.0, 6.0, 4.0])}

    def workload(name):
        def run():
            calls.append(name)
            clock[0] += next(durations[name])
        return run

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    result = timing.measure(workload("cell"), workload("reference"), num_images=2, repeats=3,
                            warmup=lambda: calls.append("warm-up"))
    assert calls == ["warm-up"] + ["reference", "cell"] * 3
    assert result.time_per_image_s == 1.0 and result.reference_time_per_image_s == 2.0  # medians 2 s, 4 s / 2 images
    assert result.speedup == 2.0  # ratio of medians
    assert result.time_per_image_s_iqr == pytest.approx(0.5)  # quartiles of (1.5, 0.5, 1.0): 1.25 - 0.75
    assert result.timing_repeats == 3


def test_timing_counts_the_cores_other_processes_keep_busy(monkeypatch):
    # the arithmetic: the machine's busy CPU seconds less this process's own, over the pass's wall-clock
    clock, counters = [0.0], iter([(100.0, 10.0), (105.0, 11.0)])  # machine +5 s, own +1 s, over 2 s
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(timing, "cpu_counters", lambda: next(counters))

    def one_second():
        clock[0] += 1.0
    assert timing.measure(one_second, None, num_images=1, repeats=2).timing_other_cores == 2.0
    monkeypatch.setattr(timing, "cpu_counters", lambda: None)  # no /proc/stat: unknown, not 0
    assert math.isnan(timing.measure(one_second, None, num_images=1, repeats=2).timing_other_cores)


def test_timing_sees_a_process_that_spins_beside_it():
    # the kernel's real counters: a spinning neighbour shows as about a core while the timed calls sleep
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        result = timing.measure(lambda: time.sleep(0.3), None, num_images=1, repeats=3)
    finally:
        spinner.kill()
        spinner.wait()
    assert result.timing_other_cores > 0.6


# ---- memory -----------------------------------------------------------------------------------

def test_peak_memory_is_reset_for_each_measurement():
    with PeakMemory() as big:
        block = torch.ones(300 * 2**20 // 4)  # 300 MiB, every page touched
        del block
    with PeakMemory() as small:
        pass
    if small.kind != "peak resident (process)":
        pytest.skip(f"this kernel does not let a process reset its peak RSS ({small.kind})")
    assert big.mb - small.mb > 250


# ---- the step log's own cost is measurable: it can be switched off without changing a sample ----

def test_sampling_without_the_step_log_gives_the_same_images(tiny_model):
    cell = Cell("full", (), "ddim", 3, 0)
    logged, log = generate(cell, tiny_model, 4, 4)
    unlogged, null_log = generate(cell, tiny_model, 4, 4, record=False)
    assert torch.equal(logged, unlogged)
    assert log.blocks_run.all() and null_log.blocks_run.size == 0


# ---- quality: torch-fidelity, clean-fid, brute force --------------------------------------------

@pytest.fixture(scope="module")
def shifted(digits) -> torch.Tensor:
    return digits.images[:300].roll(1, dims=3).contiguous()


def test_metric_pass_equals_a_direct_torch_fidelity_call(digits, shifted, tmp_path):
    ours = quality.compute_quality(shifted, digits, METRICS, tmp_path / "harness")
    kwargs = quality.fidelity_kwargs(EXTRACTOR_NAME, str(ASSET_PATH), shifted, digits, METRICS, tmp_path / "direct")
    theirs = torch_fidelity.calculate_metrics(**kwargs)
    assert set(ours) == {f"{name}_digits_cnn{suffix}" for name, suffix, _ in FIDELITY_KEYS}
    for name, suffix, key in FIDELITY_KEYS:
        assert ours[f"{name}_digits_cnn{suffix}"] == theirs[key], name + suffix


def test_clean_fid_backend_agrees_with_torch_fidelity_on_the_same_features(digits, shifted, tmp_path):
    engine = quality.compute_quality(shifted, digits, METRICS, tmp_path)
    cross = quality.compute_quality(shifted, digits, dataclasses.replace(METRICS, fid_backend="clean-fid"), tmp_path)
    assert cross["fid_digits_cnn"] == pytest.approx(engine["fid_digits_cnn"], rel=1e-4)
    assert {k: v for k, v in cross.items() if k != "fid_digits_cnn"} == \
        {k: v for k, v in engine.items() if k != "fid_digits_cnn"}


def knn_precision_recall(generated: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.'s precision and recall, by brute force in float64."""
    def radii(points):  # distance to the k-th nearest other point
        return np.sort(scipy.spatial.distance.cdist(points, points), axis=1)[:, k]
    cross = scipy.spatial.distance.cdist(generated, real)
    precision = (cross <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cross.T <= radii(generated)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_and_recall_match_brute_force_nearest_neighbours(digits, tmp_path):
    generated, real = digits.images[:150].roll(2, dims=2), subset(digits, slice(300, 600))
    got = quality.compute_quality(generated, real, METRICS, tmp_path)
    model, _ = load_classifier()
    with torch.no_grad():
        features = [model.features(images).double().numpy() for images in (generated, real.images)]
    precision, recall = knn_precision_recall(*features, k=METRICS.prc_neighborhood)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # a comparison that can tell values apart
    assert got["precision_digits_cnn"] == pytest.approx(precision, abs=1 / 150)  # float32 ties: at most one sample
    assert got["recall_digits_cnn"] == pytest.approx(recall, abs=1 / 300)


def test_bootstrap_interval_covers_the_true_fid_of_gaussians():
    """Gaussian features whose FID is known in closed form: the 95% interval should cover it about 95% of the time."""
    dim, n, trials = 4, 200, 40
    scales = np.array([0.5, 1.0, 1.5, 2.0])
    shift = np.array([0.3, 0.0, -0.2, 0.1])
    reference = {"mu": np.zeros(dim), "sigma": np.eye(dim)}
    true_fid = float(shift @ shift + scales.sum() + dim - 2 * np.sqrt(scales).sum())
    rng = np.random.default_rng(0)
    covered, widths = 0, {n: [], 4 * n: []}
    for trial in range(trials):
        for count in widths:
            features = torch.from_numpy(shift + rng.standard_normal((count, dim)) * np.sqrt(scales))
            low, high = bootstrap.fid_bootstrap_interval(features, reference, resamples=200, level=0.95, seed=trial)
            widths[count].append(high - low)
            covered += count == n and low <= true_fid <= high
    assert covered / trials >= 0.85
    assert np.mean(widths[4 * n]) < 0.7 * np.mean(widths[n])  # more samples, narrower interval (about 1/2)


def test_bootstrap_columns_bracket_the_point_estimate(digits, shifted, tmp_path):
    result = quality.compute_quality(shifted, digits, dataclasses.replace(METRICS, fid_bootstrap=50), tmp_path)
    assert result["fid_digits_cnn_ci_low"] < result["fid_digits_cnn"] < result["fid_digits_cnn_ci_high"]


# ---- the reference cache ----------------------------------------------------------------------

def test_reference_cache_is_keyed_by_the_weights_content_and_n(digits, tmp_path):
    samples, reference = digits.images[:40], subset(digits, slice(0, 200))
    cache = tmp_path / "cache"

    def cached_after(weights) -> set:
        quality.metrics_in_feature_space(EXTRACTOR_NAME, str(weights), samples, reference, METRICS, cache)
        return set(cache.iterdir())

    first = cached_after(ASSET_PATH)
    copy = shutil.copy(ASSET_PATH, tmp_path / "same_weights.pt")
    assert cached_after(copy) == first  # same bytes elsewhere: the cache is reused
    state = torch.load(ASSET_PATH)
    state["state_dict"]["embed.bias"] = state["state_dict"]["embed.bias"] + 0.1
    torch.save(state, tmp_path / "other_weights.pt")
    assert len(cached_after(tmp_path / "other_weights.pt")) == 2 * len(first)  # other weights: recomputed
    assert "-n200-8x8-digits-cnn-" in quality.reference_cache_name(reference, EXTRACTOR_NAME, str(ASSET_PATH))


# ---- clean-fid's model file --------------------------------------------------------------------

def test_clean_fid_without_its_model_file_stops_with_one_line(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(cleanfid_backend, "cleanfid_default_model_dir", lambda: tmp_path / "empty")
    dummy = tmp_path / "inception.pth"
    dummy.write_bytes(b"never read: the check comes first")
    config = write_run_config(tmp_path, tiny_checkpoint, metrics=(
        f'inception = "require"\ninception_weights = "{dummy}"\nfid_backend = "clean-fid"'))
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "inception-2015-12-05.pt" in error and "cleanfid_model" in error
    assert not (tmp_path / "results").exists()


def test_unknown_fid_backend_is_refused_with_a_suggestion(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, metrics='inception = "off"\nfid_backend = "cleanfid"')
    assert main(["run", "--config", str(config)]) == 2
    assert "did you mean 'clean-fid'" in capsys.readouterr().err


# ---- several seeds ----------------------------------------------------------------------------

def test_leaderboard_reports_mean_and_std_across_seeds():
    frame = pd.DataFrame({"method": "full", "params": "{}", "solver": "ddim", "num_steps": 10, "num_samples": 100,
                          "seed": [0, 1, 2], "fid_digits_cnn": [10.0, 12.0, 17.0], "gflops_per_image": 1.0,
                          "layer_ratio": 1.0})
    board = leaderboard(frame)
    assert board["fid_digits_cnn"].item() == pytest.approx(13.0)
    assert board["fid_digits_cnn_seed_std"].item() == pytest.approx(np.std([10, 12, 17], ddof=1))
    assert "| 13.000 ± 3.606 |" in to_markdown(board) and board["seeds"].item() == 3
