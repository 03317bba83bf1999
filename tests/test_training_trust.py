"""Training you can trust: a method's training resumes only on the base checkpoint it started from (same
SHA-256), `train --restart` starts over, and a state saved before the hash was recorded resumes with a warning."""
from __future__ import annotations

from pathlib import Path

import hashlib

import pytest
import torch

from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.cli import main
from conftest import TINY


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def method_config(tmp_path, base, table: str, steps: int) -> list[str]:
    """`adadiff-bench train` of `table` (adadiff or berxit) on the tiny base, a state saved every 2 steps."""
    body = {"adadiff": 'estimator = "official"', "berxit": ""}[table]
    config = tmp_path / f"{table}_{steps}.toml"
    config.write_text(f'[data]\nname = "digits"\n\n[{table}]\nbase_checkpoint = "{base}"\n{body}\n\n'
                      f'[train]\nsteps = {steps}\nbatch_size = 8\nwarmup_steps = 1\ncheckpoint_every = 2\n'
                      f'threads = 1\nout_dir = "{tmp_path / "run"}"\n')
    return ["train", "--config", str(config), "--no-progress"]


def retrain_base(path) -> None:
    """Another base model at the same path (as a user retraining it would leave)."""
    torch.manual_seed(123)
    save_checkpoint(path, build_model(TINY), TINY)


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("table", ["adadiff", "berxit"])
def test_resume_on_a_retrained_base_is_refused_and_restart_starts_over(tmp_path, tiny_checkpoint, capsys, table):
    assert main(method_config(tmp_path, tiny_checkpoint, table, steps=2)) == 0
    old_hash = sha256(tiny_checkpoint)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["base_sha256"] == old_hash
    assert torch.load(tmp_path / "run" / "ema.pt", weights_only=True)["meta"]["base_sha256"] == old_hash

    retrain_base(tiny_checkpoint)
    new_hash = sha256(tiny_checkpoint)
    assert new_hash != old_hash
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(method_config(tmp_path, tiny_checkpoint, table, steps=4)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (f"last.pt was trained on a base with hash {old_hash[:12]}, the base at {tiny_checkpoint} has hash "
            f"{new_hash[:12]}; pass --restart to start over") in err
    assert snapshot(tmp_path / "run") == before  # nothing written

    assert main(method_config(tmp_path, tiny_checkpoint, table, steps=4) + ["--restart"]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "--restart: training from step 0" in out
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["base_sha256"] == new_hash


def test_the_same_base_resumes(tmp_path, tiny_checkpoint, capsys):
    assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=2)) == 0
    capsys.readouterr()
    assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=4)) == 0
    assert f"resuming from {tmp_path / 'run' / 'last.pt'} at step 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4


def test_a_training_resumes_when_only_its_export_changed(tmp_path, tiny_checkpoint, capsys):
    """Where the result is exported (and in which precision) does not change the training: it resumes."""
    first = method_config(tmp_path, tiny_checkpoint, "adadiff", steps=2)
    assert main(first) == 0
    capsys.readouterr()
    second = method_config(tmp_path, tiny_checkpoint, "adadiff", steps=4)
    config = Path(second[2])
    config.write_text(config.read_text() + f'export = "{tmp_path / "exported.pt"}"\nexport_half = false\n')
    assert main(second) == 0
    assert f"resuming from {tmp_path / 'run' / 'last.pt'} at step 2" in capsys.readouterr().out
    assert (tmp_path / "exported.pt").is_file()


def test_a_state_without_a_base_hash_resumes_with_a_warning(tmp_path, tiny_checkpoint, capsys):
    assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=2)) == 0
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["base_sha256"]  # as saved before the hash was recorded
    torch.save(state, path)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="records no base hash"):
        assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=4)) == 0
    assert "at step 2" in capsys.readouterr().out



def test_an_adadiff_state_from_before_estimator_lr_resumes(tmp_path, tiny_checkpoint, capsys):
    """A last.pt saved before `[adadiff] estimator_lr` existed trained its estimators at [train] lr: it resumes
    when the key is left at 0, and a new value is named as the difference."""
    assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=2)) == 0
    path = tmp_path / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["task_config"]["estimator_lr"]  # as saved before the setting
    torch.save(state, path)
    capsys.readouterr()
    assert main(method_config(tmp_path, tiny_checkpoint, "adadiff", steps=4)) == 0
    assert "resuming" in capsys.readouterr().out and torch.load(path, weights_only=True)["step"] == 4
    argv = method_config(tmp_path, tiny_checkpoint, "adadiff", steps=6)
    config = tmp_path / "adadiff_6.toml"
    config.write_text(config.read_text().replace('estimator = "official"', 'estimator = "official"\nestimator_lr = 0.01'))
    assert main(argv) == 2
    assert "task_config.estimator_lr (0.0 saved, 0.01 now)" in capsys.readouterr().err
