"""`adadiff-bench init --data PATH`: a starter config for the user's images that loads and that
`run --dry-run` accepts; a base-model training config sized to the data; existing files kept without --force."""
from __future__ import annotations

import tomllib

import numpy as np
from PIL import Image

from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.cli import main
from adadiff_bench.config import UViTConfig, load_run_config
from adadiff_bench.data import check_matches_model, load_dataset
from adadiff_bench.harness import plan_curves
from adadiff_bench.methods import available_methods
from adadiff_bench.metrics.extractor_training import default_output
from adadiff_bench.training import load_train_config

RGB16 = UViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)


def rgb_npz(tmp_path, count: int = 24):
    images = np.random.default_rng(0).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images)
    return tmp_path / "mine.npz"


def test_the_config_for_an_npz_loads_and_a_dry_run_accepts_it(tmp_path, capsys):
    base = tmp_path / "base16.pt"
    save_checkpoint(base, build_model(RGB16), RGB16)
    out = tmp_path / "mine.toml"
    assert main(["init", "--data", str(rgb_npz(tmp_path)), "--out", str(out), "--checkpoint", str(base)]) == 0
    adadiff_config = tmp_path / "mine_adadiff_train.toml"
    assert capsys.readouterr().out.strip().splitlines() == [f"wrote {adadiff_config}", f"wrote {out}"]
    assert not (tmp_path / "mine_train.toml").exists()  # a base model was given
    adadiff_training = load_train_config(adadiff_config)
    assert adadiff_training.task == "adadiff" and adadiff_training.task_config.base_checkpoint == str(base)
    text = out.read_text()
    # no packaged feature space reads 3x16x16 here: the SWD is on, and the learned space's file is named
    # (commented out until train-extractor has written it)
    data = load_dataset(load_run_config(out).data)
    assert 'swd = "on"' in text and f'# extractor = "{default_output(data)}"' in text
    config = load_run_config(out)
    assert config.checkpoint == str(base) and config.data.name == "npz"
    written = {entry.name for entry in config.methods}
    assert {"full", "adadiff", "deepcache", "teacache", "static-exit"} <= written
    adadiff = next(entry for entry in config.methods if entry.name == "adadiff")
    assert adadiff.params["train"] == str(adadiff_config)  # trained on demand by the run
    # as the official code: every weight fine-tuned (a frozen base's exits are unusable), so the fine-tuned
    # backbone's group gets its own full-depth reference, from the same on-demand training
    assert not adadiff_training.task_config.freeze_backbone
    assert [entry.params for entry in config.methods if entry.name == "full" and entry.params.get("train")] \
        == [{"train": str(adadiff_config)}]
    assert not written & {"berxit", "l2c", "duodiff"}  # they need networks trained for them
    for name in ("berxit", "l2c", "duodiff"):
        assert f"# {name}: needs a network trained for it" in text
    # every listed method is either a [[methods]] table or a comment saying why it was left out
    assert written | {line.split('"')[1] for line in text.splitlines() if line.startswith('# name = "')} \
        == set(available_methods()) - {"berxit", "l2c", "duodiff"}
    assert len(plan_curves(config, str(out))) > len(written)  # the sweeps expand

    config_text = text.replace('seeds = [0]', f'seeds = [0]\nresults_dir = "{tmp_path / "results"}"')
    config_text = config_text.replace("num_samples = 500", "num_samples = 16")
    out.write_text(config_text)
    assert main(["run", "--config", str(out), "--dry-run", "--no-progress"]) == 0
    listed = capsys.readouterr().out
    assert f"{len(plan_curves(load_run_config(out)))} cells:" in listed
    assert f"trains on demand from {adadiff_config} (3000 steps)" in listed
    assert not (tmp_path / "results").exists()


def test_without_a_checkpoint_a_training_config_sized_to_the_data_is_written(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(np.random.default_rng(1).integers(0, 256, (6, 8, 8), dtype=np.uint8)):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "configs" / "pngs.toml"
    assert main(["init", "--data", str(folder), "--out", str(out)]) == 0
    train_config = load_train_config(tmp_path / "configs" / "pngs_train.toml")
    check_matches_model(load_dataset(train_config.data), train_config.model.img_size, train_config.model.in_chans)
    run_config = load_run_config(out)
    assert run_config.checkpoint == train_config.train.export
    adadiff_training = load_train_config(tmp_path / "configs" / "pngs_adadiff_train.toml")
    assert adadiff_training.task_config.base_checkpoint == train_config.train.export  # built on the base it trains
    assert "will be computed in: digits-cnn" in out.read_text()  # 1x8x8 grey images: the digits classifier reads them
    static = next(entry for entry in run_config.methods if entry.name == "static-exit")
    blocks = train_config.model.depth + 1
    assert static.params["k"] == [3 * blocks // 4]
    # both trainings follow the converged recipe: an EMA warm-up and a held-out stopping rule (steps are a cap)
    for training in (train_config, adadiff_training):
        assert training.train.ema_warmup and training.train.holdout > 0 and training.train.patience > 0


def test_existing_files_are_kept_without_force(tmp_path, capsys):
    data = rgb_npz(tmp_path)
    out = tmp_path / "mine.toml"
    out.write_text("# mine\n")
    assert main(["init", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already exist" in err and "--force" in err
    assert out.read_text() == "# mine\n" and not (tmp_path / "mine_train.toml").exists()
    assert not (tmp_path / "mine_adadiff_train.toml").exists()
    assert main(["init", "--data", str(data), "--out", str(out), "--force"]) == 0
    assert tomllib.loads(out.read_text())["data"]["path"] == str(data)


def test_a_missing_data_path_is_one_line(tmp_path, capsys):
    assert main(["init", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.toml").exists()


def test_an_extractor_trained_for_the_data_is_named_in_the_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # (train-extractor writes extractors/learned-<hash>.pt under the working directory)
    data = rgb_npz(tmp_path)
    assert main(["train-extractor", "--data", str(data), "--steps", "2"]) == 0
    base = tmp_path / "base16.pt"
    save_checkpoint(base, build_model(RGB16), RGB16)
    assert main(["init", "--data", str(data), "--out", "mine.toml", "--checkpoint", str(base)]) == 0
    capsys.readouterr()
    config = load_run_config(tmp_path / "mine.toml")
    assert config.metrics.extractor == str(default_output(load_dataset(config.data)))
    assert (tmp_path / config.metrics.extractor).exists()
