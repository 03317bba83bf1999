"""Estimator quality without thresholds: the analysis pass, the statistics, and the report's table and figure."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench.checkpoints import cached_checkpoint, save_checkpoint
from adadiff_bench.cli import main
from adadiff_bench.diffusion import initial_noise, sample_generators
from adadiff_bench.harness import Cell
from adadiff_bench.methods import get_method
from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff, save_adadiff
from adadiff_bench.methods.adadiff.quality import quality_pass
from adadiff_bench.report import estimator_quality as estimator_quality_module
from adadiff_bench.report.estimator_quality import (TOLERANCES, analysed_settings, auroc, calibration_curve, quality_rows,
                                                    slice_row, spearman, summary_markdown)
from conftest import REPO, TINY, write_run_config

FINETUNED = str(REPO / "checkpoints" / "adadiff_digits_finetuned.pt")


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 (continuous data: no ties)."""
    order = np.argsort(values)
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def mann_whitney_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half: every pair."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_statistics_equal_independent_computations():
    rng = np.random.default_rng(0)
    error = rng.gamma(2.0, 0.05, 300)
    uncertainty = np.tanh(error) + rng.normal(0, 0.05, 300)
    expected = np.corrcoef(ranks(uncertainty), ranks(error))[0, 1]  # Spearman = Pearson of the ranks
    assert spearman(uncertainty, error) == pytest.approx(expected, abs=1e-12)
    for tolerance in (0.05, 0.1, 0.2):
        assert auroc(uncertainty, error, tolerance) == pytest.approx(
            mann_whitney_auroc(-uncertainty, error <= tolerance), abs=1e-12)


def test_a_perfect_estimator_scores_one_and_a_random_one_about_a_half():
    rng = np.random.default_rng(1)
    error = rng.uniform(0, 0.6, 4000)
    assert spearman(error, error) == pytest.approx(1.0)
    assert all(auroc(error, error, t) == 1.0 for t in TOLERANCES if 0 < np.mean(error <= t) < 1)
    noise = rng.uniform(0, 1, 4000)
    assert abs(spearman(noise, error)) < 0.05
    assert all(abs(auroc(noise, error, t) - 0.5) < 0.05 for t in (0.1, 0.2, 0.5))


def test_one_class_and_constant_inputs_give_nan_not_a_number_that_looks_real():
    error = np.linspace(0, 0.01, 50)
    assert np.isnan(auroc(error, error, 1.0)) and np.isnan(auroc(error, error, -1.0))
    assert np.isnan(spearman(np.ones(50), error))


def test_rows_are_the_slices_they_name():
    rng = np.random.default_rng(2)
    u, error = rng.uniform(size=(6, 10, 4)), rng.uniform(0, 0.3, size=(6, 10, 4))
    arrays = {"uncertainty": u, "eps_error": error, "timesteps": np.linspace(999, 0, 10)}
    table = pd.DataFrame(quality_rows(arrays, "s", 0))
    # 3 exit points + "all", times 5 buckets + "all"; the last exit (full depth) is left out
    assert len(table) == 4 * 6 and set(table["exit_point"]) == {"all", "1", "2", "3"}
    row = table[(table["exit_point"] == "2") & (table["timestep_bucket"] == "all")].iloc[0]
    expected = slice_row(u[:, :, 1].ravel(), error[:, :, 1].ravel())
    assert row["spearman"] == pytest.approx(expected["spearman"]) and row["samples"] == 60
    first = table[(table["exit_point"] == "all") & table["timestep_bucket"].str.startswith("steps 1-2 ")].iloc[0]
    assert first["spearman"] == pytest.approx(spearman(u[:, :2, :3].ravel(), error[:, :2, :3].ravel()))
    assert first[f"auroc_tol{0.1:g}"] == pytest.approx(auroc(u[:, :2, :3].ravel(), error[:, :2, :3].ravel(), 0.1))


class ArtifactsOnly:
    """A report view with just what the analysis reads: rows, and each row's artifact from a dict."""
    def __init__(self, rows: list[dict], artifacts: dict[str, dict]):
        self.frame, self._artifacts = pd.DataFrame(rows), artifacts

    def artifact(self, row, name):
        return self._artifacts.get(row["cell_id"])


def test_one_network_reached_through_several_knobs_is_one_setting_and_seeds_are_summarised():
    rng = np.random.default_rng(3)
    draw = lambda: {"uncertainty": rng.uniform(size=(8, 10, 4)), "eps_error": rng.uniform(0, 0.3, size=(8, 10, 4)),  # noqa: E731
                    "timesteps": np.linspace(999, 0, 10)}
    official, probe = {0: draw(), 1: draw()}, {0: draw(), 1: draw()}
    rows, artifacts = [], {}
    for knobs, per_seed in [({"estimator": "official"}, official), ({"loss": "official"}, official),
                            ({"estimator": "probe"}, probe), ({"estimator": "official", "threshold": 0.1}, official)]:
        for seed, arrays in per_seed.items():
            cell = f"{json.dumps(knobs)}-{seed}"
            rows.append({"method": "adadiff", "params": json.dumps(knobs), "solver": "ddim", "num_steps": 10,
                         "seed": seed, "cell_id": cell})
            artifacts[cell] = arrays
    settings = analysed_settings(ArtifactsOnly(rows, artifacts))
    assert [s.label for s in settings] == ["estimator=official = loss=official", "estimator=probe"]  # threshold: no new analysis
    assert [sorted(s.seeds) for s in settings] == [[0, 1], [0, 1]]
    table = pd.concat([pd.DataFrame(quality_rows(a, s.label, seed)) for s in settings for seed, a in s.seeds.items()])
    summary = summary_markdown(table)
    pooled = [slice_row(official[seed]["uncertainty"][..., :3].ravel(), official[seed]["eps_error"][..., :3].ravel())["spearman"]
              for seed in (0, 1)]
    assert f"| estimator=official = loss=official | {np.mean(pooled):.3f} ± {np.std(pooled, ddof=1):.3f} |" in summary
    assert "mean over 2 seed(s)" in summary


