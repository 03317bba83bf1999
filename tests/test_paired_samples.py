"""FID differences paired over samples: every cell of a seed resamples the same sample rows, so the difference of
two cells' bootstrap replicates is a bootstrap of their FID difference (the interval a one-seed board needs).

Checked against a brute-force bootstrap with an independent FID (scipy's matrix square root), against the two
cells' own intervals side by side, and end to end through a run and its report.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg

from adadiff_bench.cli import main
from adadiff_bench.metrics.bootstrap import basic_interval, fid_bootstrap_replicates, paired_basic_interval
from adadiff_bench.metrics.specs import CI_HIGH, CI_LOW, delta_column
from adadiff_bench.results import FID_BOOTSTRAP, RunReader, write_npz
from conftest import write_run_config

DIM, N, RESAMPLES = 6, 300, 120


def closed_form_fid(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID by its definition, with scipy's sqrtm: |mu_1 - mu_2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    mean, cov = features.mean(axis=0), np.cov(features, rowvar=False)
    root = linalg.sqrtm(cov @ sigma).real
    return float(((mean - mu) ** 2).sum() + np.trace(cov + sigma - 2 * root))


def two_cells(rng, noise: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cell a, and cell b = a moved a little per sample (what two methods from the same noise look like)."""
    a = rng.standard_normal((N, DIM)) * np.linspace(0.6, 1.4, DIM) + 0.2
    b = a + noise * rng.standard_normal((N, DIM)) + 0.05
    return a, b, {"mu": np.zeros(DIM), "sigma": np.eye(DIM)}


def test_replicates_resample_the_same_rows_and_the_interval_matches_brute_force():
    a, b, reference = two_cells(np.random.default_rng(1), noise=0.1)
    point_a, replicates_a = fid_bootstrap_replicates(torch.from_numpy(a), reference, RESAMPLES)
    point_b, replicates_b = fid_bootstrap_replicates(torch.from_numpy(b), reference, RESAMPLES)
    draws = np.random.default_rng(0)
    brute = []
    for _ in range(RESAMPLES):  # the same rows for both cells, FID by its definition
        rows = draws.integers(0, N, N)
        brute.append(closed_form_fid(a[rows], **reference) - closed_form_fid(b[rows], **reference))
    assert replicates_a - replicates_b == pytest.approx(np.array(brute), abs=1e-6)
    difference = closed_form_fid(a, **reference) - closed_form_fid(b, **reference)
    assert point_a - point_b == pytest.approx(difference, abs=1e-6)
    q_low, q_high = np.quantile(brute, [0.025, 0.975])
    low, high = paired_basic_interval(point_a, replicates_a, point_b, replicates_b, 0.95)
    assert (low, high) == pytest.approx((2 * difference - q_high, 2 * difference - q_low), abs=1e-6)


def test_pairing_narrows_the_interval_and_a_cell_against_itself_is_exactly_zero():
    a, b, reference = two_cells(np.random.default_rng(2), noise=0.05)
    point_a, replicates_a = fid_bootstrap_replicates(torch.from_numpy(a), reference, RESAMPLES)
    point_b, replicates_b = fid_bootstrap_replicates(torch.from_numpy(b), reference, RESAMPLES)
    low, high = paired_basic_interval(point_a, replicates_a, point_b, replicates_b, 0.95)
    own_a, own_b = basic_interval(point_a, replicates_a, 0.95), basic_interval(point_b, replicates_b, 0.95)
    assert own_a[0] <= own_b[1] and own_b[0] <= own_a[1]  # side by side, the two intervals overlap ...
    assert high < 0 and high - low < 0.25 * ((own_a[1] - own_a[0]) + (own_b[1] - own_b[0]))  # ... paired, resolved
    assert paired_basic_interval(point_a, replicates_a, point_a, replicates_a, 0.95) == (0.0, 0.0)
    assert np.isnan(paired_basic_interval(point_a, replicates_a, point_b, replicates_b[:-1], 0.95)).all()


