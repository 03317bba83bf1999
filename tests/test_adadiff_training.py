"""AdaDiff training through `adadiff-bench train`: frozen backbones stay fixed, estimators learn."""
from __future__ import annotations

import pytest
import torch

from adadiff_bench.adadiff_checkpoints import load_adadiff
from adadiff_bench.checkpoints import load_model
from adadiff_bench.cli import main
from conftest import REPO


def write_config(tmp_path, base, freeze: bool, estimator="official", loss="official", heads="shared"):
    text = (REPO / "configs" / "adadiff_digits_frozen.toml").read_text()
    text = text.replace('base_checkpoint = "checkpoints/uvit_digits.pt"', f'base_checkpoint = "{base}"')
    text = text.replace("freeze_backbone = true", f"freeze_backbone = {str(freeze).lower()}")
    text = text.replace('estimator = "official"', f'estimator = "{estimator}"')
    text = text.replace('loss = "official"', f'loss = "{loss}"').replace('heads = "shared"', f'heads = "{heads}"')
    text = text.replace("steps = 1500", "steps = 6").replace("batch_size = 128", "batch_size = 16")
    text = text.replace('out_dir = "results/train/adadiff_digits_frozen"', f'out_dir = "{tmp_path / "run"}"')
    text = text.replace('export = "checkpoints/adadiff_digits_frozen.pt"', f'export = "{tmp_path / "out.pt"}"')
    text = text.replace("warmup_steps = 50", "warmup_steps = 1").replace("ema_decay = 0.995", "ema_decay = 0.0")
    path = tmp_path / "adadiff.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("estimator, loss, heads", [("official", "official", "shared"), ("probe", "paper", "per-exit"),
                                                   ("timestep", "paper", "shared"), ("attention", "official", "shared")])
def test_frozen_training_changes_only_estimators_and_heads(tmp_path, tiny_checkpoint, estimator, loss, heads):
    config = write_config(tmp_path, tiny_checkpoint, freeze=True, estimator=estimator, loss=loss, heads=heads)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    base = load_model(tiny_checkpoint)
    trained = load_adadiff(tmp_path / "out.pt")
    for name, value in base.state_dict().items():
        assert torch.allclose(trained.backbone.state_dict()[name], value, atol=1e-3), name  # fp16 export
    final = load_adadiff(tmp_path / "run" / "ema.pt")
    assert final.config.estimator == estimator
    # the estimators moved away from their (seeded) initialisation
    from adadiff_bench.models.adadiff import AdaDiffConfig, AdaDiffUViT
    torch.manual_seed(0)
    initial = AdaDiffUViT(load_model(tiny_checkpoint), AdaDiffConfig(estimator, heads))
    moved = [n for n, v in initial.estimator.state_dict().items() if not torch.equal(final.estimator.state_dict()[n], v)]
    assert moved


def test_finetuning_changes_the_backbone(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, tiny_checkpoint, freeze=False)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    base = load_model(tiny_checkpoint)
    trained = load_adadiff(tmp_path / "run" / "ema.pt")
    changed = [n for n, v in base.state_dict().items() if not torch.allclose(trained.backbone.state_dict()[n], v)]
    assert "in_blocks.0.attn.qkv.weight" in changed and "decoder_pred.weight" in changed


def test_ablation_cells_train_on_demand_once(tmp_path, tiny_checkpoint, monkeypatch):
    from adadiff_bench.methods import adadiff as adadiff_module
    from adadiff_bench.methods import get_method, make_params
    config = write_config(tmp_path, tiny_checkpoint, freeze=True)
    monkeypatch.setattr(adadiff_module, "ON_DEMAND_CACHE", tmp_path / "cache")
    calls = []
    real_train = adadiff_module.train
    monkeypatch.setattr(adadiff_module, "train", lambda cfg: (calls.append(cfg.adadiff.estimator), real_train(cfg))[1])
    cls = get_method("adadiff")
    for _ in range(2):
        params = make_params(cls, {"train": str(config), "estimator": "probe", "loss": "paper"}, "test")
        method = cls(load_model(tiny_checkpoint), params)
        assert method.net.config.estimator == "probe"
    assert calls == ["probe"]  # the second cell reused the cached checkpoint
    assert len(list((tmp_path / "cache").glob("probe-paper-frozen-*/ema.pt"))) == 1


def test_overrides_without_a_training_config_are_refused():
    from adadiff_bench.errors import UserError
    from adadiff_bench.methods import get_method, make_params
    with pytest.raises(UserError, match="need `train`"):
        make_params(get_method("adadiff"), {"estimator": "probe"}, "test")
    with pytest.raises(UserError, match="unknown estimator 'prob'"):
        make_params(get_method("adadiff"), {"train": str(REPO / "configs" / "adadiff_digits_frozen.toml"),
                                            "estimator": "prob"}, "test")
