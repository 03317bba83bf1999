"""Hostile files (docs/errors.md, "Hostile files"): broken data sets, checkpoints with a good format tag and a
bad body, damaged resume state, bad report inputs, stray temporary files, file-system failures.

Each case must give one line naming the file and the fix (exit code 2 through the CLI), never a traceback,
never a result computed from garbage, and no file left half written.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adadiff_bench import results
from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.cli import main
from adadiff_bench.config import DataConfig
from adadiff_bench.data import load_dataset
from adadiff_bench.errors import UserError
from conftest import TINY
from test_errors import one_line_error, run_args, small_digits


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written by hand (grayscale H x W x 1 or RGB H x W x 3): the file format, independent of Pillow."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 3: 2}[channels]
    rows = b"".join(b"\0" + pixels[i].astype(">u2").tobytes() for i in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def folder_data(path: Path) -> DataConfig:
    return DataConfig(name="folder", path=str(path))


def png_folder(tmp_path: Path, count: int = 4) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# ---- data loaders ------------------------------------------------------------------------------------

def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _not_an_image(path: Path) -> None:
    path.write_text("this is a text file\n")


def _truncated(path: Path) -> None:
    Image.fromarray(np.arange(4096, dtype=np.uint32).reshape(64, 64).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _a_folder(path: Path) -> None:
    path.mkdir()


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere.png")


@pytest.mark.parametrize("make", [_zero_bytes, _not_an_image, _truncated, _a_folder, _dangling_link],
                         ids=["zero-byte", "not-an-image", "truncated", "a-folder", "dangling-link"])
def test_a_bad_png_in_an_image_folder_is_named(tmp_path, make):
    folder = png_folder(tmp_path)
    bad = folder / "bad.png"
    make(bad)
    with pytest.raises(UserError) as error:
        load_dataset(folder_data(folder))
    message = str(error.value)
    assert str(bad) in message and "\n" not in message
    assert "remove" in message


def test_a_bad_png_stops_a_run_with_one_line(tmp_path, tiny_checkpoint, capsys):
    folder = png_folder(tmp_path)
    (folder / "bad.png").write_bytes(b"")
    args = run_args(tmp_path, tiny_checkpoint, data=f'name = "folder"\npath = "{folder}"')
    line = one_line_error(args, capsys)
    assert "bad.png" in line and "not a readable image" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_pngs_give_the_eight_bit_images(tmp_path, channels):
    """A 16-bit copy of an 8-bit folder (v -> 257 v, plus noise below half an 8-bit step) loads within 1/255."""
    rng = np.random.default_rng(channels)
    eight = rng.integers(0, 256, (5, 8, 8, channels), dtype=np.uint8)
    noise = rng.integers(-128, 129, eight.shape)
    sixteen = np.clip(eight.astype(np.int64) * 257 + noise, 0, 65535)
    (tmp_path / "8").mkdir(), (tmp_path / "16").mkdir()
    for i in range(len(eight)):
        Image.fromarray(eight[i, ..., 0] if channels == 1 else eight[i]).save(tmp_path / "8" / f"{i}.png")
        png16(tmp_path / "16" / f"{i}.png", sixteen[i])
    loaded8 = load_dataset(folder_data(tmp_path / "8")).images.numpy().astype(int)
    loaded16 = load_dataset(folder_data(tmp_path / "16")).images.numpy().astype(int)
    assert np.array_equal(loaded8, eight.transpose(0, 3, 1, 2))
    assert np.abs(loaded16 - loaded8).max() <= 1
    assert loaded16.max() > 200  # not saturated, not crushed


def test_sixteen_bit_white_is_white(tmp_path):
    (tmp_path / "16").mkdir()
    png16(tmp_path / "16" / "white.png", np.full((8, 8, 1), 65535))
    png16(tmp_path / "16" / "mid.png", np.full((8, 8, 1), 32768))
    images = load_dataset(folder_data(tmp_path / "16")).images.numpy()
    assert images[0].max() == 128 and images[1].min() == 255  # sorted: mid.png, white.png; 32768/65535*255 = 127.5


def _npz_config(path: Path) -> DataConfig:
    return DataConfig(name="npz", path=str(path))


def _images(n: int = 4) -> np.ndarray:
    return np.zeros((n, 8, 8, 1), dtype=np.uint8)


@pytest.mark.parametrize("write, expected", [
    (lambda p: np.save(p.with_suffix(".npy"), _images()) or p.with_suffix(".npy").rename(p), "single .npy array"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "cannot read as .npz"),
    (lambda p: p.write_bytes(b""), "cannot read as .npz"),
    (lambda p: np.savez(p, _images(), labels=np.array(["a", "b", "c", "d"])), "labels have dtype <U1"),
    (lambda p: np.savez(p, _images(), labels=np.array(["a", 1, None, 2.0], dtype=object)), "no objects"),
    (lambda p: np.savez(p, _images(), labels=np.array([0.5, 1, 2, 3])), "labels have dtype float64"),
    (lambda p: np.savez(p, _images(), labels=np.array([0, 1, 2])), "labels have shape (3,) for 4 images"),
    (lambda p: np.savez(p, _images(), labels=np.array([0, -1, 2, 3])), "negative class"),
    (lambda p: np.savez(p, np.zeros((4, 0, 8, 1), dtype=np.uint8)), "holds no images"),
    (lambda p: np.savez(p, np.full((4, 8, 8, 1), np.nan, dtype=np.float32)), "dtype float32, expected uint8"),
    (lambda p: np.savez(p, np.zeros((2, 4, 8, 8, 1), dtype=np.uint8)), "expected N x H x W x C"),
], ids=["npy-renamed", "broken-zip", "zero-byte", "string-labels", "object-labels", "float-labels",
        "too-few-labels", "negative-label", "zero-height", "nan-pixels", "five-dims"])
def test_a_bad_npz_is_one_line_naming_it(tmp_path, write, expected):
    path = tmp_path / "data.npz"
    write(path)
    with pytest.raises(UserError) as error:
        load_dataset(_npz_config(path))
    message = str(error.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_integer_labels_of_any_width_are_kept(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, _images(), labels=np.array([0, 3, 1, 2], dtype=np.uint8))
    assert load_dataset(_npz_config(path)).labels.tolist() == [0, 3, 1, 2]


# ---- checkpoints with the right format tag and a bad body ---------------------------------------------

def _set(table: str, key: str, value):
    def mutate(payload):
        payload[table][key] = value
    return mutate


def _replace(key: str, value):
    def mutate(payload):
        payload[key] = value
    return mutate


def _drop(key: str):
    return lambda payload: payload.pop(key)


def _drop_state_key(payload):
    payload["state_dict"].pop(sorted(payload["state_dict"])[0])


def _extra_state_key(payload):
    payload["state_dict"]["surprise.weight"] = torch.zeros(2)


def _wrong_shape(payload):
    name = sorted(payload["state_dict"])[0]
    payload["state_dict"][name] = torch.zeros(3, 1, 7)


BAD_BODIES = {  # name: (mutation of a valid payload, what the one line says)
    "unknown-model-key": (_set("model", "bogus", 1), "unknown key(s) bogus"),
    "negative-size": (_set("model", "embed_dim", -8), "embed_dim must be > 0"),
    "string-size": (_set("model", "depth", "4"), "`model.depth` is '4' (str), expected int"),
    "bool-size": (_set("model", "embed_dim", True), "expected int"),
    "nan-ratio": (_set("model", "mlp_ratio", float("nan")), "expected a finite number"),
    "huge-depth": (_set("model", "depth", 10 ** 8), "100000000 layers but its state dict holds only"),
    "string-table": (_replace("model", "big"), "`model` is a str, not a table"),
    "none-for-dict": (_replace("state_dict", None), "state dict is a NoneType"),
    "no-state-dict": (_drop("state_dict"), "contents do not fit that format (KeyError"),
    "string-weight": (_set("state_dict", "norm.weight", "x"), "norm.weight are not tensors"),
    "missing-key": (_drop_state_key, "missing: "),
    "extra-key": (_extra_state_key, "unexpected: surprise.weight"),
    "wrong-shape": (_wrong_shape, "shape mismatch: "),
}
BAD_BODIES["tensor-for-dict"] = (_replace("state_dict", torch.zeros(3)), "state dict is a Tensor")

def bad_copy(tmp_path: Path, good: Path, mutate) -> Path:
    payload = torch.load(good, weights_only=True)
    mutate(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_a_uvit_checkpoint_with_a_bad_body_stops_run_and_flops(tmp_path, tiny_checkpoint, capsys, case):
    mutate, expected = BAD_BODIES[case]
    bad = bad_copy(tmp_path, tiny_checkpoint, mutate)
    for args in (run_args(tmp_path, bad), ["flops", str(bad)]):
        line = one_line_error(args, capsys)
        assert str(bad) in line and expected in line, line
    assert not (tmp_path / "results").exists()


@pytest.fixture
def tiny_adadiff(tmp_path) -> Path:
    from adadiff_bench.methods.adadiff.checkpoint import build_adadiff, save_adadiff
    from adadiff_bench.methods.adadiff.network import AdaDiffConfig
    torch.manual_seed(0)
    path = tmp_path / "adadiff.pt"
    save_adadiff(path, build_adadiff(TINY, AdaDiffConfig()), TINY)
    return path


ADADIFF_BODIES = {
    "unknown-adadiff-key": (_set("adadiff", "bogus", 1), "`adadiff` has unknown key(s) bogus"),
    "unknown-estimator": (_set("adadiff", "estimator", "nope"), "unknown estimator 'nope'"),
    "string-model": (_replace("model", "big"), "`model` is a str, not a table"),
    "negative-size": (_set("model", "depth", -2), "depth must be an even number"),
    "tensor-for-dict": (_replace("state_dict", torch.zeros(3)), "state dict is a Tensor"),
    "extra-key": (_extra_state_key, "unexpected: surprise.weight"),
}


@pytest.mark.parametrize("case", sorted(ADADIFF_BODIES))
def test_a_method_checkpoint_with_a_bad_body_is_one_line(tmp_path, tiny_checkpoint, tiny_adadiff, capsys, case):
    """Through a method's `checkpoint` knob (cached_checkpoint) and through `flops`."""
    mutate, expected = ADADIFF_BODIES[case]
    bad = bad_copy(tmp_path, tiny_adadiff, mutate)
    extra = f'[[methods]]\nname = "adadiff"\ncheckpoint = "{bad}"\n'
    for args in (run_args(tmp_path, tiny_checkpoint, extra_methods=extra), ["flops", str(bad)]):
        line = one_line_error(args, capsys)
        assert str(bad) in line and expected in line, line
    assert not (tmp_path / "results").exists()


