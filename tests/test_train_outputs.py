"""What a training leaves behind: its last line names the checkpoint a run config needs, and
`train-classifier` writes only where it is told (never the packaged asset by default)."""
from __future__ import annotations

import functools
import hashlib
import re
import tomllib

from adadiff_bench.checkpoints import load_model
from adadiff_bench.cli import main
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.metrics import classifier
from conftest import REPO, tiny_training_toml, with_keys

def _last_setting(out: str) -> str:
    """The TOML after 'a run config uses it as: ' on the last line."""
    last = out.strip().splitlines()[-1]
    prefix = "a run config uses it as: "
    assert last.startswith(prefix), last
    return last[len(prefix):]


def test_last_line_names_the_exported_base_model(tmp_path, capsys):
    export = tmp_path / "exported" / "uvit.pt"
    config = tmp_path / "train.toml"
    config.write_text(tiny_training_toml(tmp_path / "run", checkpoint_every=2, export=f'"{export}"'))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    setting = tomllib.loads(_last_setting(capsys.readouterr().out))
    assert setting == {"checkpoint": str(export)}       # the export, not out_dir/ema.pt
    assert load_model(setting["checkpoint"]).architecture.embed_dim == 16


def test_last_line_names_a_methods_checkpoint_knob(tmp_path, tiny_checkpoint, capsys):
    text = with_keys((REPO / "configs" / "adadiff_digits_frozen.toml").read_text(),
                     base_checkpoint=f'"{tiny_checkpoint}"', steps=2, batch_size=8, out_dir=f'"{tmp_path / "run"}"')
    text = re.sub(r"^export = .*\n", "", text, flags=re.MULTILINE)  # no export: ema.pt is the file
    assert "export =" not in text
    config = tmp_path / "adadiff.toml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    setting = _last_setting(capsys.readouterr().out)
    assert setting.startswith("[[methods]] ")
    table = tomllib.loads("entry = {" + setting.removeprefix("[[methods]] ") + "}")["entry"]
    assert table == {"name": "adadiff", "checkpoint": str(tmp_path / "run" / "ema.pt")}
    params = make_params(get_method("adadiff"), {"checkpoint": table["checkpoint"]}, "test")  # a valid knob setting
    assert params.checkpoint == table["checkpoint"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_classifier_without_a_target_refuses_and_leaves_the_asset(monkeypatch, capsys):
    before = _sha256(classifier.ASSET_PATH)
    trained = []
    monkeypatch.setattr(classifier, "train_digits_classifier", lambda *a, **k: trained.append(1))
    assert main(["train-classifier"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out PATH" in err and "--replace-packaged-asset" in err
    assert not trained and _sha256(classifier.ASSET_PATH) == before


def test_train_classifier_writes_only_to_out(tmp_path, monkeypatch, capsys):
    before = _sha256(classifier.ASSET_PATH)
    # the real training, one epoch instead of forty (the target path is what is tested here)
    monkeypatch.setattr(classifier, "train_digits_classifier",
                        functools.partial(classifier.train_digits_classifier, epochs=1))
    out = tmp_path / "cnn.pt"
    assert main(["train-classifier", "--out", str(out)]) == 0
    model, meta = classifier.load_classifier(out)
    assert 0 <= meta["heldout_accuracy"] <= 1 and str(out) in capsys.readouterr().out
    assert _sha256(classifier.ASSET_PATH) == before
