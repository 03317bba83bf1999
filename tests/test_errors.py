"""The bad-input catalogue (docs/errors.md): one test per entry, through the real CLI where the error stops a run.

A stopping error is one line on stderr naming the problem and the fix, exit code 2, no traceback unless
`--debug`, and nothing written. NaN/Inf samples stop nothing: the cell is recorded as invalid. A KID
subset larger than n is clamped with a warning.
"""
from __future__ import annotations

import errno
import math
import os
import tomllib

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench import results
from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.cli import main
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import load_dataset
from adadiff_bench.errors import UserError
from adadiff_bench.methods import Method, register_method
from adadiff_bench.methods.registry import _REGISTRY
from adadiff_bench.metrics.quality import compute_quality
from conftest import REPO, TINY, write_run_config

SAMPLING = 'solver = "ddim"\nnum_steps = 2\nnum_samples = 8\nbatch_size = 8'
METRICS = 'inception = "off"\nkid_subset_size = 8\nisc_splits = 2'


def run_args(tmp_path, checkpoint, **sections) -> list[str]:
    """`adadiff-bench run` on a tiny config (8 samples, 2-3 steps, no timing) writing under tmp_path/results."""
    sections = {"sampling": SAMPLING, "metrics": METRICS, "timing": "enabled = false", **sections}
    return ["run", "--config", str(write_run_config(tmp_path, checkpoint, **sections)), "--no-progress"]


def small_digits(folder) -> str:
    """The first 64 digits as an .npz data set: a reference whose features are quick to extract."""
    images = load_dataset(DataConfig()).images[:64].permute(0, 2, 3, 1).numpy()
    np.savez(folder / "digits64.npz", images)
    return f'name = "npz"\npath = "{folder / "digits64.npz"}"'


def one_line_error(args: list[str], capsys) -> str:
    """Run the CLI; assert exit code 2 and exactly one non-empty stderr line without a traceback; return it."""
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("adadiff-bench: error: ")
    return lines[0]


def assert_nothing_written(tmp_path) -> None:
    assert not (tmp_path / "results").exists()


# ---- names: methods, solvers, estimators, config keys ---------------------------------------------

def test_unknown_method_suggests_close_match(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods='[[methods]]\nname = "adadif"\n'), capsys)
    assert "unknown method 'adadif'" in line and "did you mean 'adadiff'" in line and "valid: " in line
    assert_nothing_written(tmp_path)


def test_unknown_solver_suggests_close_match(tmp_path, tiny_checkpoint, capsys):
    extra = '[[methods]]\nname = "full"\nsolver = "eular"\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert "methods[1]" in line and "unknown solver 'eular'" in line and "did you mean 'euler'" in line
    assert "valid: ddpm, ddpm-learned, ddim, dpm-solver++, euler" in line
    assert_nothing_written(tmp_path)


def test_unknown_estimator_suggests_close_match(tmp_path, tiny_checkpoint, capsys):
    config = tmp_path / "train.toml"
    config.write_text(f'[adadiff]\nbase_checkpoint = "{tiny_checkpoint}"\nestimator = "oficial"\n\n'
                      f'[train]\nsteps = 1\nthreads = 1\nout_dir = "{tmp_path / "train"}"\n')
    line = one_line_error(["train", "--config", str(config), "--no-progress"], capsys)
    assert "[adadiff]" in line and "unknown estimator 'oficial'" in line and "did you mean 'official'" in line
    assert not (tmp_path / "train").exists()


def test_unknown_top_level_key_suggests_close_match(tmp_path, tiny_checkpoint, capsys):
    args = run_args(tmp_path, tiny_checkpoint)
    config = tmp_path / "run.toml"
    config.write_text("seed = 1\n" + config.read_text())
    line = one_line_error(args, capsys)
    assert "unknown key 'seed'" in line and "did you mean 'seeds'" in line and "valid keys: " in line
    assert_nothing_written(tmp_path)


def test_unknown_key_in_a_table_suggests_close_match(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, sampling=SAMPLING + "\nnum_step = 3"), capsys)
    assert "[sampling]: unknown key 'num_step'" in line and "did you mean 'num_steps'" in line
    assert_nothing_written(tmp_path)


