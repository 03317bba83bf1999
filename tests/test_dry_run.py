"""`adadiff-bench run --config CONFIG --dry-run`: every cell listed with what it loads, an estimate whose
image-step count matches what a real run samples, nothing written; a bad config still stops with exit 2."""
from __future__ import annotations

import hashlib

import pytest

from adadiff_bench import harness
from adadiff_bench.cli import main
from adadiff_bench.config import load_run_config
from adadiff_bench.dry_run import cell_seconds, describe_cell
from conftest import write_run_config


def files_under(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def tiny_config(tmp_path, checkpoint):
    """Four cells: full at 2 and 3 steps, static-exit, and full on a second copy of the network."""
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    extra = (f'\n[[methods]]\nname = "static-exit"\nk = 3\n'
             f'\n[[methods]]\nname = "full"\ncheckpoint = "{copy}"\n')
    return write_run_config(tmp_path, checkpoint, extra_methods=extra), copy


def test_dry_run_lists_every_cell_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    config, copy = tiny_config(tmp_path, tiny_checkpoint)
    before = files_under(tmp_path)
    assert main(["run", "--config", str(config), "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert files_under(tmp_path) == before  # no results folder, no cache
    cells = list(harness.plan_curves(load_run_config(config)))
    assert len(cells) == 4 and f"{len(cells)} cells:" in out
    for index, cell in enumerate(cells, 1):
        assert f"[{index}] {describe_cell(cell)}" in out
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert f"loads {copy} (sha256 {digest[:12]})" in out
    assert f"network: {tiny_checkpoint} (sha256 {hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()[:12]})" in out
    assert "estimated time: ~" in out and "the estimate rests on the faster of 2 timed batches of 16 images of `full`" in out


def test_the_estimate_counts_the_image_steps_a_run_samples(tmp_path, tiny_checkpoint, monkeypatch):
    """With 1 s per image-step, the estimate is the number of image-steps the harness asks `generate` for."""
    config_path, _ = tiny_config(tmp_path, tiny_checkpoint)
    config = load_run_config(config_path)
    sampled = []
    original = harness.generate

    def counting(cell, model, num_samples, *args, **kwargs):
        sampled.append(num_samples * cell.num_steps)
        return original(cell, model, num_samples, *args, **kwargs)

    monkeypatch.setattr(harness, "generate", counting)
    expected = sum(sum(cell_seconds(cell, config, 1.0)) for cell in harness.plan_curves(config))
    assert main(["run", "--config", str(config_path), "--no-progress"]) == 0
    assert sum(sampled) == pytest.approx(expected)


def test_a_dry_run_downloads_nothing(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from adadiff_bench.metrics import extractors

    def no_download():
        raise AssertionError("a dry run must not download")

    monkeypatch.setattr(extractors, "download_inception_weights", no_download)
    monkeypatch.setattr(extractors, "resolve_inception_weights", lambda config: None)  # none on disk
    config = write_run_config(tmp_path, tiny_checkpoint,
                              metrics='inception = "download"\nkid_subset_size = 16\nisc_splits = 2')
    assert main(["run", "--config", str(config), "--dry-run", "--no-progress"]) == 0
    assert 'the run will download the Inception weights (the dry run did not)' in capsys.readouterr().out


def test_a_bad_config_still_stops_with_one_line(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, extra_methods='\n[[methods]]\nname = "adadif"\n')
    before = files_under(tmp_path)
    assert main(["run", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown method 'adadif'" in err
    assert files_under(tmp_path) == before
