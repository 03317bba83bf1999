"""AdaDiff's `target_layer_ratio`: thresholds found on calibration samples reach their compute target.

Checked against sampling itself (the shipped digits checkpoint, small n and few steps), against a
brute-force grid of thresholds, and with a constant estimator whose one jump no threshold can split.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench.checkpoints import cached_checkpoint, save_checkpoint
from adadiff_bench import harness
from adadiff_bench.calibration_memo import memo_folder
from adadiff_bench.cli import main
from adadiff_bench.config import UViTConfig, load_run_config
from adadiff_bench.errors import UserError
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.adadiff import load_adadiff, save_adadiff
from adadiff_bench.methods.adadiff.calibration import RESOLUTION, find_threshold
from adadiff_bench.report.adadiff_figures import estimator_ablation
from adadiff_bench.report.view import ReportView
from conftest import REPO, TINY, write_run_config
from test_figures_exits import captured, make_row  # noqa: F401 (a fixture and a row maker shared with them)

FINETUNED = str(REPO / "checkpoints" / "adadiff_digits_finetuned.pt")
SOLVER, STEPS, N = "dpm-solver++", 6, 16
ADADIFF = get_method("adadiff")


def shipped_network():
    return cached_checkpoint(FINETUNED, ADADIFF.reads)


def layer_ratio_of(model, checkpoint=FINETUNED):
    """What the harness hands `calibrate`: sample `num_samples` images with `knobs`, return their layer ratio."""
    def run(knobs, num_samples, seed):
        cell = Cell("adadiff", (("checkpoint", checkpoint),), SOLVER, STEPS, seed)
        _, log = generate(cell, model, num_samples, num_samples, method=build_method(cell, model, knobs))
        return log.layer_ratio()
    return run


def calibrated(checkpoint=FINETUNED, **knobs):
    net = cached_checkpoint(checkpoint, ADADIFF.reads)
    params = make_params(ADADIFF, {"checkpoint": checkpoint, "calibration_samples": N, **knobs}, "test")
    return ADADIFF.calibrate(params, layer_ratio_of(net.backbone, checkpoint), [0]), net


def test_found_threshold_reaches_its_target_on_the_calibration_seed(one_thread):
    params, net = calibrated(target_layer_ratio=0.7, target_tolerance=0.02)
    search = params.search
    assert search.reached and abs(search.layer_ratio - 0.7) <= 0.02
    assert params.threshold == search.threshold and params.target_layer_ratio == 0.7
    # sampling the calibration seed again at that threshold, with a plain `threshold` knob, gives that ratio
    plain = make_params(ADADIFF, {"checkpoint": FINETUNED, "threshold": search.threshold}, "test")
    ratio = layer_ratio_of(net.backbone)(plain, N, params.calibration_seed)
    assert ratio == search.layer_ratio
    row = build_method(Cell("adadiff", (), SOLVER, STEPS, 0), net.backbone, params).row_fields()
    assert row["target_reached"] is True and row["calibrated_threshold"] == search.threshold
    assert row["nearest_layer_ratio_below"] <= 0.7 <= row["nearest_layer_ratio_above"]


def test_a_found_threshold_samples_exactly_as_the_same_threshold_given(one_thread):
    """The exit rule is unchanged: calibrated knobs and a plain threshold give bit-identical images and logs."""
    params, net = calibrated(target_layer_ratio=0.8)
    plain = make_params(ADADIFF, {"checkpoint": FINETUNED, "threshold": params.threshold}, "test")
    cell = Cell("adadiff", (), SOLVER, STEPS, 0)
    images_a, log_a = generate(cell, net.backbone, 8, 8, method=build_method(cell, net.backbone, params))
    images_b, log_b = generate(cell, net.backbone, 8, 8, method=build_method(cell, net.backbone, plain))
    assert torch.equal(images_a, images_b) and np.array_equal(log_a.exit_point, log_b.exit_point)


def test_bisection_agrees_with_a_brute_force_grid_on_real_sampling(one_thread):
    """Every target the grid shows reachable within tolerance is reached; a found ratio is one sampling gives."""
    net = shipped_network()
    base = make_params(ADADIFF, {"checkpoint": FINETUNED}, "test")
    run = layer_ratio_of(net.backbone)
    grid = np.linspace(0, 0.2, 81)  # the shipped estimator's thresholds that move the ratio lie below 0.2
    ratios = {float(t): run(make_params(ADADIFF, {"checkpoint": FINETUNED, "threshold": float(t)}, "test"), N, 5)
              for t in grid}
    reachable = 0
    for target in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
        search = find_threshold(lambda t: run(_with(base, t), N, 5), target, 0.02)
        grid_best = min(abs(r - target) for r in ratios.values())
        if grid_best <= 0.02:
            reachable += 1
            assert search.reached
        assert abs(search.layer_ratio - target) <= max(0.02, grid_best)
        assert search.layer_ratio == run(_with(base, search.threshold), N, 5)
        # every grid point the search also evaluated gave the same ratio (the search samples as the grid does)
        for evaluation in search.evaluations:
            if evaluation.threshold in ratios:
                assert ratios[evaluation.threshold] == evaluation.layer_ratio
    assert reachable >= 4  # the grid itself reaches most targets: the check above is not vacuous


def _with(params, threshold):
    return dataclasses.replace(params, threshold=threshold)


@pytest.mark.parametrize("exits_grow", [True, False])
def test_bisection_finds_the_same_step_as_brute_force_on_a_monotone_staircase(exits_grow):
    """A known non-increasing staircase of ratios: the search lands on the step a fine grid picks."""
    edges = np.array([0.13, 0.29, 0.41, 0.58, 0.77])       # thresholds where the ratio drops
    levels = np.array([1.0, 0.91, 0.83, 0.66, 0.52, 0.3])  # ratio on each step

    def ratio(threshold):
        position = threshold if exits_grow else 1.0 - threshold
        return float(levels[np.searchsorted(edges, position, side="right")])

    grid = np.linspace(0, 1, 2001)
    for target in (0.9, 0.83, 0.7, 0.5, 0.31):
        search = find_threshold(ratio, target, 0.015, exits_grow_with_threshold=exits_grow)
        brute = min(grid, key=lambda t: (abs(ratio(t) - target), -ratio(t)))
        assert search.layer_ratio == ratio(brute) and ratio(search.threshold) == search.layer_ratio
        assert search.reached == (abs(ratio(brute) - target) <= 0.015)
        assert search.ratio_below <= target <= search.ratio_above
        if not search.reached:  # the search closed on the jump across the target: its two sides are exact
            assert search.ratio_below == levels[levels <= target].max()
            assert search.ratio_above == levels[levels >= target].min()


def test_an_unreachable_target_is_flagged_with_the_nearest_achievable_ratios(tmp_path, one_thread):
    """A constant estimator (u = 0.5 everywhere) jumps from full depth to the first exit: 0.6 is unreachable."""
    net = load_adadiff(FINETUNED)  # a fresh copy: the cached one stays untouched
    with torch.no_grad():
        for linear in net.estimator.certainty:
            linear.weight.zero_()
            linear.bias.zero_()
    path = tmp_path / "constant.pt"
    save_adadiff(path, net, UViTConfig(**torch.load(FINETUNED, map_location="cpu", weights_only=True)["model"]))
    params, _ = calibrated(str(path), target_layer_ratio=0.6)
    search = params.search
    first_exit = 1 / net.num_exits
    assert not search.reached
    assert search.ratio_above == 1.0 and search.ratio_below == pytest.approx(first_exit)
    # the search closed on the jump at u = 0.5 to its resolution
    jumps = sorted(e.threshold for e in search.evaluations)
    assert any(0.5 - RESOLUTION <= t < 0.5 for t in jumps) and 0.5 in jumps
    row = build_method(Cell("adadiff", (), SOLVER, STEPS, 0), net.backbone, params).row_fields()
    assert row["target_reached"] is False and row["nearest_layer_ratio_above"] == 1.0
    assert math.isclose(row["nearest_layer_ratio_below"], first_exit)


def test_threshold_and_target_together_are_refused_in_one_line():
    with pytest.raises(UserError, match="threshold and target_layer_ratio exclude each other") as info:
        make_params(ADADIFF, {"threshold": 0.2, "target_layer_ratio": 0.7}, "test")
    assert "\n" not in str(info.value)


def test_a_calibration_seed_among_the_evaluation_seeds_is_refused():
    params = make_params(ADADIFF, {"target_layer_ratio": 0.7, "calibration_seed": 3}, "test")
    with pytest.raises(UserError, match="calibration_seed 3 is also an evaluation seed"):
        ADADIFF.calibrate(params, lambda *args: 1.0, [0, 3])


def tiny_target_run(tmp_path, targets="[0.8, 0.5]") -> Path:
    """A small run config whose AdaDiff setting calibrates `targets` (a tiny network with a spread estimator)."""
    torch.manual_seed(0)
    from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff
    net = build_adadiff(TINY, AdaDiffConfig()).eval()
    with torch.no_grad():  # spread the estimator's outputs so that thresholds split the samples
        for p in net.estimator.parameters():
            p.normal_(0, 0.5)
    save_adadiff(tmp_path / "adadiff.pt", net, TINY)
    save_checkpoint(tmp_path / "tiny.pt", net.backbone, TINY)
    methods = (f'\n[[methods]]\nname = "adadiff"\ncheckpoint = "{tmp_path / "adadiff.pt"}"\n'
               f'target_layer_ratio = {targets}\ncalibration_samples = 8\ntarget_tolerance = 0.05\n')
    return write_run_config(tmp_path, tmp_path / "tiny.pt", methods, timing="enabled = false")


def test_a_run_with_targets_writes_the_calibration_into_its_rows(tmp_path, one_thread):
    config = tiny_target_run(tmp_path)
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    rows = frame[frame["method"] == "adadiff"]
    assert sorted(rows["target_layer_ratio"]) == [0.5, 0.8]
    for _, row in rows.iterrows():
        assert row["nearest_layer_ratio_below"] <= row["target_layer_ratio"] <= row["nearest_layer_ratio_above"]
        assert row["target_reached"] == (abs(row["calibration_layer_ratio"] - row["target_layer_ratio"]) <= 0.05)
        assert 0 <= row["calibrated_threshold"] <= 1
    assert frame[frame["method"] == "full"]["target_layer_ratio"].isna().all()


def calibrated_searches(config, monkeypatch) -> tuple[dict, int]:
    """Each AdaDiff cell's threshold search as `prepare` finds it, and how many calibration runs sampled."""
    sampled = []
    real_generate = harness.generate
    monkeypatch.setattr(harness, "generate", lambda *a, **k: sampled.append(1) or real_generate(*a, **k))
    prep = harness.prepare(load_run_config(config), "test", progress=False)
    searches = {cell.params: prep.params[cell].search for cell in prep.cells if cell.method == "adadiff"}
    return searches, len(sampled)


