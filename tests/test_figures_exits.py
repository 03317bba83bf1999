"""Exit figures and AdaDiff's figures: what is plotted equals the step-log summaries and artifacts, the setting
selection, and runs that lack data."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adadiff_bench.report import ReportView, adadiff_figures, exit_figures, load_runs
from adadiff_bench.report.adadiff_figures import estimator_ablation, recorded_exit, uncertainty_maps
from adadiff_bench.report.exit_figures import (closest_per_entry, exit_distributions, exit_fractions, exit_heatmaps,
                                               layer_ratio_by_timestep)
from adadiff_bench.results import write_csv, write_json, write_npz

NUM_BLOCKS, TIMESTEPS = 4, np.array([999.0, 666.0, 333.0])
RNG = np.random.default_rng(0)


def prefix_histogram(num_samples=10):
    """Random exits over exit points 1..NUM_BLOCKS at each step (column 0 empty)."""
    histogram = np.zeros((len(TIMESTEPS), NUM_BLOCKS + 1), dtype=np.int64)
    for step in range(len(TIMESTEPS)):
        histogram[step, 1:] = RNG.multinomial(num_samples, np.ones(NUM_BLOCKS) / NUM_BLOCKS)
    return histogram


def summaries(histogram, block_fraction=None):
    if block_fraction is None:
        block_fraction = RNG.uniform(0.2, 1.0, (len(TIMESTEPS), NUM_BLOCKS))
    return {"timesteps": TIMESTEPS, "exit_histogram": histogram.sum(0), "timestep_exit_histogram": histogram,
            "timestep_block_fraction": block_fraction}


def make_row(entry, method, knobs, layer_ratio, swept=(), fid=10.0):
    cell_id = f"{method}-" + "-".join(f"{k}={v}" for k, v in knobs.items()) + f"-e{entry}"
    return {"method": method, "params": json.dumps(knobs), "solver": "ddim", "num_steps": len(TIMESTEPS),
            "num_samples": 10, "seed": 0, "valid": True, "entry": entry, "swept": json.dumps(list(swept)),
            "fid_digits_cnn": fid, "layer_ratio": layer_ratio, "cell_id": cell_id}


def write_store(run_dir, rows, exits, artifacts=None):
    """A results run by hand: results.csv, run.json and cells/<id>/exits.npz (+ other artifacts), read back as a view."""
    write_csv(run_dir / "results.csv", pd.DataFrame(rows))
    write_json(run_dir / "run.json", {"config": {"name": "hand-made"}})
    for cell_id, arrays in exits.items():
        write_npz(run_dir / "cells" / cell_id / "exits.npz", **arrays)
    for (cell_id, name), arrays in (artifacts or {}).items():
        write_npz(run_dir / "cells" / cell_id / f"{name}.npz", **arrays)
    return load_runs([run_dir])


@pytest.fixture
def store(tmp_path):
    """full, AdaDiff swept over three thresholds, CALM, a caching method, and a row without step-log files."""
    full = np.zeros((len(TIMESTEPS), NUM_BLOCKS + 1), dtype=np.int64)
    full[:, NUM_BLOCKS] = 10
    cache = full.copy()
    cache[1] = [10, 0, 0, 0, 0]  # step 1 reuses its cache: no prefix exit
    sweep = ((0.1, 0.85), (0.2, 0.72), (0.3, 0.5))  # (threshold, layer ratio): 0.72 is closest to 0.7
    rows = [make_row(0, "full", {}, 1.0),
            *[make_row(1, "adadiff", {"threshold": t}, ratio, ["threshold"]) for t, ratio in sweep],
            make_row(2, "calm", {"tau": 0.9}, 0.6, ["tau"]),
            make_row(3, "deepcache", {"interval": 2}, 0.7, ["interval"]),
            make_row(4, "fora", {"interval": 3}, 0.4, ["interval"])]
    calm = prefix_histogram()
    calm[0, 0] = 3  # three samples without a prefix exit: they count in the step's total
    exits = {rows[0]["cell_id"]: summaries(full, np.ones((len(TIMESTEPS), NUM_BLOCKS))),
             **{row["cell_id"]: summaries(prefix_histogram()) for row in rows[1:4]},
             rows[4]["cell_id"]: summaries(calm),
             rows[5]["cell_id"]: summaries(cache, np.array([[1.0] * 4, [0.0, 0.0, 1.0, 1.0], [1.0] * 4]))}
    maps = RNG.uniform(0, 1, (2, 3, NUM_BLOCKS - 1, 1, 8, 8)).astype(np.float32)
    maps[0, 0, 1:] = np.nan  # sample 0 exits at block 1 on the first recorded step
    inputs = RNG.normal(size=(2, 3, 1, 8, 8)).astype(np.float32)
    samples = RNG.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    artifacts = {(rows[2]["cell_id"], "uncertainty_maps"): {"steps": np.array([0, 2]), "timesteps": TIMESTEPS[[0, 2]],
                                                             "maps": maps, "inputs": inputs},
                 (rows[2]["cell_id"], "samples"): {"arr_0": samples}}
    view = write_store(tmp_path / "run", rows, exits, artifacts)
    return view, view.frame, exits, (maps, samples)


@pytest.fixture
def captured(monkeypatch):
    """The figures handed to `save`, still open, so that tests can read back what was drawn."""
    figures = {}
    real_save = exit_figures.save

    def capture(fig, out, stem):
        figures[stem] = fig
        fig.canvas.draw()  # plotted arrays stay readable after save closes the figure
        return real_save(fig, out, stem)
    for module in (exit_figures, adadiff_figures):
        monkeypatch.setattr(module, "save", capture)
    return figures


def assert_valid_files(paths):
    assert paths and all(p.is_file() for p in paths)
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        else:
            assert path.read_bytes().startswith(b"%PDF")


def test_exit_fractions_are_the_histogram_normalised_per_step():
    histogram = np.array([[0, 2, 3, 0, 5], [0, 0, 0, 0, 0], [4, 0, 1, 1, 4]])
    fractions = exit_fractions(histogram)
    for step in (0, 2):
        total = sum(histogram[step])
        assert fractions[step].tolist() == pytest.approx([histogram[step][e] / total for e in range(1, 5)])
    assert np.isnan(fractions[1]).all()  # a step that did not run


def test_selection_picks_the_setting_closest_to_0_7_per_entry():
    frame = pd.DataFrame({"entry": [0, 0, 0, 1, 1], "layer_ratio": [0.9, 0.66, 0.5, 0.2, 0.3],
                          "method": ["a"] * 3 + ["b"] * 2})
    picked = closest_per_entry(frame, pd.Series(True, index=frame.index))
    assert picked["layer_ratio"].tolist() == [0.66, 0.3]
    eligible = pd.Series([True, False, True, True, True])
    assert closest_per_entry(frame, eligible)["layer_ratio"].tolist() == [0.5, 0.3]


def test_exit_heatmaps_plot_each_early_exit_entry_at_its_closest_setting(store, captured, tmp_path):
    view, frame, exits, _ = store
    paths = exit_heatmaps(view, tmp_path / "out")
    assert_valid_files(paths)
    panels = [ax for ax in captured["exit_heatmaps"].axes if ax.images]
    # adadiff at layer ratio 0.72 and calm; full (every exit at the last block) and the caching rows are left out
    assert len(panels) == 2 and "adadiff (threshold=0.2)" in panels[0].get_title()
    for ax, row in zip(panels, (frame.iloc[2], frame.iloc[4])):
        histogram = exits[row["cell_id"]]["timestep_exit_histogram"]
        expected = histogram[:, 1:] / histogram.sum(1, keepdims=True)
        assert np.asarray(ax.images[0].get_array()) == pytest.approx(expected)
    assert (tmp_path / "out" / "exit_heatmaps" / f"{frame.iloc[2]['cell_id']}.png").is_file()


def test_exit_distributions_plot_the_chosen_steps(store, captured, tmp_path):
    view, frame, exits, _ = store
    assert_valid_files(exit_distributions(view, tmp_path / "out", steps=[0, 2]))
    axes = [ax for ax in captured["exit_distributions"].axes if ax.lines]
    assert [ax.get_title() for ax in axes] == ["step 1 of 3, t = 999", "step 3 of 3, t = 333"]
    histogram = exits[frame.iloc[4]["cell_id"]]["timestep_exit_histogram"]  # calm, the second line
    assert axes[0].lines[1].get_ydata() == pytest.approx(histogram[0, 1:] / histogram[0].sum())


def test_layer_ratio_by_timestep_is_the_mean_block_fraction(store, captured, tmp_path):
    view, frame, exits, _ = store
    assert_valid_files(layer_ratio_by_timestep(view, tmp_path / "out"))
    figure = captured["layer_ratio_by_timestep"]
    lines_ax, raster_ax = [ax for sub in figure.subfigs for ax in sub.axes if ax.get_title()]
    labels = [line.get_label() for line in lines_ax.lines]
    assert labels[0].startswith("full") and len(labels) == 3  # the reference, adadiff, calm
    for line, row in zip(lines_ax.lines[1:], (frame.iloc[2], frame.iloc[4])):
        assert line.get_xdata() == pytest.approx(TIMESTEPS)
        assert line.get_ydata() == pytest.approx(exits[row["cell_id"]]["timestep_block_fraction"].mean(axis=1))
    # the caching setting is a raster row; fora has no step-log file and is left out
    [mesh] = raster_ax.collections
    assert np.asarray(mesh.get_array()).ravel() == pytest.approx([1.0, 0.5, 1.0])
    assert [tick.get_text() for tick in raster_ax.get_yticklabels()] == ["deepcache (interval=2), layer ratio 0.70"]


def test_uncertainty_maps_mask_samples_that_had_exited(store, captured, tmp_path):
    view, frame, _, (maps, samples) = store
    paths = uncertainty_maps(view, tmp_path / "out")
    assert_valid_files(paths)
    assert paths[0].name.startswith("uncertainty_maps_adadiff-threshold0.2")
    figure = captured[paths[0].stem]
    block_2 = next(ax for ax in figure.axes if ax.get_title() == "u, block 2")  # sample 0, first recorded step
    drawn = block_2.images[0].get_array()
    assert drawn.mask.all() and block_2.get_xlabel() == "exited"
    block_1 = next(ax for ax in figure.axes if ax.get_title() == "u, block 1")
    assert np.asarray(block_1.images[0].get_array()) == pytest.approx(maps[0, 0, 0, 0])
    finals = [ax for ax in figure.axes if ax.get_title() == "final $x_0$"]  # one per sample, top row only
    assert len(finals) == 2 and np.asarray(finals[1].images[0].get_array()) == pytest.approx(samples[1, ..., 0])
    assert recorded_exit(maps[0, 0]) == 1 and recorded_exit(maps[1, 0]) is None


def ablation_frame():
    rows = [make_row(0, "full", {}, 1.0, fid=9.0)]
    for estimator, ratios in (("official", (1.0, 1.0)), ("probe", (0.8, 0.6))):
        for threshold, ratio in zip((0.1, 0.2), ratios):
            rows.append(make_row(1, "adadiff", {"estimator": estimator, "threshold": threshold}, ratio,
                                 ["estimator", "threshold"], fid=10.0 + threshold))
    return pd.DataFrame(rows)


def test_estimator_ablation_draws_one_curve_per_estimator(captured, tmp_path):
    assert_valid_files(estimator_ablation(ReportView(ablation_frame()), tmp_path / "out"))
    [ax] = captured["estimator_ablation"].axes
    official, probe, full = ax.lines
    assert official.get_label() == "estimator = official (never exits)"
    assert probe.get_xdata().tolist() == [0.6, 0.8] and probe.get_ydata() == pytest.approx([10.2, 10.1])
    assert list(full.get_ydata()) == [9.0, 9.0] and full.get_linestyle() == "--"
    assert "n=10" in ax.get_ylabel() and "digits_cnn" in ax.get_ylabel()


def test_runs_without_exits_maps_or_ablation_return_nothing(tmp_path):
    rows = [make_row(0, "full", {}, 1.0), make_row(1, "adadiff", {"threshold": 0.1}, 1.0)]
    full = np.zeros((len(TIMESTEPS), NUM_BLOCKS + 1), dtype=np.int64)
    full[:, NUM_BLOCKS] = 10
    ones = np.ones((len(TIMESTEPS), NUM_BLOCKS))
    view = write_store(tmp_path / "run", rows, {rows[0]["cell_id"]: summaries(full, ones)})  # adadiff: no files
    assert step_log_and_adadiff_figures(view, tmp_path / "out") == []
    bare = dataclasses.replace(view, frame=view.frame.drop(columns=["entry", "fid_digits_cnn"]))
    assert step_log_and_adadiff_figures(bare, tmp_path / "out") == []


def step_log_and_adadiff_figures(view, out):
    """Every figure of the two modules, as the report draws them for one run."""
    return [path for draw in (exit_heatmaps, exit_distributions, layer_ratio_by_timestep, uncertainty_maps,
                              estimator_ablation) for path in draw(view, out)]