def test_a_run_keeps_its_replicates_and_its_report_pairs_every_cell_with_full(tmp_path, tiny_checkpoint, one_thread):
    methods = '\n[[methods]]\nname = "static-exit"\nk = [2, 3, 4]\n'
    metrics = 'inception = "off"\nkid_subset_size = 16\nisc_splits = 2\nfid_bootstrap = 40'
    config = write_run_config(tmp_path, tiny_checkpoint, methods, metrics=metrics, timing="enabled = false")
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    run, report = tmp_path / "results" / "tiny", tmp_path / "report"
    reader, frame = RunReader(run), pd.read_csv(run / "results.csv")
    kept = {cell: reader.fid_bootstrap(cell)["fid_digits_cnn"] for cell in frame["cell_id"]}
    for cell, (point, replicates) in kept.items():
        assert point == pytest.approx(frame.set_index("cell_id").loc[cell, "fid_digits_cnn"]) and len(replicates) == 40
    with mock.patch("adadiff_bench.results.read_npz", side_effect=AssertionError("an archive read twice")):
        assert all(reader.fid_bootstrap(cell)["fid_digits_cnn"][0] == kept[cell][0] for cell in kept)  # (memoised)
    edited = frame[(frame["method"] == "full") & (frame["num_steps"] == 2)]["cell_id"].iloc[0]
    write_npz(reader.layout.cell_archive(edited, FID_BOOTSTRAP),  # an edited file: that cell is left out, no traceback
              **{"fid_digits_cnn/point": np.array([1, 2]), "fid_digits_cnn/replicates": np.array(["x"])})
    assert main(["report", str(run), "--out", str(report)]) == 0

    pairs = pd.read_csv(report / "paired_samples.csv")
    cells = len(frame) - 1
    assert len(pairs) == cells * (cells - 1)
    against = pairs[pairs["b_is_full"]]
    assert len(against) == 3 and against["setting_b"].nunique() == 1 and "3 steps" in against["setting_b"].iloc[0]
    assert np.allclose(against["dfid"], against["fid_a"] - against["fid_b"])
    swapped = pairs.merge(pairs, left_on=["setting_a", "setting_b"], right_on=["setting_b", "setting_a"])
    assert np.allclose(swapped["dfid_low_x"], -swapped["dfid_high_y"])
    assert all(setting in (report / "paired_samples.md").read_text() for setting in against["setting_a"])

    board = pd.read_csv(report / "leaderboard.csv").set_index("setting")  # the leaderboard pairs its rows alike
    dfid = delta_column("fid_digits_cnn")
    shown = board.loc[against["setting_a"]]
    assert np.allclose(shown[dfid + CI_LOW], against["dfid_low"]) and np.allclose(shown[dfid + CI_HIGH],
                                                                                  against["dfid_high"])
    assert (shown["vs_full_unresolved"].to_numpy() == ~against["resolved"].to_numpy()).all()
    assert board.loc[board["method"] == "full", dfid + CI_LOW].isna().all()  # full itself, and the edited cell
    assert "compared over samples" in (report / "leaderboard.md").read_text()

    matched = pd.read_csv(report / "paired_matched.csv").set_index("target")
    sweep = frame[frame["method"] == "static-exit"].sort_values("layer_ratio")
    full = kept[frame[(frame["method"] == "full") & (frame["num_steps"] == 3)]["cell_id"].iloc[0]]
    assert sorted(matched.index) == [t for t in (0.5, 0.6, 0.7, 0.8)
                                     if sweep["layer_ratio"].min() <= t <= sweep["layer_ratio"].max()]
    for target, row in matched.iterrows():  # by hand: the two cells around the target, weighted linearly
        above = sweep[sweep["layer_ratio"] >= target].iloc[0]
        below = sweep[sweep["layer_ratio"] <= target].iloc[-1]
        span = above["layer_ratio"] - below["layer_ratio"]
        w = 0.0 if span == 0 else (target - below["layer_ratio"]) / span
        point = (1 - w) * kept[below["cell_id"]][0] + w * kept[above["cell_id"]][0]
        replicates = (1 - w) * kept[below["cell_id"]][1] + w * kept[above["cell_id"]][1]
        assert row["fid"] == pytest.approx(point)
        assert (row["fid_low"], row["fid_high"]) == pytest.approx(basic_interval(point, replicates, 0.95))
        assert (row["dfid_low"], row["dfid_high"]) == pytest.approx(
            paired_basic_interval(point, replicates, full[0], full[1], 0.95))