def test_the_good_checkpoints_still_load(tiny_checkpoint, tiny_adadiff):
    from adadiff_bench.checkpoints import load_checkpoint, load_model
    assert load_model(tiny_checkpoint).num_blocks == load_checkpoint(tiny_adadiff).backbone.num_blocks


# ---- resume and cache integrity -------------------------------------------------------------------------

RESUME_SAMPLING = 'solver = "ddim"\nnum_steps = 2\nnum_samples = 8\nbatch_size = 4'  # two batches per cell


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2-cell run (its config file, its folder): what every resumed run must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pt"
    save_checkpoint(checkpoint, build_model(TINY).eval(), TINY)
    args = run_args(folder, checkpoint, sampling=RESUME_SAMPLING, data=small_digits(folder),
                    timing="enabled = false\nthreads = 1")  # (tiny tensors: fastest on one thread)
    assert main(args) == 0
    return args, folder / "results" / "tiny"


STABLE_COLUMNS = ["cell_id", "valid", "macs_per_image", "layer_ratio", "fid_digits_cnn", "kid_digits_cnn_mean"]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same rows (all but what is measured: memory, time), same samples and step-log summaries, no stray file."""
    frame, expected = pd.read_csv(run / "results.csv"), pd.read_csv(reference / "results.csv")
    columns = [c for c in STABLE_COLUMNS if c in expected.columns]
    assert len(columns) >= 5
    pd.testing.assert_frame_equal(frame[columns], expected[columns])
    for cell_id in expected["cell_id"]:
        for name in ("samples", "exits"):
            got, want = results.read_npz(run / "cells" / cell_id / f"{name}.npz"), \
                results.read_npz(reference / "cells" / cell_id / f"{name}.npz")
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert not list(run.parent.rglob("*.tmp")) and not list(run.parent.glob(".*.old"))
    assert not (run.parent / f".{run.name}.partial").exists()


def interrupted_copy(reference_run, damage) -> Path:
    """The reference run moved back to its partial folder (every cell done, as if killed before the final
    rename), then damaged by `damage(partial, cell_ids)`; returns the partial folder."""
    _, final = reference_run
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(final, partial)
    shutil.rmtree(final)
    damage(partial, list(pd.read_csv(partial / "results.csv")["cell_id"]))
    return partial


@pytest.fixture
def reference_copy(reference_run, tmp_path):
    """Keeps the reference run itself intact: tests damage a copy and resume from it."""
    args, final = reference_run
    saved = tmp_path / "saved"
    shutil.copytree(final, saved)
    yield reference_run, saved
    shutil.rmtree(final.parent, ignore_errors=True)
    final.parent.mkdir()
    shutil.copytree(saved, final)


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the compressed member: its CRC-32 no longer matches
    path.write_bytes(bytes(data))


CELL_DAMAGE = {  # a finished cell's file in .partial, damaged: the cell is computed again, with a warning
    "row-truncated": ("row.json", _truncate),
    "row-a-list": ("row.json", lambda p: p.write_text("[1, 2]")),
    "row-of-another-cell": ("row.json", lambda p: p.write_text('{"cell_id": "someone-else"}')),
    "row-without-valid": ("row.json", lambda p: _edit_json(p, lambda row: row.pop("valid"))),
    "row-text-for-a-number": ("row.json", lambda p: _edit_json(p, lambda row: row.update(num_samples="8"))),
    "exits-garbage": ("exits.npz", lambda p: p.write_bytes(b"garbage")),
    "samples-truncated": ("samples.npz", _truncate),
    "samples-byte-flipped": ("samples.npz", _flip_a_byte),
    "samples-missing": ("samples.npz", lambda p: p.unlink()),
    "samples-a-npy": ("samples.npz", lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)) or
                      p.with_suffix(".npy").rename(p)),
}


@pytest.mark.parametrize("case", sorted(CELL_DAMAGE))
def test_a_damaged_cell_in_partial_is_computed_again(reference_copy, capsys, case):
    (args, final), saved = reference_copy
    name, damage = CELL_DAMAGE[case]
    interrupted_copy((args, final), lambda partial, cells: damage(partial / "cells" / cells[1] / name))
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line and "was timed" not in line]
    assert len(warnings) == 1 and name in warnings[0] and "will be computed again" in warnings[0], captured.err
    assert "already done, kept" in captured.out
    assert_same_run(final, saved)


def _damaged_batch(write):
    def damage(partial: Path, cells: list[str]) -> None:
        shutil.rmtree(partial / "cells" / cells[1])  # the second cell was being sampled when the run was killed
        batch = partial / "progress" / cells[1] / "batch_00000004.npz"
        batch.parent.mkdir(parents=True)
        write(batch)
    return damage


@pytest.mark.parametrize("write", [lambda p: p.write_bytes(b"PK\x03\x04 half a zip"),
                                   lambda p: np.savez(p, images=np.zeros((3, 1, 8, 8), np.float32)),
                                   lambda p: np.savez(p, images=np.zeros((4, 1, 8, 8), np.float32),
                                                      **{"log/blocks_run": np.zeros((3, 2, 5))})],
                         ids=["garbage", "three-images", "three-log-rows"])
def test_a_damaged_progress_batch_is_sampled_again(reference_copy, capsys, write):
    (args, final), saved = reference_copy
    interrupted_copy((args, final), _damaged_batch(write))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "batch_00000004.npz" in err and "sampling that batch again" in err
    assert_same_run(final, saved)


def test_stray_files_of_a_killed_run_are_removed_on_resume(reference_copy, capsys):
    """Temporary files of interrupted writes inside .partial, and the old run a killed --overwrite set aside."""
    (args, final), saved = reference_copy

    def strays(partial: Path, cells: list[str]) -> None:
        (partial / "cells" / cells[0] / ".samples.npz.abc123.tmp").write_bytes(b"half")
        (partial / ".results.csv.xyz.tmp").write_bytes(b"half")
        shutil.copytree(partial, partial.parent / f".{final.name}.old")

    interrupted_copy((args, final), strays)
    assert main(args) == 0
    assert_same_run(final, saved)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b"[]"], ids=["broken", "empty", "binary", "list"])
def test_a_damaged_config_json_in_partial_stops_with_one_line(reference_copy, capsys, content):
    (args, final), _ = reference_copy
    partial = interrupted_copy((args, final), lambda partial, cells: (partial / "config.json").write_bytes(content))
    line = one_line_error(args, capsys)
    assert "config.json" in line and "is damaged" in line and f"delete {partial}" in line
    assert not final.exists()


def test_a_damaged_run_json_of_a_finished_run_stops_with_one_line(reference_copy, capsys):
    (args, final), _ = reference_copy
    (final / "run.json").write_text("{")
    line = one_line_error(args, capsys)
    assert "run.json" in line and "is damaged" in line and "--overwrite" in line


def _state_edit(edit):
    def damage(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return damage


LAST_PT_DAMAGE = {  # a training state last.pt, damaged: one line naming it and "delete it"
    "truncated": (_truncate, "is corrupt or not a PyTorch file"),
    "zero-bytes": (lambda p: p.write_bytes(b""), "is corrupt or not a PyTorch file"),
    "config-a-string": (_state_edit(lambda s: s.update(config="x")), "holds no readable training config"),
    "model-missing-a-key": (_state_edit(lambda s: s["model"].pop(sorted(s["model"])[0])), "does not fit this"),
    "optimizer-a-tensor": (_state_edit(lambda s: s.update(optimizer=torch.zeros(2))), "does not fit this"),
}


@pytest.mark.parametrize("case", sorted(LAST_PT_DAMAGE))
def test_a_damaged_training_state_stops_with_one_line(tmp_path, capsys, case):
    from test_training_device import write_config
    config = write_config(tmp_path, steps=2, checkpoint_every=2)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    last = tmp_path / "run" / "last.pt"
    damage, expected = LAST_PT_DAMAGE[case]
    damage(last)
    capsys.readouterr()
    config.write_text(config.read_text().replace("\nsteps = 2", "\nsteps = 4"))  # (a longer run resumes)
    line = one_line_error(["train", "--config", str(config), "--no-progress"], capsys)
    assert str(last) in line and expected in line and f"delete {last}" in line, line


# ---- report inputs ------------------------------------------------------------------------------------

@pytest.fixture
def run_copy(reference_run, tmp_path) -> Path:
    """A copy of the finished reference run, free to damage."""
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(reference_run[1], copy)
    return copy


REPORT_INPUTS = {  # (file, damage, what the one line says)
    "csv-empty": ("results.csv", lambda p: p.write_bytes(b""), "results.csv' is damaged (EmptyDataError"),
    "csv-header-only": ("results.csv", lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"), "(no rows)"),
    "csv-column-less": ("results.csv", lambda p: p.write_text("a,b\n1,2\n"), "(no column cell_id, method"),
    "csv-binary": ("results.csv", lambda p: p.write_bytes(bytes(range(256)) * 4), "results.csv' is damaged"),
    "csv-text-in-numbers": ("results.csv", lambda p: p.write_text(p.read_text().replace(",8,0,", ",eight,0,")),
                            "column num_samples holds values of the wrong kind"),
    "json-empty": ("run.json", lambda p: p.write_bytes(b""), "run.json' is damaged (JSONDecodeError"),
    "json-invalid": ("run.json", lambda p: p.write_text("{'single': 'quotes'}"), "run.json' is damaged"),
    "json-a-list": ("run.json", lambda p: p.write_text("[]"), "a JSON list, not an object"),
    "json-no-tables": ("run.json", lambda p: p.write_text("{}"), "its 'config' is missing"),
    "json-data-a-string": ("run.json", lambda p: _edit_json(p, lambda v: v.update(data="digits")),
                           "its 'data' is not a table"),
    "json-no-threads": ("run.json", lambda p: _edit_json(p, lambda v: v["machine"].pop("torch_threads")),
                        "it lacks machine.torch_threads"),
    "json-other-schema": ("run.json", lambda p: _edit_json(p, lambda v: v.update(schema_version=2)),
                          "has results schema version 2, but this adadiff-bench reads version 1"),
}


@pytest.mark.parametrize("case", sorted(REPORT_INPUTS))
@pytest.mark.parametrize("command", ["report", "leaderboard"])
def test_a_damaged_run_stops_report_and_leaderboard_with_one_line(run_copy, tmp_path, capsys, case, command):
    name, damage, expected = REPORT_INPUTS[case]
    damage(run_copy / name)
    out = tmp_path / "report"
    line = one_line_error([command, str(run_copy), "--out", str(out)], capsys)
    assert expected in line and str(run_copy / name) in line, line
    assert not out.exists()  # refused before the report folder is made


@pytest.mark.parametrize("archive, damage", [("samples", _truncate), ("samples", _flip_a_byte), ("exits", _truncate)],
                         ids=["samples-truncated", "samples-byte-flipped", "exits-truncated"])
def test_a_damaged_cell_archive_stops_report_before_it_writes(run_copy, tmp_path, capsys, archive, damage):
    # (a third of the way into samples.npz is inside its image array; exits.npz holds many small members,
    # where a flipped byte may fall in a header field no reader checks, so it is truncated instead)
    cell = sorted((run_copy / "cells").iterdir())[-1]
    damage(cell / f"{archive}.npz")
    out = tmp_path / "report"
    line = one_line_error(["report", str(run_copy), "--out", str(out)], capsys)
    assert str(cell / f"{archive}.npz") in line and "damaged" in line, line
    assert not out.exists()  # no figure drawn from the good cells first


def test_merging_a_run_of_another_schema_is_one_line(run_copy, tmp_path, capsys):
    other = tmp_path / "runs" / "other"
    shutil.copytree(run_copy, other)
    _edit_json(other / "run.json", lambda v: v.update(schema_version=0))
    line = one_line_error(["report", str(run_copy), str(other), "--out", str(tmp_path / "report")], capsys)
    assert "schema version 0" in line and str(other / "run.json") in line


def test_a_merged_run_without_data_is_one_line(run_copy, tmp_path, capsys):
    other = tmp_path / "runs" / "other"
    shutil.copytree(run_copy, other)
    _edit_json(other / "run.json", lambda v: v.pop("data"))
    line = one_line_error(["report", str(run_copy), str(other), "--out", str(tmp_path / "report")], capsys)
    assert "its 'data' is missing" in line


HOSTILE_NAME = "tiny $\\bad{$ <b>bold</b> & | pipe"  # unbalanced mathtext, raw HTML, a Markdown column break


def test_names_with_dollars_and_html_are_shown_as_typed(run_copy, tmp_path, capsys):
    """A run name and a checkpoint file name with '$' (mathtext), HTML and '|': the report completes, and each
    output shows them as text (figures: literal; Markdown: entities; HTML: escaped)."""
    _edit_json(run_copy / "run.json", lambda v: v["config"].update(name=HOSTILE_NAME))
    frame = pd.read_csv(run_copy / "results.csv")
    frame.loc[1, "params"] = json.dumps({"checkpoint": "ck$_{1$.pt"})
    frame.to_csv(run_copy / "results.csv", index=False)
    out = tmp_path / "report"
    assert main(["report", str(run_copy), "--out", str(out)]) == 0, capsys.readouterr().err
    page = (out / "index.html").read_text()
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    board = (out / "leaderboard.md").read_text()
    assert "<b>" not in board and "&lt;b&gt;bold&lt;/b&gt; &amp; \\| pipe" in board
    assert "checkpoint=ck$_{1$" in board  # (a checkpoint is shown by its file stem)
    assert list(out.glob("fid_vs_gflops*.png")) and not list(out.rglob("*.tmp"))


def test_a_figure_title_with_a_dollar_renders_as_typed(tmp_path):
    """The report style draws text as typed: the same title crashes matplotlib's mathtext without it."""
    import matplotlib.pyplot as plt
    from adadiff_bench.report.style import RC, new_figure, save, styled

    @styled
    def draw(title: str) -> list[Path]:
        fig, ax = new_figure()
        ax.set_title(title)
        return save(fig, tmp_path, "title")

    assert all(p.stat().st_size > 0 for p in draw(HOSTILE_NAME))
    with plt.rc_context({**RC, "text.parse_math": True}), pytest.raises(ValueError):
        fig, ax = plt.subplots()
        ax.set_title(HOSTILE_NAME)
        try:
            fig.savefig(tmp_path / "crash.png")
        finally:
            plt.close(fig)


