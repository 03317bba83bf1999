"""Configs refuse bad input with one clear line; data loaders read digits, image folders and npz files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adadiff_bench.config import DataConfig, RunConfig, load_run_config
from adadiff_bench.data import check_matches_model, load_dataset, to_model_range, to_uint8
from adadiff_bench.errors import UserError
from adadiff_bench.training import load_train_config
from conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    assert load_run_config(REPO / "configs" / "demo.toml").name == "demo"
    assert load_run_config(REPO / "configs" / "user_data_example.toml").data.name == "npz"
    train = load_train_config(REPO / "configs" / "train_digits.toml")
    assert (train.model.depth, train.model.embed_dim, train.model.patch_size) == (12, 128, 2)
    assert train.task is None and train.task_config is None  # a U-ViT from scratch


# each shipped training config with a method's table, and the TrainConfig class that table becomes
SHIPPED_TRAINING = {"adadiff_digits_frozen": "adadiff", "adadiff_digits_finetuned": "adadiff",
                    "berxit_digits": "berxit", "ase_digits": "ase", "l2c_digits": "l2c",
                    "duodiff_shallow_digits": None, "adadiff_ablation_base": "adadiff",
                    "adadiff_digits_dit": "adadiff", "ase_digits_dit": "ase", "berxit_digits_dit": "berxit",
                    "l2c_digits_dit": "l2c", "duodiff_shallow_digits_dit": None, "train_digits_dit": None}


@pytest.mark.parametrize("name", sorted(SHIPPED_TRAINING))
def test_shipped_training_configs_load_with_their_methods_table(name):
    from adadiff_bench.methods import get_method
    config = load_train_config(REPO / "configs" / f"{name}.toml")
    assert config.task == SHIPPED_TRAINING[name]
    if config.task is not None:
        assert type(config.task_config) is get_method(config.task).TrainConfig


@pytest.mark.parametrize("text, message", [
    ("nam = 'x'", r"unknown key 'nam' \(did you mean 'name'\?\)"),
    ("[sampling]\nnum_step = 3", r"unknown key 'num_step' \(did you mean 'num_steps'"),
    ("[sampling]\nnum_steps = 'ten'", r"num_steps: expected an integer, got 'ten'"),
    ("[sampling]\nnum_steps = -5", r"num_steps must be > 0 \(got -5\)"),
    ("[sampling]\nsolver = 'ddmi'", r"unknown solver 'ddmi' \(did you mean .*'ddim'\?\); valid: ddpm, ddpm-learned, ddim"),
    ("[sampling]\nnum_samples = true", r"num_samples: expected an integer, got True"),
    ("[timing]\nrepeats = 1", r"repeats must be >= 3"),
    ("[metrics]\ninception = 'maybe'", r"inception must be one of auto, require, off"),
    ("[data]\nname = 'cifar'", r"unknown data set 'cifar'"),
    ("[data]\nname = 'folder'", r"needs `path`"),
    ("name = 'a/b'", r"must be a plain folder name"),
    ("[[methods]]\nsolver = 'ddim'", r"needs `name`"),
    ("[[methods]]\nname = 'full'\nnum_steps = 'x'", r"num_steps: expected an integer or a list of an integer"),
    ("x = [", r"not valid TOML"),
])
def test_bad_run_config_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as info:
        load_run_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_run_config(tmp_path / "nope.toml")


def test_ints_are_accepted_for_floats(tmp_path):
    config = load_train_config(write(tmp_path, "[train]\nlr = 1\n[model]\nmlp_ratio = 2"))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_defaults_come_from_the_dataclasses(tmp_path):
    assert load_run_config(write(tmp_path, "")) == RunConfig()


def test_digits_dataset_is_the_sklearn_set_scaled_to_uint8():
    from sklearn.datasets import load_digits
    data = load_dataset(DataConfig())
    raw = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert torch.equal(data.labels, torch.from_numpy(raw.target))
    # 0..16 maps onto [-1, 1] as v / 8 - 1, up to uint8 rounding
    model_range = to_model_range(data.images)[:, 0].double().numpy()
    assert np.abs(model_range - (raw.images / 8 - 1)).max() <= 0.5 / 127.5 + 1e-6
    assert len(data.sha256) == 64


def test_uint8_round_trip_is_exact():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_range(images)), images)


def test_folder_and_npz_loaders_agree(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "set.npz", images)
    from_folder = load_dataset(DataConfig(name="folder", path=str(folder)))
    from_npz = load_dataset(DataConfig(name="npz", path=str(tmp_path / "set.npz")))
    assert torch.equal(from_folder.images, from_npz.images)
    assert from_folder.images.shape == (5, 3, 8, 8)
    assert torch.equal(from_npz.images.permute(0, 2, 3, 1), torch.from_numpy(images))


def test_grayscale_pngs_load_with_one_channel(tmp_path):
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = load_dataset(DataConfig(name="folder", path=str(tmp_path)))
    assert data.images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "holds no .png/.jpg/.jpeg files"),
    (lambda p: None, "does not exist"),
])
def test_bad_image_folder(tmp_path, make, message):
    folder = tmp_path / "empty"
    make(folder)
    with pytest.raises(UserError, match=message):
        load_dataset(DataConfig(name="folder", path=str(folder)))


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 8, 8, 1), dtype=np.float32), "dtype float32, expected uint8"),
    (np.zeros((4, 8, 8, 5), dtype=np.uint8), r"expected N x H x W x C with C = 1 or 3"),
    (np.zeros((0, 8, 8, 1), dtype=np.uint8), "holds no images"),
])
def test_bad_npz(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", array)
    with pytest.raises(UserError, match=message):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "bad.npz")))


def test_npz_without_arr_0(tmp_path):
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(UserError, match="no array named arr_0"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "named.npz")))


def test_data_of_the_wrong_shape_for_the_model():
    data = load_dataset(DataConfig())
    with pytest.raises(UserError, match=r"1x8x8 \(CxHxW\) but the model expects 3x32x32"):
        check_matches_model(data, img_size=32, in_chans=3)


# ---- training configs: at most one table of a method that trains, dispatched through the registry -------

TRAIN = '[train]\nsteps = 1\nthreads = 1\n'


@pytest.mark.parametrize("text, message", [
    ('[adadiff]\n[ase]\n' + TRAIN, r"at most one method's table \(found \[adadiff\], \[ase\]\); split it"),
    ('[adadif]\n' + TRAIN, r"unknown table or key 'adadif' \(did you mean 'adadiff'\?\); valid: data, model, "
                           r"dit, train and one method's table: .*adadiff"),
    ('[trian]\nsteps = 1\n', r"unknown table or key 'trian' \(did you mean 'train'\?\)"),
    # deepcache is a method, but it does not train: it has no table
    ('[deepcache]\ninterval = 2\n' + TRAIN, r"method 'deepcache' does not train \(it has no \[deepcache\] table\); "
                                            r"methods that train: adadiff, ase, berxit, l2c$"),
    ('[ase]\nstrength = [0.5]\n', r"\[ase\]: unknown key 'strength' \(did you mean 'strengths'\?\)"),
])
def test_bad_training_config_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as info:
        load_train_config(write(tmp_path, text))
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path / "c.toml"))


def test_trainable_methods_are_those_with_a_training_table():
    from adadiff_bench.methods import get_method, trainable_methods
    assert trainable_methods() == ["adadiff", "ase", "berxit", "l2c"]
    assert get_method("deepcache").TrainConfig is None
    with pytest.raises(NotImplementedError, match="does not train"):
        get_method("deepcache").training_task(None, None)


def test_a_registered_methods_table_is_trained_through_the_registry(tmp_path):
    """A method registered here, with a TrainConfig and a training_task, is trained by `training.train` from a TOML
    holding its table: load_train_config reads the table into its TrainConfig, train() runs its task."""
    from dataclasses import dataclass

    from adadiff_bench.methods import Method, register_method, trainable_methods
    from adadiff_bench.methods.registry import _REGISTRY
    from adadiff_bench.training import Task, train

    @dataclass
    class ScaleTrainConfig:
        target: float = 1.0

        def validate(self, where):
            if self.target <= 0:
                raise UserError(f"{where}: target must be > 0")

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(()))

    seen = []

    class TrainsAScale(Method):
        """Test-only: learns one number, scale -> target, and exports it."""
        name = "test-trains-a-scale"
        TrainConfig = ScaleTrainConfig

        @classmethod
        def training_task(cls, config, alpha_bar):
            seen.append((config.task, config.task_config, len(alpha_bar)))
            module = Scale()
            exported = tmp_path / "exported.pt"

            def export(path, ema, meta, half):
                torch.save({"scale": float(ema.scale), "meta": meta}, path)
                exported.write_text(str(path))
            return Task(module, lambda x0, y, g: (module.scale - config.task_config.target) ** 2 + 0 * x0.mean(),
                        export, config.model)

    register_method(TrainsAScale)
    try:
        assert "test-trains-a-scale" in trainable_methods()
        text = (f'[test-trains-a-scale]\ntarget = 2.0\n\n[train]\nsteps = 20\nbatch_size = 4\nlr = 0.2\n'
                f'warmup_steps = 0\nema_decay = 0.0\nweight_decay = 0.0\nthreads = 1\nout_dir = "{tmp_path / "out"}"\n')
        config = load_train_config(write(tmp_path, text))
        assert config.task == "test-trains-a-scale" and config.task_config == ScaleTrainConfig(target=2.0)
        path = train(config, progress=False)
        assert seen == [("test-trains-a-scale", ScaleTrainConfig(target=2.0), 1000)]
        saved = torch.load(path, weights_only=True)
        assert path == tmp_path / "out" / "ema.pt" and (tmp_path / "exported.pt").read_text() == str(path)
        assert 1.0 < saved["scale"] < 3.0  # moved from 0 toward the target
        assert saved["meta"]["train_config"]["task"] == "test-trains-a-scale"
        assert saved["meta"]["train_config"]["task_config"] == {"target": 2.0}
        with pytest.raises(UserError, match=r"\[test-trains-a-scale\]: target must be > 0"):
            load_train_config(write(tmp_path, "[test-trains-a-scale]\ntarget = -1.0\n"))
    finally:
        _REGISTRY.pop(TrainsAScale.name, None)
    with pytest.raises(UserError, match="unknown table or key 'test-trains-a-scale'"):
        load_train_config(write(tmp_path, text))
