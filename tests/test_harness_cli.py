"""End to end: a tiny config through `adadiff-bench run` and `report`, and the CLI's one-line errors."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adadiff_bench import timing
from adadiff_bench.cli import main
from adadiff_bench.flops import unit_costs
from adadiff_bench.methods import Method, available_methods, get_method, register_method
from conftest import context, write_run_config

REQUIRED_COLUMNS = ["method", "params", "solver", "num_steps", "num_samples", "seed", "fid_digits_cnn",
                    "is_digits_cnn_mean", "kid_digits_cnn_mean", "macs_per_image", "flops_per_image", "layer_ratio",
                    "time_per_image_s", "time_per_image_s_iqr", "speedup", "timing_repeats", "threads", "device",
                    "peak_mem_mb", "precision_digits_cnn", "recall_digits_cnn", "timing_other_cores"]


@pytest.fixture
def finished_run(tmp_path, tiny_checkpoint, tiny_model):
    config = write_run_config(tmp_path, tiny_checkpoint)
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    return tmp_path / "results" / "tiny"


def test_run_writes_a_sane_results_store(finished_run, tiny_model):
    frame = pd.read_csv(finished_run / "results.csv")
    assert list(frame["num_steps"]) == [2, 3] and set(REQUIRED_COLUMNS) <= set(frame.columns)
    assert (frame["method"] == "full").all() and (frame["num_samples"] == 32).all()
    assert frame["fid_digits_cnn"].between(0, 1e4).all() and frame["is_digits_cnn_mean"].between(1, 10).all()
    costs = unit_costs(tiny_model)
    per_eval = costs.embed + costs.blocks.sum() + costs.head
    assert np.allclose(frame["macs_per_image"], frame["num_steps"] * per_eval)
    assert np.allclose(frame["flops_per_image"], 2 * frame["macs_per_image"])
    assert (frame["layer_ratio"] == 1.0).all()
    assert (frame["time_per_image_s"] > 0).all()
    assert (frame["threads"] == 1).all() and (frame["device"] == "cpu").all() and (frame["timing_repeats"] == 3).all()
    assert (frame["peak_mem_mb"] > 50).all()  # the whole process's resident peak: torch alone is larger
    reference = frame[frame["num_steps"] == 3].iloc[0]  # full at the config's default solver and steps
    assert reference["speedup"] == pytest.approx(1.0)

    info = json.loads((finished_run / "run.json").read_text())
    assert info["schema_version"] == 1 and info["config"]["name"] == "tiny"
    assert len(info["checkpoint"]["sha256"]) == 64 and len(info["data"]["sha256"]) == 64
    assert info["versions"]["torch"] and info["machine"]["torch_threads"] == 1 and info["machine"]["device"] == "cpu"
    with np.load(finished_run / "exits.npz") as exits:
        hist = exits[f"{reference['cell_id']}/timestep_exit_histogram"]
        assert hist.shape == (3, tiny_model.num_blocks + 1) and (hist[:, -1] == 32).all()
    with np.load(finished_run / "cells" / reference["cell_id"] / "samples.npz") as archive:
        samples = archive["arr_0"]
    assert samples.shape == (32, 8, 8, 1) and samples.dtype == np.uint8
    assert not (finished_run.parent / ".tiny.partial").exists()


def test_a_cell_timed_beside_busy_processes_says_so_in_its_row_and_one_line(tmp_path, tiny_checkpoint, monkeypatch,
                                                                           capsys):
    def neighbours_on_one_and_a_half_cores():  # the machine busy 1.5 cores beyond this process, whatever it does
        own = os.times()
        return own.user + own.system + 1.5 * time.perf_counter(), own.user + own.system
    monkeypatch.setattr(timing, "cpu_counters", neighbours_on_one_and_a_half_cores)
    assert main(["run", "--config", str(write_run_config(tmp_path, tiny_checkpoint)), "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    assert frame["timing_other_cores"].between(1.4, 1.6).all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "was timed" in line]
    assert len(warnings) == len(frame) == 2 and all("kept 1.5 cores busy" in line for line in warnings)


def test_report_writes_leaderboard_plot_and_grids(finished_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(finished_run), "--out", str(out)]) == 0
    board = (out / "leaderboard.md").read_text()
    assert "FID [digits_cnn, n=32] ↓" in board and board.count("| full (") == 2
    for name in ("fid_vs_gflops.png", "fid_vs_gflops.pdf", "fid_vs_time.png", "fid_vs_time.pdf", "leaderboard.csv",
                 "leaderboard.tex", "speedup_bars.png", "samples_side_by_side.png", "index.html"):
        assert (out / name).stat().st_size > 0
    assert (out / "fid_vs_gflops.pdf").read_bytes().startswith(b"%PDF")
    assert len(list((out / "samples").glob("*.png"))) == 2
    assert Image.open(out / "fid_vs_gflops.png").size[0] > 300
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and 'id="leaderboard"' in page


def test_rerun_is_refused_without_overwrite(finished_run, tmp_path, capsys):
    config = tmp_path / "run.toml"
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["run", "--config", str(config), "--no-progress", "--overwrite", "--num-samples", "16"]) == 0
    assert (pd.read_csv(finished_run / "results.csv")["num_samples"] == 16).all()


def test_killed_run_resumes_keeping_completed_cells(tmp_path, tiny_checkpoint, monkeypatch):
    from adadiff_bench import harness
    config = write_run_config(tmp_path, tiny_checkpoint)
    calls = []
    real = harness.evaluate_cell

    def dies_on_second_cell(cell, *args, **kwargs):
        calls.append(cell.cell_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_cell", dies_on_second_cell)
    assert main(["run", "--config", str(config), "--no-progress"]) == 130
    monkeypatch.setattr(harness, "evaluate_cell", lambda cell, *a, **k: (calls.append(cell.cell_id), real(cell, *a, **k))[1])
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    assert calls == [calls[0], calls[1], calls[1]]  # the first cell was not computed again
    assert len(pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")) == 2


def corrupt(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("extra, edit, message", [
    ('[[methods]]\nname = "ful"\n', None, r"unknown method 'ful' \(did you mean 'full'\?\)"),
    ('[[methods]]\nname = "full"\nsolver = "dpm"\n', None, r"unknown solver 'dpm'"),
    ('[[methods]]\nname = "full"\nthreshold = 0.5\n', None, r"unknown key 'threshold'"),
    ("", lambda p: p.unlink(), r"checkpoint .* not found"),
    ("", corrupt, r"corrupt or not a PyTorch file"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_checkpoint, capsys, extra, edit, message):
    config = write_run_config(tmp_path, tiny_checkpoint, extra_methods=extra)
    if edit:
        edit(tiny_checkpoint)
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "results").exists()


def test_data_of_the_wrong_shape_is_refused(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    config = write_run_config(tmp_path, tiny_checkpoint, data=f'name = "folder"\npath = "{folder}"')
    assert main(["run", "--config", str(config)]) == 2
    assert "3x16x16 (CxHxW) but the model expects 1x8x8" in capsys.readouterr().err


def test_inception_required_but_absent(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, metrics='inception = "require"\n'
                              f'inception_weights = "{tmp_path / "missing.pth"}"')
    assert main(["run", "--config", str(config)]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main(["run", "--config", str(config), "--inception-weights", str(tmp_path / "nope.pth")]) == 2


def test_results_path_that_cannot_be_created(tmp_path, tiny_checkpoint, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = write_run_config(tmp_path, tiny_checkpoint)
    assert main(["run", "--config", str(config), "--results-dir", str(blocker / "results")]) == 2
    assert "cannot create results folder" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, tiny_checkpoint):
    from adadiff_bench.errors import UserError
    config = write_run_config(tmp_path, tiny_checkpoint, extra_methods='[[methods]]\nname = "nope"\n')
    with pytest.raises(UserError):
        main(["--debug", "run", "--config", str(config)])


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--overwrite" in out and "swept" in out


def test_registry_refuses_bad_and_duplicate_names():
    assert "full" in available_methods()

    class Bad(Method):
        name = "Not Valid"

    with pytest.raises(ValueError, match="lowercase"):
        register_method(Bad)

    class Clash(Method):
        name = "full"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)
    assert get_method("full").__name__ == "Full"


def test_full_method_equals_the_plain_forward(tiny_model):
    from adadiff_bench.steplog import StepLog
    cls = get_method("full")
    method = cls(tiny_model)
    log = StepLog(4, np.zeros(1), tiny_model.num_blocks)
    log.set_batch(np.arange(4))
    method.start_batch(log)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    with torch.no_grad():
        assert torch.equal(method(x, t, None, context(0, batch=4)), tiny_model(x, t))


def test_methods_prepare_once_per_setting_before_sampling_under_the_results_folder(tmp_path, tiny_checkpoint,
                                                                                    monkeypatch):
    """`Method.prepare` runs in the harness before any sampling, once per distinct setting, with the training cache
    `<results_dir>/.adadiff_cache` (from the config, not the working directory); cells sample with its knobs."""
    from dataclasses import dataclass, replace

    from adadiff_bench.methods.registry import _REGISTRY
    events = []

    @dataclass
    class PreparedParams:
        scale: float = 1.0
        made: str = ""  # set by prepare: the file it "trained"

    class Prepares(Method):
        name = "test-prepares"
        Params = PreparedParams

        @classmethod
        def prepare(cls, params, context):
            events.append(("prepare", params.scale, context.training_cache))
            made = context.training_cache / f"scale-{params.scale}.txt"
            made.parent.mkdir(parents=True, exist_ok=True)
            made.write_text("trained")
            return replace(params, made=str(made))

        def __call__(self, x, t, y, ctx):
            assert self.params.made and open(self.params.made).read() == "trained"  # prepared knobs
            events.append(("sample", self.params.scale))
            eps = self.model(x, t, y)
            self.log.ran_full()
            return eps * self.params.scale

    register_method(Prepares)
    try:
        config = write_run_config(tmp_path, tiny_checkpoint,  # timed too: the timed pass gets the prepared knobs
                                  extra_methods=f'[[methods]]\nname = "{Prepares.name}"\nscale = [1.0, 0.5]\n'
                                                f'num_steps = [2, 3]\n')
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert main(["run", "--config", str(config), "--no-progress"]) == 0
    finally:
        _REGISTRY.pop(Prepares.name, None)
    cache = tmp_path / "results" / ".adadiff_cache"
    prepares = [e for e in events if e[0] == "prepare"]
    assert prepares == [("prepare", 1.0, cache), ("prepare", 0.5, cache)]  # 2 settings x 2 step counts: 2 calls
    assert events.index(prepares[-1]) < events.index(next(e for e in events if e[0] == "sample"))
    assert sorted(p.name for p in cache.iterdir()) == ["scale-0.5.txt", "scale-1.0.txt"]
    assert list(elsewhere.iterdir()) == []
    frame = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    assert len(frame[frame["method"] == Prepares.name]) == 4


def test_cell_ids_are_plain_unique_folder_names():
    from adadiff_bench.harness import Cell
    a = Cell("adadiff", (("checkpoint", "a/model.pt"), ("threshold", 0.5)), "ddim", 10, 0)
    b = Cell("adadiff", (("checkpoint", "b/model.pt"), ("threshold", 0.5)), "ddim", 10, 0)
    assert "/" not in a.cell_id and a.cell_id != b.cell_id
    assert a.cell_id.startswith("adadiff-checkpoint=model-threshold=0.5-ddim-10steps-seed0")
    assert Cell("full", (), "dpm-solver++", 25, 1).cell_id == "full-dpm-solver++-25steps-seed1"


def test_matched_fid_is_interpolated_along_each_curve_and_blank_outside_it():
    from adadiff_bench.report.tables import interpolate_at, matched_table
    assert interpolate_at([0.8, 0.4], [10.0, 20.0], [0.6, 0.4, 0.3, 0.9])[:2] == [15.0, 20.0]
    assert all(np.isnan(v) for v in interpolate_at([0.8, 0.4], [10.0, 20.0], [0.3, 0.9]))
    rows = [("full", "{}", 25, 1.0, 2.0, 5.0), ("static-exit", '{"k": 4}', 25, 0.4, 0.8, 20.0),
            ("static-exit", '{"k": 8}', 25, 0.8, 1.6, 10.0)]
    frame = pd.DataFrame([{"method": m, "params": p, "solver": "ddim", "num_steps": n, "layer_ratio": lr,
                           "gflops_per_image": g, "fid_digits_cnn": f, "valid": True, "entry": int(m != "full"),
                           "swept": json.dumps(["k"] if m != "full" else []), "ceiling": False}
                          for m, p, n, lr, g, f in rows])
    info = {"reference": {"solver": "ddim", "num_steps": 25}}
    table = matched_table(frame, info).set_index("curve")
    exits = table.loc[[c for c in table.index if c.startswith("static-exit")][0]]
    assert exits["fid_digits_cnn at layer ratio 0.6"] == pytest.approx(15.0)
    assert exits["fid_digits_cnn at cost 0.6"] == pytest.approx(15.0)  # cost = 1.2 / 2.0 GFLOPs
    assert exits["fid_digits_cnn at layer ratio 0.5"] == pytest.approx(17.5)
    assert exits["fid_digits_cnn at layer ratio 0.7"] == pytest.approx(12.5)
    full = table.loc[[c for c in table.index if c.startswith("full")][0]]
    assert np.isnan(full["fid_digits_cnn at layer ratio 0.5"])  # a single point at 1.0 reaches no target


def test_an_entry_sweeping_a_knob_of_names_draws_one_curve_per_name():
    """The ablation's entries sweep an estimator (names) and a compute target (numbers): interpolating across
    estimators would mix two methods, so each estimator is a curve along its own targets."""
    from adadiff_bench.report.tables import curves, matched_table
    points = [("official", 0.4, 20.0), ("official", 0.8, 10.0), ("probe", 0.4, 40.0), ("probe", 0.8, 30.0)]
    frame = pd.DataFrame([{"method": "adadiff", "params": json.dumps({"estimator": e, "target_layer_ratio": lr}),
                           "solver": "ddim", "num_steps": 25, "layer_ratio": lr, "gflops_per_image": 2 * lr,
                           "fid_digits_cnn": f, "valid": True, "entry": 1, "ceiling": False,
                           "swept": json.dumps(["estimator", "target_layer_ratio"])} for e, lr, f in points])
    drawn = list(curves(frame))
    assert [legend for legend, _, _ in drawn] == ["adadiff / ddim (estimator=official)", "adadiff / ddim (estimator=probe)"]
    assert [list(labels) for _, labels, _ in drawn] == [["0.4", "0.8"]] * 2  # points labelled by the numeric knob
    table = matched_table(frame, {"reference": {"solver": "ddim", "num_steps": 25}}, targets=(0.6,))
    assert table["fid_digits_cnn at layer ratio 0.6"].tolist() == pytest.approx([15.0, 35.0])


def test_matched_fid_matches_each_seed_on_its_own_sweep_before_averaging():
    from adadiff_bench.report.tables import matched_markdown, matched_table
    # seed 0's curve runs (0.4, 20) -> (0.8, 10), seed 1's (0.5, 24) -> (0.9, 8): at 0.6 they read 15 and 20
    rows = [(0, 0.4, 20.0, 4), (0, 0.8, 10.0, 8), (1, 0.5, 24.0, 4), (1, 0.9, 8.0, 8)]
    frame = pd.DataFrame([{"method": "static-exit", "params": json.dumps({"k": k}), "solver": "ddim", "num_steps": 25,
                           "seed": seed, "layer_ratio": lr, "gflops_per_image": 2 * lr, "fid_digits_cnn": f,
                           "valid": True, "entry": 1, "swept": json.dumps(["k"]), "ceiling": False}
                          for seed, lr, f, k in rows])
    info = {"reference": {"solver": "ddim", "num_steps": 25}}
    matched = matched_table(frame, info, targets=(0.6, 0.85))
    row = matched.iloc[0]
    assert row["fid_digits_cnn at layer ratio 0.6"] == pytest.approx(17.5)  # pooling both seeds' points would read 19.33
    assert row["fid_digits_cnn at layer ratio 0.6 std"] == pytest.approx(np.std([15.0, 20.0], ddof=1))
    assert row["fid_digits_cnn at layer ratio 0.6 low"] == pytest.approx(15.0)  # 2 seeds: the interval is [min, max]
    assert row["fid_digits_cnn at layer ratio 0.6 high"] == pytest.approx(20.0)
    assert np.isnan(row["fid_digits_cnn at layer ratio 0.85"])  # seed 0's sweep stops at 0.8
    shown = matched_markdown(matched).iloc[0]
    assert shown["fid_digits_cnn at layer ratio 0.6"] == "17.50 ± 3.54 [15.00, 20.00]"
    assert shown["fid_digits_cnn at layer ratio 0.85"] == ""