# ---- stray temporary files ------------------------------------------------------------------------------

DEAD_PID = 99_999_999  # above any pid_max: no such process


def test_an_atomic_write_removes_what_killed_writers_of_its_file_left(tmp_path):
    """`.<name>.<pid>.*.tmp` of a process that is gone (or of the old naming, without a pid) is deleted by the
    next write of that file; a running writer's temporary and other files' temporaries are left alone."""
    target = tmp_path / "row.json"
    dead, unnamed = tmp_path / f".row.json.{DEAD_PID}.abc.tmp", tmp_path / ".row.json.k3j2h1.tmp"
    running, other = tmp_path / f".row.json.{os.getpid()}.xyz.tmp", tmp_path / f".exits.npz.{DEAD_PID}.q.tmp"
    for path in (dead, unnamed, running, other):
        path.write_bytes(b"half")
    results.write_json(target, {"cell_id": "a"})
    assert json.loads(target.read_text()) == {"cell_id": "a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, running.name, other.name])


def test_a_checkpoint_save_removes_what_a_killed_save_left(tmp_path, tiny_model):
    stray = tmp_path / f".last.pt.{DEAD_PID}.abc.tmp"
    stray.write_bytes(b"half")
    save_checkpoint(tmp_path / "last.pt", tiny_model, TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_rerun_of_report_leaves_no_temporary_file(run_copy, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(run_copy), "--out", str(out)]) == 0
    for name in ("index.html", "leaderboard.md", "fid_vs_gflops.png"):  # a report killed while writing these
        (out / f".{name}.{DEAD_PID}.abc.tmp").write_bytes(b"half")
    assert main(["report", str(run_copy), "--out", str(out)]) == 0
    assert not list(out.rglob("*.tmp"))


def test_the_old_run_a_killed_overwrite_set_aside_is_removed(reference_copy, capsys):
    """Killed after both renames of --overwrite, before deleting the old run: the next command removes it."""
    (args, final), _ = reference_copy
    shutil.copytree(final, final.parent / f".{final.name}.old")
    one_line_error(args, capsys)  # the run exists (complete, same config): refused, and the leftover is gone
    assert not (final.parent / f".{final.name}.old").exists() and final.is_dir()


# ---- the file system ---------------------------------------------------------------------------------------

def test_a_config_that_is_not_utf8_is_one_line(tmp_path, tiny_checkpoint, capsys):
    args = run_args(tmp_path, tiny_checkpoint)
    config = Path(args[2])
    config.write_bytes(config.read_bytes().replace(b'name = "tiny"', b'name = "caf\xe9"'))
    line = one_line_error(args, capsys)
    assert str(config) in line and "not UTF-8 text (byte 0xe9" in line and "save the config as UTF-8" in line
    assert not (tmp_path / "results").exists()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_training_saves_is_one_line(tmp_path, capsys, monkeypatch):
    from test_training_device import write_config
    config = write_config(tmp_path, steps=2, checkpoint_every=2)
    monkeypatch.setattr(torch, "save", _disk_full)
    line = one_line_error(["train", "--config", str(config), "--no-progress"], capsys)
    assert "last.pt" in line and "No space left on device" in line and "free space" in line
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / "last.pt").exists()


