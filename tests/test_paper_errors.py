"""docs/errors.md, "Paper settings: presets, schedules, guidance, published statistics": the one-line errors
of issue 14's settings, through the CLI (exit 2, one line, nothing written), and the catalogue's test names."""
from __future__ import annotations

import re

import pytest
import torch

from adadiff_bench.cli import main
from adadiff_bench.config import ModelConfig
from adadiff_bench.errors import UserError
from adadiff_bench.models.autoencoder import load_autoencoder
from adadiff_bench.models.official import load_preset_model
from conftest import REPO, write_run_config


def run_refused(tmp_path, config, capsys) -> str:
    """`adadiff-bench run` on `config`: exit 2, one line on stderr, no results folder; the line."""
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert not (tmp_path / "results").exists()
    return error


def preset_run(tmp_path, sampling: str = "", metrics: str = 'inception = "off"', preset="cifar10_uvit_s2"):
    """A run of a preset whose release file exists (empty: the checks stop the run before loading it)."""
    (tmp_path / "nnet_ema.pth").touch()
    config = tmp_path / "run.toml"
    config.write_text(f'name = "p"\nresults_dir = "{tmp_path / "results"}"\n[model]\npreset = "{preset}"\n'
                      f'checkpoint = "{tmp_path / "nnet_ema.pth"}"\n[sampling]\n{sampling}\n'
                      f'[metrics]\n{metrics}\n[[methods]]\nname = "full"\n')
    return config


def test_an_unknown_schedule_through_the_cli(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, sampling='solver = "ddim"\nschedule = "scaled_linear"')
    error = run_refused(tmp_path, config, capsys)
    assert "[sampling]: unknown schedule 'scaled_linear' (did you mean 'scaled-linear'" in error
    assert "valid: linear, scaled-linear, vp" in error


def test_a_solver_that_does_not_run_the_schedule_through_the_cli(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, sampling='solver = "euler-maruyama"\nschedule = "linear"')
    error = run_refused(tmp_path, config, capsys)
    assert "solver 'euler-maruyama' does not run schedule 'linear'; with this schedule use one of" in error


def test_guidance_on_an_unconditional_model_through_the_cli(tmp_path, tiny_checkpoint, capsys):
    config = write_run_config(tmp_path, tiny_checkpoint, sampling='solver = "ddim"\nguidance = 1.4')
    error = run_refused(tmp_path, config, capsys)
    assert "[sampling]: guidance = 1.4 needs a conditional model trained with a null label" in error
    assert "Set guidance = 1.0" in error


def test_an_unknown_preset_through_the_cli(tmp_path, capsys):
    error = run_refused(tmp_path, preset_run(tmp_path, preset="cifar10_uvit_s3"), capsys)
    assert "[model] unknown model preset 'cifar10_uvit_s3' (did you mean 'cifar10_uvit_s2'?)" in error


def test_a_preset_sampled_with_another_schedule_through_the_cli(tmp_path, capsys):
    error = run_refused(tmp_path, preset_run(tmp_path, sampling='schedule = "linear"'), capsys)
    assert "[sampling] schedule is 'linear' but cifar10_uvit_s2 was trained with 'vp'" in error
    assert 'set schedule = "vp"' in error


def test_missing_reference_stats_through_the_cli(tmp_path, capsys):
    metrics = f'inception = "auto"\nreference_stats = "{tmp_path / "fid_stats.npz"}"'
    config = preset_run(tmp_path, sampling='schedule = "vp"\nsolver = "euler-maruyama"', metrics=metrics)
    error = run_refused(tmp_path, config, capsys)
    assert "[metrics] reference_stats" in error and "fid_stats.npz' not found; it is published as" in error
    assert "fid_stats/fid_stats_cifar10_train_pytorch.npz" in error


def test_a_release_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "nnet_ema.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match=r"run.toml: '.*nnet_ema.pth' is not a state dict; expected ") as error:
        load_preset_model(ModelConfig(preset="cifar10_uvit_s2", checkpoint=str(path)), "run.toml")
    assert len(str(error.value).splitlines()) == 1


def test_an_autoencoder_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "autoencoder_kl.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match=r"autoencoder '.*autoencoder_kl.pth' is not a state dict; use U-ViT's "
                                        r"stable-diffusion/autoencoder_kl.pth") as error:
        load_autoencoder(str(path), 0.18215)
    assert len(str(error.value).splitlines()) == 1


def test_every_paper_settings_entry_names_a_test_that_exists():
    """docs/errors.md, section "Paper settings: ...": every test it names is defined in the file the row names
    (tests/test_paper_errors.py unless the row says otherwise)."""
    text = (REPO / "docs" / "errors.md").read_text()
    section = text.split("\n## Paper settings: presets, schedules, guidance, published statistics\n", 1)[1]
    rows = [row for row in section.split("\n## ", 1)[0].splitlines() if row.startswith("| ") and "`test_" in row]
    assert len(rows) >= 15
    for row in rows:
        files = re.findall(r"tests/(test_[a-z0-9_]+\.py)", row) or ["test_paper_errors.py"]
        defined = "".join((REPO / "tests" / name).read_text() for name in files)
        for name in re.findall(r"`(test_[a-z0-9_]+)(?:\[[^\]]*\])?`", row):
            assert re.search(rf"^def {name}\(", defined, re.M), (name, files)