def test_the_auroc_line_has_a_gap_exactly_where_the_table_says_n_a(tmp_path, monkeypatch):
    """Seed 1's exits are all within the larger tolerances (one class empty: no AUROC): the figure's line must not
    show seed 0's value alone there, as if it were the mean over both."""
    rng = np.random.default_rng(5)

    def draw(largest_error):
        error = rng.uniform(0, largest_error, size=(8, 10, 4))
        return {"uncertainty": rng.uniform(size=(8, 10, 4)), "eps_error": error, "tanh_error": np.tanh(error),
                "timesteps": np.linspace(999, 0, 10)}
    artifacts = {"seed0": draw(3.0), "seed1": draw(0.15)}
    rows = [{"method": "adadiff", "params": "{}", "solver": "ddim", "num_steps": 10, "seed": seed, "cell_id": f"seed{seed}"}
            for seed in (0, 1)]
    figures = {}
    monkeypatch.setattr(estimator_quality_module, "save", lambda fig, out, stem: figures.setdefault(stem, fig) and [])
    estimator_quality_module.estimator_quality(ArtifactsOnly(rows, artifacts), tmp_path)
    line = figures["estimator_quality"].axes[1].lines[0].get_ydata()
    shown = (tmp_path / "estimator_quality.md").read_text().splitlines()[-1].split(" | ")[3:]
    assert [np.isnan(v) for v in line] == [cell.startswith("n/a") for cell in shown] == [False] * 3 + [True] * 3


def test_calibration_curve_bins_predictions():
    predicted = np.array([0.05, 0.07, 0.55, 0.95])
    observed = np.array([0.1, 0.3, 0.5, 0.7])
    x, y = calibration_curve(predicted, observed)
    assert np.allclose(x, [0.06, 0.55, 0.95]) and np.allclose(y, [0.2, 0.5, 0.7])


def test_the_pass_records_every_exit_against_full_depth_on_the_shipped_checkpoint(one_thread):
    net = cached_checkpoint(FINETUNED, get_method("adadiff").reads)
    cell = Cell("adadiff", (), "dpm-solver++", 4, 3)
    arrays = quality_pass(net, cell, num_samples=5, batch_size=3)
    assert arrays["uncertainty"].shape == (5, 4, net.num_exits) and np.isfinite(arrays["uncertainty"]).all()
    assert np.all(arrays["eps_error"][:, :, -1] == 0)  # full depth against itself
    # step 0's input is each sample's initial noise: recompute its exits with plain calls
    shape = (net.backbone.in_chans, net.backbone.img_size, net.backbone.img_size)
    x = initial_noise(sample_generators(3, range(5)), shape)
    t = torch.full((5,), float(arrays["timesteps"][0]))
    with torch.no_grad():
        predictions, _ = net.all_exits(x, t, None)
        for exit_point in (1, 6, net.num_exits - 1):
            error = (predictions[exit_point - 1] - predictions[-1]).abs().flatten(1).mean(1).numpy()
            assert np.allclose(arrays["eps_error"][:, 0, exit_point - 1], error, rtol=1e-5, atol=1e-6)
            scalar = net.estimator.scalar(exit_point, _tokens_after(net, x, t, exit_point), t).numpy()
            assert np.allclose(arrays["uncertainty"][:, 0, exit_point - 1], scalar, atol=1e-6)


def _tokens_after(net, x, t, blocks):
    tokens, state = net.backbone.begin(x, t, None)
    for block in range(blocks):
        tokens = net.backbone.run_block(block, tokens, state)
    return tokens


def test_a_run_that_asks_for_it_gets_the_table_and_figure_in_its_report(tmp_path, one_thread):
    torch.manual_seed(0)
    net = build_adadiff(TINY, AdaDiffConfig()).eval()
    with torch.no_grad():
        for p in net.estimator.parameters():
            p.normal_(0, 0.5)
    save_adadiff(tmp_path / "adadiff.pt", net, TINY)
    save_checkpoint(tmp_path / "tiny.pt", net.backbone, TINY)
    methods = (f'\n[[methods]]\nname = "adadiff"\ncheckpoint = "{tmp_path / "adadiff.pt"}"\n'
               'threshold = [0.3, 0.5]\nquality_samples = 6\n')
    config = write_run_config(tmp_path, tmp_path / "tiny.pt", methods, timing="enabled = false")
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    assert main(["report", str(tmp_path / "results" / "tiny"), "--out", str(tmp_path / "report")]) == 0
    table = pd.read_csv(tmp_path / "report" / "estimator_quality.csv")
    # the two thresholds share one analysis (the estimator does not depend on the threshold)
    assert table["setting"].nunique() == 1 and (table["samples"] > 0).all()
    assert {"spearman", *[f"auroc_tol{t:g}" for t in TOLERANCES]} <= set(table.columns)
    assert (tmp_path / "report" / "estimator_quality.png").is_file()
    assert "| setting | Spearman (pooled)" in (tmp_path / "report" / "estimator_quality.md").read_text()
    assert "Estimator quality without thresholds" in (tmp_path / "report" / "index.html").read_text()