def test_unknown_method_knob_suggests_close_match(tmp_path, tiny_checkpoint, capsys):
    extra = '[[methods]]\nname = "adadiff"\nthreshhold = 0.1\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert "(adadiff): unknown key 'threshhold'" in line and "did you mean 'threshold'" in line
    assert_nothing_written(tmp_path)


# ---- knob values ----------------------------------------------------------------------------------

def test_knob_of_the_wrong_type(tmp_path, tiny_checkpoint, capsys):
    extra = '[[methods]]\nname = "adadiff"\nthreshold = "high"\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert "threshold: expected a number, got 'high' (str)" in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_outside_unit_interval(tmp_path, tiny_checkpoint, capsys, threshold):
    extra = f'[[methods]]\nname = "adadiff"\nthreshold = [0.1, {threshold}]\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert f"threshold must be in [0, 1] (got {threshold})" in line
    assert_nothing_written(tmp_path)


def test_threshold_and_target_layer_ratio_together(tmp_path, tiny_checkpoint, capsys):
    extra = '[[methods]]\nname = "adadiff"\nthreshold = 0.2\ntarget_layer_ratio = [0.8, 0.6]\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert "threshold and target_layer_ratio exclude each other; set only one of them" in line
    assert_nothing_written(tmp_path)


def test_calibration_seed_among_the_run_seeds(tmp_path, capsys):
    from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff, save_adadiff
    net = build_adadiff(TINY, AdaDiffConfig()).eval()
    save_adadiff(tmp_path / "adadiff.pt", net, TINY)
    save_checkpoint(tmp_path / "tiny.pt", net.backbone, TINY)
    extra = (f'[[methods]]\nname = "adadiff"\ncheckpoint = "{tmp_path / "adadiff.pt"}"\n'
             'target_layer_ratio = 0.7\ncalibration_seed = 0\n')
    line = one_line_error(run_args(tmp_path, tmp_path / "tiny.pt", extra_methods=extra), capsys)
    assert "calibration_seed 0 is also an evaluation seed; pick a calibration_seed outside the run's `seeds`" in line
    assert_nothing_written(tmp_path)


def test_negative_num_steps(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, sampling=SAMPLING.replace("= 2", "= -2")), capsys)
    assert "[sampling]: num_steps must be > 0 (got -2)" in line
    assert_nothing_written(tmp_path)


# ---- checkpoints ----------------------------------------------------------------------------------

def test_missing_checkpoint(tmp_path, tiny_checkpoint, capsys):
    args = run_args(tmp_path, tiny_checkpoint)
    tiny_checkpoint.unlink()
    line = one_line_error(args, capsys)
    assert f"checkpoint '{tiny_checkpoint}' not found" in line and "adadiff-bench train" in line
    assert_nothing_written(tmp_path)