def test_a_full_disk_while_writing_a_report_is_one_line(run_copy, tmp_path, capsys, monkeypatch):
    from test_errors import OsWithFullDisk
    out = tmp_path / "report"
    monkeypatch.setattr(results, "os", OsWithFullDisk("index.html"))
    line = one_line_error(["report", str(run_copy), "--out", str(out)], capsys)
    assert "index.html" in line and "No space left on device" in line
    assert not (out / "index.html").exists() and not list(out.rglob("*.tmp"))


def _refused(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_a_read_only_report_folder_is_one_line(run_copy, tmp_path, capsys, monkeypatch):
    """(Simulated: the tests may run as root, whom permissions do not stop.)"""
    out = tmp_path / "report"
    out.mkdir()
    monkeypatch.setattr(results.tempfile, "mkstemp", _refused)
    line = one_line_error(["report", str(run_copy), "--out", str(out)], capsys)
    assert "Permission denied" in line and str(out) in line and "fix permissions" in line
    assert list(out.iterdir()) == []


def test_a_read_only_results_folder_is_one_line(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(results, "open", _refused, raising=False)  # the run's lock file is its first file
    line = one_line_error(run_args(tmp_path, tiny_checkpoint), capsys)
    assert "cannot write in results folder" in line and "Permission denied" in line
    assert list((tmp_path / "results").iterdir()) == []


# ---- the catalogue ---------------------------------------------------------------------------------------

def test_every_hostile_files_entry_names_a_test_that_exists():
    """docs/errors.md, section "Hostile files": every test it names is defined here or in tests/test_kill.py."""
    import re
    from conftest import REPO
    section = (REPO / "docs" / "errors.md").read_text().split("\n## Hostile files\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_[a-z0-9_]+)(?:\[[^\]]*\])?`", section))
    defined = set(re.findall(r"^def (test_[a-z0-9_]+)", "".join(
        (REPO / "tests" / name).read_text() for name in ("test_hostile_files.py", "test_kill.py")), re.M))
    assert len(named) >= 30 and named <= defined, sorted(named - defined)


BASELINE_BODIES = {  # a shipped baseline checkpoint, damaged: (file, mutation, what the one line says)
    "l2c-beta-a-string": ("l2c_digits.pt", _replace("beta", "x"), "`beta` must be a (steps, blocks, 2) float tensor"),
    "l2c-beta-2d": ("l2c_digits.pt", lambda p: p.update(beta=p["beta"][0]), "`beta` must be a (steps, blocks, 2)"),
    "l2c-solver-a-number": ("l2c_digits.pt", _replace("solver", 3), "solver text"),
    "berxit-width-a-string": ("berxit_digits.pt", _replace("embed_dim", "x"), "contents do not fit that format"),
    "berxit-state-a-tensor": ("berxit_digits.pt", _replace("state_dict", torch.zeros(2)),
                              "contents do not fit that format"),
}


@pytest.mark.parametrize("case", sorted(BASELINE_BODIES))
def test_a_baseline_checkpoint_with_a_bad_body_is_one_line(tmp_path, capsys, monkeypatch, case):
    from conftest import REPO
    name, mutate, expected = BASELINE_BODIES[case]
    monkeypatch.chdir(REPO)  # (the shipped routers name their base checkpoint relative to the repository)
    bad = bad_copy(tmp_path, REPO / "checkpoints" / name, mutate)
    extra = f'[[methods]]\nname = "{name.split("_")[0]}"\ncheckpoint = "{bad}"\n'
    line = one_line_error(run_args(tmp_path, REPO / "checkpoints" / "uvit_digits.pt", extra_methods=extra), capsys)
    assert str(bad) in line and expected in line, line
    assert not (tmp_path / "results").exists()
