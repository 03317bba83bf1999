"""AdaDiff training through `adadiff-bench train`: frozen backbones stay fixed, estimators learn."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adadiff_bench.methods.adadiff import load_adadiff
from adadiff_bench.checkpoints import load_model
from adadiff_bench.cli import main
from conftest import REPO, with_keys


def write_config(tmp_path, base, freeze: bool, estimator="official", loss="official", heads="shared"):
    """The shipped frozen recipe, sized for a test: 6 steps of 16 images, no warm-up, no EMA."""
    text = with_keys((REPO / "configs" / "adadiff_digits_frozen.toml").read_text(), base_checkpoint=f'"{base}"',
                     freeze_backbone=str(freeze).lower(), estimator=f'"{estimator}"', loss=f'"{loss}"',
                     heads=f'"{heads}"', steps=6, batch_size=16, out_dir=f'"{tmp_path / "run"}"',
                     export=f'"{tmp_path / "out.pt"}"', warmup_steps=1, ema_decay=0.0, estimator_lr=0)
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
    from adadiff_bench.methods.adadiff import AdaDiffConfig, AdaDiffNetwork
    torch.manual_seed(0)
    initial = AdaDiffNetwork(load_model(tiny_checkpoint), AdaDiffConfig(estimator, heads))
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
    from adadiff_bench.methods import PrepareContext, get_method, make_params
    from adadiff_bench.methods.adadiff import method as adadiff_method
    config = write_config(tmp_path, tiny_checkpoint, freeze=True)
    calls = []
    real_train = adadiff_method.train
    monkeypatch.setattr(adadiff_method, "train", lambda cfg, progress=True: (calls.append(cfg.task_config.estimator),
                                                                             real_train(cfg, progress=progress))[1])
    cls = get_method("adadiff")
    context = PrepareContext(tmp_path / "cache", progress=False)
    for _ in range(2):
        params = make_params(cls, {"train": str(config), "estimator": "probe", "loss": "paper"}, "test")
        prepared = cls.prepare(params, context)  # the harness's prepare step trains (once), then samples with it
        assert prepared.train == "" and prepared.estimator == "" and prepared.checkpoint.endswith("weights.pt")
        method = cls(load_model(tiny_checkpoint), prepared)
        assert method.net.config.estimator == "probe"
    assert calls == ["probe"]  # the second cell reused the cached checkpoint
    assert len(list((tmp_path / "cache").glob("probe-paper-frozen-*/weights.pt"))) == 1


def test_a_cached_training_samples_with_its_half_precision_export_made_from_an_older_ema_file(
        tmp_path, tiny_checkpoint, monkeypatch):
    """A cache folder trained before exports were cached (ema.pt only) gets the same half-precision export,
    configs and meta kept, without training again."""
    from adadiff_bench.checkpoints import read_checkpoint
    from adadiff_bench.methods import PrepareContext, get_method, make_params
    from adadiff_bench.methods.adadiff import method as adadiff_method
    cls, context = get_method("adadiff"), PrepareContext(tmp_path / "cache", progress=False)
    params = make_params(cls, {"train": str(write_config(tmp_path, tiny_checkpoint, freeze=True)),
                               "estimator": "probe"}, "test")
    exported = Path(cls.prepare(params, context).checkpoint)
    first = read_checkpoint(exported)
    exported.unlink()
    monkeypatch.setattr(adadiff_method, "train", lambda *a, **k: pytest.fail("trained again"))
    assert Path(cls.prepare(params, context).checkpoint) == exported
    again, full = read_checkpoint(exported), read_checkpoint(exported.parent / "ema.pt")
    assert again["meta"] == first["meta"] == full["meta"] and again["adadiff"] == first["adadiff"]
    assert all(torch.equal(again["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])
    assert all(v.dtype == torch.float16 for v in again["state_dict"].values() if v.is_floating_point())


def test_a_setting_that_trains_is_refused_unless_prepared(tmp_path, tiny_checkpoint):
    from adadiff_bench.errors import UserError
    from adadiff_bench.methods import get_method, make_params
    cls = get_method("adadiff")
    params = make_params(cls, {"train": str(write_config(tmp_path, tiny_checkpoint, freeze=True))}, "test")
    with pytest.raises(UserError, match="must be prepared"):
        cls(load_model(tiny_checkpoint), params)
    assert not (tmp_path / "run").exists()  # nothing trained by the constructor


def test_overrides_without_a_training_config_are_refused():
    from adadiff_bench.errors import UserError
    from adadiff_bench.methods import get_method, make_params
    with pytest.raises(UserError, match="need `train`"):
        make_params(get_method("adadiff"), {"estimator": "probe"}, "test")
    with pytest.raises(UserError, match="unknown estimator 'prob'"):
        make_params(get_method("adadiff"), {"train": str(REPO / "configs" / "adadiff_digits_frozen.toml"),
                                            "estimator": "prob"}, "test")


def test_a_run_trains_on_demand_under_its_results_folder_whatever_the_cwd(tmp_path, tiny_checkpoint, monkeypatch):
    import json

    from conftest import write_run_config
    train_config = write_config(tmp_path, tiny_checkpoint, freeze=True)
    config = write_run_config(tmp_path, tiny_checkpoint, timing="enabled = false", extra_methods=(
        f'[[methods]]\nname = "adadiff"\ntrain = "{train_config}"\nestimator = "probe"\nthreshold = 0.5\n'),
        sampling='solver = "ddim"\nnum_steps = 2\nnum_samples = 4\nbatch_size = 4',
        metrics='inception = "off"\nkid_subset_size = 4\nisc_splits = 2')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    trained = list((tmp_path / "results" / ".adadiff_cache").glob("probe-official-frozen-*/weights.pt"))
    assert len(trained) == 1 and load_adadiff(trained[0]).config.estimator == "probe"
    assert list(elsewhere.iterdir()) == []  # nothing under the working directory
    info = json.loads((tmp_path / "results" / "tiny" / "run.json").read_text())
    assert str(trained[0]) in info["method_checkpoints"]  # the prepared checkpoint is recorded


def test_full_with_a_training_config_runs_the_backbone_the_adadiff_cells_fine_tune(tmp_path, tiny_checkpoint):
    """`full` with `train` shares the adadiff cells' on-demand network (trained once), and its rows fall in that
    fine-tuned backbone's group, apart from the run's base model."""
    import pandas as pd

    from conftest import write_run_config
    from adadiff_bench.report.groups import BACKBONE_HASH
    train_config = write_config(tmp_path, tiny_checkpoint, freeze=False)
    config = write_run_config(tmp_path, tiny_checkpoint, timing="enabled = false", extra_methods=(
        f'[[methods]]\nname = "adadiff"\ntrain = "{train_config}"\nthreshold = 0.5\n\n'
        f'[[methods]]\nname = "full"\ntrain = "{train_config}"\n'),
        sampling='solver = "ddim"\nnum_steps = 2\nnum_samples = 4\nbatch_size = 4',
        metrics='inception = "off"\nkid_subset_size = 4\nisc_splits = 2')
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    assert len(list((tmp_path / "results" / ".adadiff_cache").glob("official-official-fine-tuned-*/weights.pt"))) == 1
    rows = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    fine_tuned_full = rows[(rows["method"] == "full") & rows["params"].str.contains("train")]
    base_full = rows[(rows["method"] == "full") & ~rows["params"].str.contains("train")]
    adadiff = rows[rows["method"] == "adadiff"]
    assert len(fine_tuned_full) == 1 and len(base_full) >= 1
    assert set(fine_tuned_full[BACKBONE_HASH]) == set(adadiff[BACKBONE_HASH])
    assert not set(fine_tuned_full[BACKBONE_HASH]) & set(base_full[BACKBONE_HASH])


def test_a_run_on_an_adadiff_checkpoint_shares_its_backbone_with_every_method(tmp_path, tiny_checkpoint):
    """The run's model may be a fine-tuned AdaDiff network: its backbone, so caches and AdaDiff compare on one
    backbone (one group); a file that holds no U-ViT is still refused in one line."""
    import pandas as pd

    from conftest import write_run_config
    from adadiff_bench.backbone_id import backbone_hash
    from adadiff_bench.report.groups import BACKBONE_HASH
    assert main(["train", "--config", str(write_config(tmp_path, tiny_checkpoint, freeze=False)), "--no-progress"]) == 0
    network = tmp_path / "out.pt"
    assert torch.equal(load_model(network).state_dict()["decoder_pred.weight"],
                       load_adadiff(network).backbone.state_dict()["decoder_pred.weight"].float())
    config = write_run_config(tmp_path, network, timing="enabled = false", extra_methods=(
        f'[[methods]]\nname = "adadiff"\ncheckpoint = "{network}"\nthreshold = 0.5\n\n'
        '[[methods]]\nname = "deepcache"\ninterval = 2\n'),
        sampling='solver = "ddim"\nnum_steps = 2\nnum_samples = 4\nbatch_size = 4',
        metrics='inception = "off"\nkid_subset_size = 4\nisc_splits = 2')
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    rows = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    assert set(rows["method"]) == {"full", "adadiff", "deepcache"} and rows[BACKBONE_HASH].nunique() == 1
    assert rows[BACKBONE_HASH].iloc[0] != backbone_hash(load_model(tiny_checkpoint))  # fine-tuned, not the base


def test_estimator_lr_trains_fresh_estimators_at_their_own_rate(tmp_path, tiny_checkpoint):
    """`estimator_lr`: one optimiser group for the backbone at [train] lr, one for the fresh estimators at theirs.
    With a vanishing backbone lr the backbone stays put while the estimators move."""
    from adadiff_bench.training import load_train_config, parameter_groups, training_task
    config = write_config(tmp_path, tiny_checkpoint, freeze=False)
    config.write_text(with_keys(config.read_text(), estimator_lr=0.01, lr=1e-9))
    loaded = load_train_config(config)
    task = training_task(loaded, torch.linspace(0.999, 0.001, 1000))
    groups = parameter_groups(task, loaded.train.lr)
    assert [group["base_lr"] for group in groups] == [1e-9, 0.01]
    assert sum(len(group["params"]) for group in groups) == sum(1 for _ in task.model.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in task.model.estimator.parameters()}

    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    base = load_model(tiny_checkpoint)
    trained = load_adadiff(tmp_path / "run" / "ema.pt")
    for name, value in base.state_dict().items():
        assert torch.allclose(trained.backbone.state_dict()[name], value, atol=1e-6), name
    from adadiff_bench.methods.adadiff import AdaDiffConfig, AdaDiffNetwork
    torch.manual_seed(0)
    initial = AdaDiffNetwork(load_model(tiny_checkpoint), AdaDiffConfig("official", "shared"))
    moved = max((trained.estimator.state_dict()[n] - v).abs().max().item()
                for n, v in initial.estimator.state_dict().items())
    assert moved > 1e-3