def test_truncated_checkpoint(tmp_path, tiny_checkpoint, capsys):
    data = tiny_checkpoint.read_bytes()
    tiny_checkpoint.write_bytes(data[: len(data) // 2])
    line = one_line_error(run_args(tmp_path, tiny_checkpoint), capsys)
    assert "is corrupt or not a PyTorch file" in line and "re-download or retrain it" in line
    assert_nothing_written(tmp_path)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path, tiny_checkpoint, capsys):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    state = payload["state_dict"]
    state["norm.scale"] = state.pop("norm.weight")  # renamed
    del state["norm.bias"]                            # missing
    torch.save(payload, tiny_checkpoint)
    line = one_line_error(run_args(tmp_path, tiny_checkpoint), capsys)
    assert "missing: norm.weight, norm.bias" in line and "unexpected: norm.scale" in line
    assert "check that the model config matches the checkpoint" in line
    assert_nothing_written(tmp_path)


# ---- data -----------------------------------------------------------------------------------------

def npz_args(tmp_path, checkpoint, array: np.ndarray) -> list[str]:
    np.savez(tmp_path / "data.npz", array)
    return run_args(tmp_path, checkpoint, data=f'name = "npz"\npath = "{tmp_path / "data.npz"}"')


def test_npz_of_float_images(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(npz_args(tmp_path, tiny_checkpoint, np.zeros((8, 8, 8, 1), np.float32)), capsys)
    assert "arr_0 has dtype float32, expected uint8" in line and ".astype(np.uint8)" in line
    assert_nothing_written(tmp_path)


def test_npz_with_two_channels(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(npz_args(tmp_path, tiny_checkpoint, np.zeros((8, 8, 8, 2), np.uint8)), capsys)
    assert "arr_0 has shape (8, 8, 8, 2), expected N x H x W x C with C = 1 or 3" in line
    assert_nothing_written(tmp_path)


def test_npz_of_the_wrong_rank(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(npz_args(tmp_path, tiny_checkpoint, np.zeros((8, 64), np.uint8)), capsys)
    assert "arr_0 has shape (8, 64), expected N x H x W x C" in line
    assert_nothing_written(tmp_path)


def test_npz_of_a_single_image(tmp_path, tiny_checkpoint, capsys):
    # a 3-D array is read as N x H x W grayscale: one 8x8 RGB image becomes 8 images of 8x3 pixels
    line = one_line_error(npz_args(tmp_path, tiny_checkpoint, np.zeros((8, 8, 3), np.uint8)), capsys)
    assert "has images of 1x8x3 (CxHxW) but the model expects 1x8x8" in line and "resize the data" in line
    assert_nothing_written(tmp_path)


def test_rgb_data_for_a_one_channel_model(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(npz_args(tmp_path, tiny_checkpoint, np.zeros((8, 8, 8, 3), np.uint8)), capsys)
    assert "has images of 3x8x8 (CxHxW) but the model expects 1x8x8" in line
    assert "use a matching checkpoint" in line
    assert_nothing_written(tmp_path)


def test_empty_image_folder(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    args = run_args(tmp_path, tiny_checkpoint, data=f'name = "folder"\npath = "{tmp_path / "images"}"')
    line = one_line_error(args, capsys)
    assert "holds no .png/.jpg/.jpeg files" in line and "point [data] path at your images" in line
    assert_nothing_written(tmp_path)


# ---- Inception weights ----------------------------------------------------------------------------

def test_inception_weights_flag_pointing_at_a_missing_file(tmp_path, tiny_checkpoint, capsys):
    args = run_args(tmp_path, tiny_checkpoint) + ["--inception-weights", str(tmp_path / "nope.pth")]
    line = one_line_error(args, capsys)
    assert "--inception-weights" in line and "nope.pth' does not exist" in line
    assert "weights-inception-2015-12-05-6726825d.pth" in line
    assert_nothing_written(tmp_path)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty folder, with no torch.hub.set_dir override in force."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


def test_inception_required_but_no_weights_on_disk(tmp_path, tiny_checkpoint, capsys, empty_torch_home):
    args = run_args(tmp_path, tiny_checkpoint, data=small_digits(tmp_path),
                    metrics='inception = "require"\nkid_subset_size = 8\nisc_splits = 2')
    line = one_line_error(args, capsys)
    assert 'inception = "require"' in line and "--inception-weights PATH" in line
    assert_nothing_written(tmp_path)


# ---- results path ---------------------------------------------------------------------------------

def test_results_path_under_a_regular_file(tmp_path, tiny_checkpoint, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    args = run_args(tmp_path, tiny_checkpoint) + ["--results-dir", str(blocker / "results")]
    line = one_line_error(args, capsys)
    assert f"cannot create results folder '{blocker / 'results'}" in line and "(Not a directory)" in line
    assert "choose another results_dir" in line
    assert blocker.read_text() == "a file, not a folder"


def test_debug_lets_the_exception_propagate(tmp_path, tiny_checkpoint, capsys):
    args = run_args(tmp_path, tiny_checkpoint, extra_methods='[[methods]]\nname = "adadif"\n')
    with pytest.raises(UserError, match="did you mean 'adadiff'"):
        main(["--debug", *args])
    assert capsys.readouterr().err == ""


# ---- NaN/Inf samples: recorded, the run goes on ----------------------------------------------------

class NanEps(Method):
    """Test-only: runs the full network, then returns NaN as the noise prediction."""
    name = "nan-eps-test"

    def __call__(self, x, t, y, ctx):
        eps = self.model(x, t, y)
        self.log.ran_full()
        return torch.full_like(eps, float("nan"))


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A finished run with `full` at 2 and 3 steps and one cell whose samples are NaN (and its stderr)."""
    tmp_path = tmp_path_factory.mktemp("nan_run")
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, build_model(TINY).eval(), TINY)
    register_method(NanEps)
    try:
        args = run_args(tmp_path, checkpoint, data=small_digits(tmp_path),
                        extra_methods=f'[[methods]]\nname = "{NanEps.name}"\nnum_steps = 2\n')
        code = main(args)
        yield tmp_path / "results" / "tiny", code
    finally:
        _REGISTRY.pop(NanEps.name, None)


def test_nan_samples_mark_the_cell_invalid_and_the_run_goes_on(nan_run):
    run_dir, code = nan_run
    assert code == 0
    frame = pd.read_csv(run_dir / "results.csv")
    assert len(frame) == 3
    bad = frame[frame["method"] == NanEps.name].iloc[0]
    assert not bad["valid"] and bad["invalid_reason"] == "NaN or Inf in generated samples"
    assert pd.isna(bad["fid_digits_cnn"])
    good = frame[frame["method"] == "full"]
    assert good["valid"].all() and good["fid_digits_cnn"].notna().all()


def test_report_still_renders_with_an_invalid_cell(nan_run, tmp_path):
    run_dir, _ = nan_run
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    board = (tmp_path / "report" / "leaderboard.md").read_text()
    assert f"{NanEps.name} (ddim 2 steps)" in board and board.count("| full (") == 2


def test_report_shows_why_a_cell_is_invalid(nan_run, tmp_path):
    run_dir, _ = nan_run
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    board = (tmp_path / "report" / "leaderboard.md").read_text()
    assert any(NanEps.name in line and "NaN or Inf in generated samples" in line for line in board.splitlines())


# ---- writes that fail half way --------------------------------------------------------------------

class HalfWriter:
    """A file object that writes half of what it is given, then fails as a full disk would."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)


class OsWithFullDisk:
    """`os` for adadiff_bench.results: `fdopen` on a temporary file of `target` (a file name) gives a HalfWriter."""

    def __init__(self, target: str):
        self.target = target

    def fdopen(self, fd, *args, **kwargs):
        handle = os.fdopen(fd, *args, **kwargs)
        opened = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        return HalfWriter(handle) if opened.startswith(f".{self.target}.") else handle

    def __getattr__(self, name):
        return getattr(os, name)


def test_a_write_that_fails_half_way_leaves_nothing_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "os", OsWithFullDisk("row.json"))
    folder = tmp_path / "cell"
    with pytest.raises((OSError, UserError), match="No space left"):  # (UserError once results.py converts it)
        results.write_json(folder / "row.json", {"method": "full"})
    assert list(folder.iterdir()) == []  # neither the target nor the temporary file
    monkeypatch.setattr(results, "os", os)
    results.atomic_write_bytes(folder / "row.json", b"old")
    monkeypatch.setattr(results, "os", OsWithFullDisk("row.json"))
    with pytest.raises((OSError, UserError)):  # an existing file keeps its old content
        results.write_json(folder / "row.json", {"method": "new"})
    assert [p.name for p in folder.iterdir()] == ["row.json"] and (folder / "row.json").read_bytes() == b"old"


def test_a_run_whose_write_fails_half_way_stops_with_one_line_and_resumes(tmp_path, tiny_checkpoint, capsys,
                                                                          monkeypatch):
    args = run_args(tmp_path, tiny_checkpoint, data=small_digits(tmp_path))
    monkeypatch.setattr(results, "os", OsWithFullDisk("results.csv"))
    try:
        line = one_line_error(args, capsys)
    finally:
        partial = tmp_path / "results" / ".tiny.partial"
        assert not (tmp_path / "results" / "tiny").exists()
        assert not (partial / "results.csv").exists() and not list(partial.rglob("*.tmp"))
    assert "results.csv" in line and "No space left on device" in line and "rerun" in line
    monkeypatch.setattr(results, "os", os)
    assert main(args) == 0  # resumes: the cells written before the failure are kept
    assert "already done, kept" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")) == 2


# ---- KID subset larger than n: clamped with a warning ---------------------------------------------

def test_kid_subset_larger_than_n_is_clamped_with_a_warning(tmp_path):
    digits = load_dataset(DataConfig(**tomllib.loads(small_digits(tmp_path))))
    config = MetricsConfig(inception="off", kid_subset_size=100, isc_splits=2)
    with pytest.warns(UserWarning, match="kid_subset_size 100 exceeds the 8 images available; using 8"):
        quality = compute_quality(digits.images[:8], digits, config, tmp_path)
    assert math.isfinite(quality["kid_digits_cnn_mean"]) and quality["kid_digits_cnn_mean"] > -1


def test_adadiff_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_checkpoint, capsys):
    """The shipped 13-block AdaDiff checkpoint on a 5-block run model: one line before sampling."""
    config = write_run_config(tmp_path, tiny_checkpoint, timing="enabled = false", extra_methods=(
        f'[[methods]]\nname = "adadiff"\ncheckpoint = "{REPO / "checkpoints/adadiff_digits_finetuned.pt"}"\n'))
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "differs from the run's model" in error
    assert not (tmp_path / "results").exists()


# ---- devices ----------------------------------------------------------------------------------------

def top_level(args: list[str], line: str) -> list[str]:
    """`args` of `run_args` with `line` added at the top level of their config."""
    config = args[args.index("--config") + 1]
    text = open(config).read()
    open(config, "w").write(line + "\n" + text)
    return args


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_a_gpu_asked_for_and_absent(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(top_level(run_args(tmp_path, tiny_checkpoint), 'device = "cuda"'), capsys)
    assert "device 'cuda' asks for a GPU but CUDA is not available here" in line and 'set device = "cpu"' in line
    assert_nothing_written(tmp_path)


def test_a_malformed_device(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(top_level(run_args(tmp_path, tiny_checkpoint), 'device = "gpu"'), capsys)
    assert "device must be auto, cpu, cuda or cuda:N (got 'gpu')" in line
    assert_nothing_written(tmp_path)


def test_an_unknown_precision(tmp_path, tiny_checkpoint, capsys):
    line = one_line_error(top_level(run_args(tmp_path, tiny_checkpoint), 'precision = "fp8"'), capsys)
    assert "precision must be one of fp32, bf16, fp16 (got 'fp8')" in line
    assert_nothing_written(tmp_path)


# ---- numbers: NaN, infinity, ranges and bounds (checked before anything is written) -------------------

@pytest.mark.parametrize("knob, value, expected", [
    ("oracle", "tau = nan", "tau: expected a finite number, got nan; write a number (NaN and inf are not values)"),
    ("oracle", "tau = inf", "tau: expected a finite number, got inf"),
    ("adadiff", "threshold = [0.1, nan]", "threshold must be in [0, 1] (got nan)"),  # the knob's own range first
    ("pabee", "delta = -inf", "delta is an RMS distance and must be >= 0 (got -inf)"),
])
def test_a_knob_that_is_nan_or_infinite(tmp_path, tiny_checkpoint, capsys, knob, value, expected):
    extra = f'[[methods]]\nname = "{knob}"\n{value}\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert f"methods[1] ({knob}): {expected}" in line, line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("section, setting, expected", [
    ("metrics", "fid_ci = nan", "[metrics]: fid_ci must be in (0, 1), e.g. 0.95 (got nan)"),
    ("timing", "threads = 100000", "[timing]: threads must be in [1, 1024] (got 100000)"),
    ("timing", "warmup_batches = -5", "[timing]: warmup_batches must be >= 0 (got -5)"),
    ("top", "seeds = [0, -1]", "seeds: a seed must be in [0, 2^63 - 1] (got -1)"),
    ("top", f'name = "{"r" * 300}"', "run name must be at most 200 bytes without NUL characters (got 300 bytes)"),
])
def test_a_setting_out_of_range(tmp_path, tiny_checkpoint, capsys, section, setting, expected):
    tables = {"sampling": SAMPLING, "metrics": METRICS, "timing": "enabled = false"}
    if section in tables:
        tables[section] += "\n" + setting
    args = run_args(tmp_path, tiny_checkpoint, **tables)
    if section == "top":  # a later key of the same name would clash: replace the line
        config = args[args.index("--config") + 1]
        key = setting.split(" ")[0]
        text = "\n".join(setting if line.startswith(key + " =") else line for line in open(config).read().splitlines())
        open(config, "w").write(text)
    line = one_line_error(args, capsys)
    assert expected in line, line
    assert_nothing_written(tmp_path)


def test_more_steps_than_the_schedule_has(tmp_path, tiny_checkpoint, capsys):
    extra = '[[methods]]\nname = "full"\nnum_steps = [2, 1001]\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert "methods[1]: num_steps must be at most 1000, the linear schedule's timesteps (got 1001)" in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("value", ["threshold = []", "num_steps = []", "solver = []"])
def test_an_empty_list_for_a_swept_knob(tmp_path, tiny_checkpoint, capsys, value):
    extra = f'[[methods]]\nname = "adadiff"\n{value}\n'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, extra_methods=extra), capsys)
    assert f"methods[1]: {value.split(' ')[0]} is an empty list; give at least one value" in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("sampling, metrics, data, expected", [
    ("num_samples = 1", METRICS, None, "[sampling] num_samples = 1, but quality metrics need at least 2 samples"),
    ("num_samples = 8", METRICS, "one image", "holds 1 image(s), but quality metrics need at least 2"),
    ("num_samples = 8", METRICS + "\nprc_neighborhood = 8", None,
     "[metrics] prc_neighborhood = 8 needs more than that many samples and reference images (got 8 and"),
    ("num_samples = 1000000000", METRICS, None, "1000000000 samples at 3 steps need about"),
])
def test_what_the_metrics_or_memory_cannot_take_is_refused_before_sampling(tmp_path, tiny_checkpoint, capsys,
                                                                          sampling, metrics, data, expected):
    tables = {"sampling": SAMPLING.replace("num_samples = 8", sampling), "metrics": metrics}
    if data == "one image":
        np.savez(tmp_path / "one.npz", np.zeros((1, 8, 8, 1), np.uint8))
        tables["data"] = f'name = "npz"\npath = "{tmp_path / "one.npz"}"'
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, **tables), capsys)
    assert expected in line, line
    assert_nothing_written(tmp_path)


def train_args(tmp_path, train: str, model: str = "embed_dim = 32\ndepth = 2\nnum_heads = 2") -> list[str]:
    """`adadiff-bench train` of a tiny U-ViT on the digits, with `train` added to its [train] table."""
    config = tmp_path / "train.toml"
    config.write_text(f'[model]\n{model}\n\n[train]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 0\nthreads = 1\n'
                      f'out_dir = "{tmp_path / "train"}"\n{train}\n')
    return ["train", "--config", str(config), "--no-progress"]


@pytest.mark.parametrize("setting, expected", [
    ("lr = inf", "[train]: lr: expected a finite number, got inf"),
    ("lr = nan", "[train]: lr must be > 0 (got nan)"),
    ("beta1 = 1.5", "[train]: beta1 must be in [0, 1) (got 1.5)"),
    ("weight_decay = -0.1", "[train]: weight_decay must be >= 0 (got -0.1)"),
    ("seed = -3", "[train]: seed: a seed must be in [0, 2^63 - 1] (got -3)"),
])
def test_a_training_setting_out_of_range(tmp_path, capsys, setting, expected):
    line = one_line_error(train_args(tmp_path, setting), capsys)
    assert expected in line, line
    assert not (tmp_path / "train").exists()


def test_training_whose_loss_is_not_finite_stops_with_one_line(tmp_path, capsys):
    line = one_line_error(train_args(tmp_path, "lr = 1e30"), capsys)  # finite, but the weights overflow at once
    assert "training loss is nan at step 2; lower [train] lr (now 1e+30)" in line
    assert not list((tmp_path / "train").iterdir())  # no state, no exported weights


def test_resuming_on_a_retrained_base_is_refused(tmp_path, tiny_checkpoint, capsys):
    from test_training_trust import method_config, retrain_base, snapshot
    assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=2)) == 0
    retrain_base(tiny_checkpoint)
    before = snapshot(tmp_path / "run")
    line = one_line_error(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=4), capsys)
    assert "last.pt was trained on a base with hash " in line and "; pass --restart to start over" in line
    assert snapshot(tmp_path / "run") == before