def test_a_resumed_run_replays_its_calibration_from_disk(tmp_path, one_thread, monkeypatch):
    """The second `prepare` of a run samples no calibration image and finds the very same thresholds; a damaged
    memo file is measured again (and only that one); another batch size is another measurement."""
    config = tiny_target_run(tmp_path, targets="0.7")
    first, runs = calibrated_searches(config, monkeypatch)
    assert runs == sum(len(search.evaluations) for search in first.values()) > 2
    again, runs = calibrated_searches(config, monkeypatch)
    assert again == first and runs == 0
    memos = sorted(memo_folder(tmp_path / "results").glob("*.json"))
    assert len(memos) == len({(e.threshold, s.target) for s in first.values() for e in s.evaluations})
    memos[0].write_text('{"layer_ratio": "__import__(\'os\')"}')
    memos[1].write_bytes(b"\x00not json")
    repaired, runs = calibrated_searches(config, monkeypatch)
    assert repaired == first and runs == 2
    config.write_text(config.read_text().replace("batch_size = 16", "batch_size = 8"))
    assert calibrated_searches(config, monkeypatch)[1] > 0


def test_the_ablation_figure_plots_targets_and_rings_the_unreached_ones(captured, tmp_path):
    """At matched compute a curve's points are its targets; a target calibration missed is ringed and counted."""
    rows = [make_row(0, "full", {}, 1.0, fid=9.0)]
    for estimator, reached_ratios in (("official", ((True, 0.79), (False, 0.52))), ("probe", ((True, 0.8), (True, 0.6)))):
        for target, (reached, ratio) in zip((0.8, 0.6), reached_ratios):
            row = make_row(1, "adadiff", {"estimator": estimator, "target_layer_ratio": target}, ratio,
                           ["estimator", "target_layer_ratio"], fid=10.0 + target)
            rows.append({**row, "target_reached": reached})
    paths = estimator_ablation(ReportView(pd.DataFrame(rows)), tmp_path / "out")
    assert paths and all(p.is_file() for p in paths)
    figure = captured["estimator_ablation"]
    [ax] = figure.axes
    official, ring, probe, full = ax.lines
    assert official.get_label() == "estimator = official (1 target not reached)"
    assert ring.get_xdata().tolist() == [0.52] and ring.get_markerfacecolor() == "none"
    assert probe.get_xdata().tolist() == [0.6, 0.8] and probe.get_ydata() == pytest.approx([10.6, 10.8])
    assert "matched compute" in figure._suptitle.get_text()
