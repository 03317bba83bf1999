"""Seeds and intervals: the leaderboard's mean ± std over seeds, the bootstrap interval of the mean, and the
≈ marks where the (paired, per-seed) intervals do not separate a row from its group's `full` or its Pareto place
from a cheaper row."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from adadiff_bench.metrics.bootstrap import mean_bootstrap_interval
from adadiff_bench.report.groups import includes_zero, paired_interval
from adadiff_bench.report.tables import display_table, leaderboard
from test_report_tables import fake_run

FID = "fid_digits_cnn"


def seeded_rows(settings: dict[str, tuple[float, list[float]]]) -> list[dict]:
    """One row per (setting, seed): {name: (GFLOPs, FID per seed)}; `full` is the method of the setting 'full'."""
    rows = []
    for name, (gflops, fids) in settings.items():
        for seed, fid in enumerate(fids):
            method, params = ("full", "{}") if name == "full" else ("m", json.dumps({"k": name}))
            rows.append({"method": method, "params": params, "seed": seed, "gflops_per_image": gflops, FID: fid,
                         "layer_ratio": gflops / 10, "backbone_hash": "a" * 64})
    return rows


def board_of(tmp_path, settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.read_csv(fake_run(tmp_path / "run", "r", seeded_rows(settings)) / "results.csv").assign(run="r")
    return frame, leaderboard(frame)


def test_mean_and_std_over_seeds_equal_numpy(tmp_path):
    rng = np.random.default_rng(7)
    settings = {name: (float(g), list(rng.uniform(5, 30, 4))) for name, g in zip(["full", "x", "y"], [10, 6, 3])}
    _, board = board_of(tmp_path, settings)
    for name, (_, fids) in settings.items():
        row = board[board["setting"].str.contains("full" if name == "full" else f"k={name}")].iloc[0]
        assert row["seeds"] == 4
        assert row[FID] == pytest.approx(np.mean(fids))
        assert row[FID + "_seed_std"] == pytest.approx(np.std(fids, ddof=1))
        assert (row[FID + "_ci_low"], row[FID + "_ci_high"]) == pytest.approx(mean_bootstrap_interval(fids))
    assert display_table(board).iloc[0, 3].count("±") == 1  # the FID cell: mean ± std


def test_differences_are_paired_by_seed(tmp_path):
    """Every method of a seed starts from that seed's noise, so comparisons use per-seed differences: a setting
    whose own interval overlaps `full`'s is resolved when every seed moves the same way, and not when the seeds
    disagree on the sign."""
    settings = {"full": (10.0, [10.0, 10.5, 11.0]),
                "shifted": (7.0, [10.3, 10.8, 11.3]),  # overlaps full, but +0.3 at every seed: resolved
                "close": (5.0, [10.8, 10.3, 11.6]),    # differences +0.8, -0.2, +0.6: ≈
                "far": (2.0, [20.0, 21.0, 22.0])}      # separated from all
    _, board = board_of(tmp_path, settings)
    by_name = {name: board[board["setting"].str.contains("full" if name == "full" else f"k={name}")].iloc[0]
               for name in settings}
    assert by_name["shifted"][FID + "_ci_low"] <= by_name["full"][FID + "_ci_high"]  # unpaired: they overlap
    assert not by_name["shifted"]["vs_full_unresolved"]
    assert by_name["close"]["vs_full_unresolved"] and not by_name["far"]["vs_full_unresolved"]
    assert not by_name["full"]["vs_full_unresolved"]  # (itself)
    # with 3 seeds the paired interval spans the smallest to the largest per-seed difference
    assert (by_name["close"]["dfid_ci_low"], by_name["close"]["dfid_ci_high"]) == pytest.approx((-0.2, 0.8))
    assert board["pareto"].all()
    assert by_name["full"]["pareto_unresolved"]  # beats `shifted` at every seed, but not `close`
    assert by_name["shifted"]["pareto_unresolved"]  # against `close`: -0.5, +0.5, -0.3
    assert not by_name["close"]["pareto_unresolved"] and not by_name["far"]["pareto_unresolved"]
    cells = display_table(board).set_index("method setting")
    dfid = cells.filter(like="dFID").iloc[:, 0]
    assert dfid[by_name["shifted"]["setting"]] == "+0.300 [+0.30, +0.30]"
    assert dfid[by_name["close"]["setting"]].endswith("≈") and not dfid[by_name["far"]["setting"]].endswith("≈")
    assert cells.loc[by_name["full"]["setting"], "Pareto"] == "★≈"


def test_settings_without_shared_seeds_fall_back_to_their_own_intervals():
    assert all(math.isnan(v) for v in paired_interval({0: 1.0, 1: 2.0}, {2: 1.0, 3: 2.0}, 0.95))
    assert paired_interval({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 1.0, 2: np.nan}, 0.95) == (2.0, 4.0)
    assert list(includes_zero([[-1.0, 1.0], [0.5, 2.0], [-2.0, 0.0]])) == [True, False, True]


def test_three_seeds_at_95_percent_span_the_lowest_to_the_highest():
    """Each all-equal resample has probability 1/27 > 2.5%, so the quantiles are the extreme values."""
    assert mean_bootstrap_interval([4.0, 9.0, 5.0]) == (4.0, 9.0)
    assert all(math.isnan(v) for v in mean_bootstrap_interval([4.0]))


def exact_quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The bootstrap distribution of the mean by its multinomial counts (a different route than resampling)."""
    k = len(values)
    atoms, weights = [], []
    for counts in itertools.product(range(k + 1), repeat=k - 1):
        if sum(counts) <= k:
            counts = (*counts, k - sum(counts))
            weights.append(math.factorial(k) / math.prod(math.factorial(c) for c in counts) / k ** k)
            atoms.append(float(np.dot(counts, values)) / k)
    order = np.argsort(atoms)
    cdf = np.cumsum(np.asarray(weights)[order])
    atoms = np.asarray(atoms)[order]
    return tuple(float(atoms[np.searchsorted(cdf, q - 1e-12)]) for q in ((1 - level) / 2, (1 + level) / 2))