def test_init_keeps_existing_files(tmp_path, capsys):
    small_digits(tmp_path)
    (tmp_path / "mine_train.toml").write_text("# mine\n")
    args = ["init", "--data", str(tmp_path / "digits64.npz"), "--out", str(tmp_path / "mine.toml")]
    line = one_line_error(args, capsys)
    assert f"{tmp_path / 'mine_train.toml'} already exist(s); pass --force to overwrite or choose another --out" in line
    assert (tmp_path / "mine_train.toml").read_text() == "# mine\n" and not (tmp_path / "mine.toml").exists()


def test_init_of_a_missing_data_path(tmp_path, capsys):
    line = one_line_error(["init", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "x.toml")], capsys)
    assert f"--data {str(tmp_path / 'none.npz')!r} does not exist; pass a folder of PNG/JPEG images" in line
    assert list(tmp_path.iterdir()) == []


def test_init_of_non_square_images(tmp_path, capsys):
    np.savez(tmp_path / "wide.npz", np.zeros((4, 8, 12, 1), np.uint8))
    line = one_line_error(["init", "--data", str(tmp_path / "wide.npz"), "--out", str(tmp_path / "x.toml")], capsys)
    assert "the images are 8x12; the U-ViT needs square images: crop or resize them" in line
    assert not (tmp_path / "x.toml").exists()