@pytest.mark.parametrize("k", [5, 7])  # 5: every resample enumerated; 7 (7**7 resamples): Monte Carlo
def test_bootstrap_interval_matches_the_exact_bootstrap_distribution(k):
    values = np.random.default_rng(k).uniform(0, 10, k)
    low, high = mean_bootstrap_interval(values, level=0.9)
    exact_low, exact_high = exact_quantiles(values, 0.9)
    tolerance = 1e-9 if k ** k <= 50_000 else 0.03 * np.ptp(values)
    assert low == pytest.approx(exact_low, abs=tolerance) and high == pytest.approx(exact_high, abs=tolerance)


def test_matched_table_marks_differences_to_full_that_the_paired_interval_does_not_resolve():
    """At a matched target each seed's interpolated FID is compared with that seed's `full`: a curve above
    `full` by the same amount at every seed is resolved even where the two seed intervals overlap."""
    from adadiff_bench.report.tables import matched_markdown, matched_points, matched_table
    full = {0: 10.0, 1: 12.0, 2: 14.0}
    offsets = {"steady": [0.5, 0.5, 0.5], "mixed": [1.0, -1.0, 0.5]}  # FID above `full` at layer ratio 0.6
    rows = [{"method": "full", "params": "{}", "seed": s, "layer_ratio": 1.0, "fid_digits_cnn": f, "entry": 0,
             "swept": "[]"} for s, f in full.items()]
    for entry, (name, deltas) in enumerate(offsets.items(), start=1):
        for seed, delta in enumerate(deltas):  # (0.4, full + 2 delta) -> (0.8, full): full + delta at 0.6
            rows += [{"method": "static-exit", "params": json.dumps({"k": k, "tag": name}), "seed": seed,
                      "layer_ratio": ratio, "fid_digits_cnn": full[seed] + 2 * delta * (ratio < 0.6), "entry": entry,
                      "swept": json.dumps(["k"])} for k, ratio in ((4, 0.4), (8, 0.8))]
    frame = pd.DataFrame(rows).assign(solver="ddim", num_steps=25, valid=True, ceiling=False,
                                      gflops_per_image=lambda f: 2 * f["layer_ratio"])
    info = {"reference": {"solver": "ddim", "num_steps": 25}}
    points = matched_points(frame, info, targets=(0.6,)).query("axis == 'layer ratio' and curve.str.contains('mixed')")
    assert points["seed"].tolist() == [0, 1, 2] and points["full_value"].tolist() == list(full.values())
    assert (points["value"] - points["full_value"]).tolist() == pytest.approx(offsets["mixed"])
    matched = matched_table(frame, info, targets=(0.6,))
    by_tag = matched.set_index(matched["curve"].str.extract(r"tag=(\w+)")[0])
    column = "fid_digits_cnn at layer ratio 0.6"
    assert by_tag.loc["steady", column + " low"] <= max(full.values())  # unpaired, the intervals overlap
    assert (by_tag.loc["steady", column + " dlow"], by_tag.loc["steady", column + " dhigh"]) == pytest.approx((0.5, 0.5))
    assert (by_tag.loc["mixed", column + " dlow"], by_tag.loc["mixed", column + " dhigh"]) == pytest.approx((-1.0, 1.0))
    shown = matched_markdown(matched).set_index(by_tag.index)[column]
    assert not shown["steady"].endswith("≈") and shown["mixed"].endswith("≈")