# ---- files a library would load: opened safely first (docs/security.md) ------------------------------

class RunsCode:
    """Pickles to a call that creates the file `marker` when unpickled."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_inception_weights_that_hold_code(tmp_path, tiny_checkpoint, capsys):
    torch.save(RunsCode(tmp_path / "ran"), tmp_path / "inception.pth")
    args = run_args(tmp_path, tiny_checkpoint, data=small_digits(tmp_path),
                    metrics='inception = "require"\nkid_subset_size = 8\nisc_splits = 2')
    line = one_line_error(args + ["--inception-weights", str(tmp_path / "inception.pth")], capsys)
    assert "inception.pth' is not a file of plain tensors" in line and "--inception-weights PATH" in line
    assert not (tmp_path / "ran").exists()
    assert_nothing_written(tmp_path)


def test_a_clean_fid_model_in_the_shared_folder_that_is_not_yours(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from adadiff_bench.metrics import cleanfid_backend
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "inception-2015-12-05.pt").write_bytes(b"anyone could have written this")
    os.chmod(shared / "inception-2015-12-05.pt", 0o666)
    monkeypatch.setattr(cleanfid_backend, "cleanfid_default_model_dir", lambda: shared)
    torch.save(build_model(TINY).state_dict(), tmp_path / "inception.pth")  # any plain tensors: never loaded here
    args = run_args(tmp_path, tiny_checkpoint, data=small_digits(tmp_path),
                    metrics='inception = "require"\nfid_backend = "clean-fid"\nkid_subset_size = 8\nisc_splits = 2')
    line = one_line_error(args + ["--inception-weights", str(tmp_path / "inception.pth")], capsys)
    assert "inception-2015-12-05.pt' can be changed by other users" in line
    assert "set [metrics] cleanfid_model = PATH" in line
    assert_nothing_written(tmp_path)


def test_a_damaged_reference_cache_file_is_recomputed_with_a_warning(tmp_path, tiny_checkpoint, capsys):
    args = run_args(tmp_path, tiny_checkpoint, data=small_digits(tmp_path))
    assert main(args) == 0
    first = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    (statistics,) = (tmp_path / "results" / ".cache").glob("*stat-fid*.npz")
    statistics.write_bytes(statistics.read_bytes()[:100])
    with pytest.warns(UserWarning) as warned:  # (the CLI prints each as `adadiff-bench: warning: <message>`)
        assert main(args + ["--overwrite"]) == 0
    assert len(warned) == 1 and f"reference cache file '{statistics}' is damaged" in str(warned[0].message)
    assert "recomputing it" in str(warned[0].message)
    again = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    assert (again["fid_digits_cnn"] == first["fid_digits_cnn"]).all()


# --- hostile files ---
# Broken data sets, checkpoint bodies, damaged resume state, report inputs, stray files and the file system
# (docs/errors.md, "Hostile files") are tested in tests/test_hostile_files.py, kills at every write in test_kill.py.
