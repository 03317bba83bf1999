"""No file the suite reads, or that a library reads on its behalf, can run code (docs/security.md).

Every test plants a pickle whose unpickling creates a marker file (`Planted`) where the suite or a
library would look, runs the suite, and checks that the marker was never created; where the file is
a cache, the numbers must still be those of a direct torch-fidelity call.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.utils as fidelity_utils

from adadiff_bench.checkpoints import load_model
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import Dataset, load_dataset
from adadiff_bench.errors import UserError
from adadiff_bench.metrics import cleanfid_backend, extractors, quality
from adadiff_bench.metrics.classifier import ASSET_PATH, EXTRACTOR_NAME, load_classifier
from adadiff_bench.metrics.cleanfid_backend import CLEANFID_MODEL_FILE, cleanfid_inception_features
from adadiff_bench.metrics.extractors import INCEPTION, INCEPTION_WEIGHTS_FILE, weights_only_loads
from adadiff_bench.metrics.reference_cache import CHECKSUM, payload_sha256
from adadiff_bench.results import read_npz

METRICS = MetricsConfig(inception="off", kid_subset_size=20, isc_splits=4)
COLUMNS = {  # results column -> torch-fidelity's key
    "fid_digits_cnn": torch_fidelity.KEY_METRIC_FID, "is_digits_cnn_mean": torch_fidelity.KEY_METRIC_ISC_MEAN,
    "is_digits_cnn_std": torch_fidelity.KEY_METRIC_ISC_STD, "kid_digits_cnn_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
    "kid_digits_cnn_std": torch_fidelity.KEY_METRIC_KID_STD, "precision_digits_cnn": torch_fidelity.KEY_METRIC_PRECISION,
    "recall_digits_cnn": torch_fidelity.KEY_METRIC_RECALL}


class Planted:
    """An object whose unpickling creates the file `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path, kind: str) -> None:
    """Write a pickle that creates `marker` at `path`: as torch.save writes it, as a bare pickle, or inside an .npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch.save":
        torch.save(Planted(marker), path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Planted(marker)))
    else:  # an .npz whose arrays are pickled objects, under the names the cache expects
        with open(path, "wb") as handle:
            np.savez(handle, features=np.array([Planted(marker)], dtype=object),
                     mu=np.array([Planted(marker)], dtype=object), sigma=np.array([Planted(marker)], dtype=object),
                     **{CHECKSUM: np.array([Planted(marker)], dtype=object)})


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


@pytest.fixture
def images(digits):
    """40 shifted digits as samples, 120 others as the reference."""
    reference = Dataset(digits.name, digits.images[200:320], None, "1" * 64)
    return digits.images[:40].roll(1, dims=3).contiguous(), reference


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME in an empty folder (torch-fidelity's default cache root and torch hub's live under it)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home"


def direct_call(samples, reference) -> dict[str, float]:
    """The same metrics by one plain torch-fidelity call (its cache off: nothing read from disk)."""
    kwargs = quality.fidelity_kwargs(EXTRACTOR_NAME, str(ASSET_PATH), samples, reference, METRICS, "unused")
    theirs = torch_fidelity.calculate_metrics(**kwargs)
    return {column: theirs[key] for column, key in COLUMNS.items()}


# ---- the reference cache ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["torch.save", "pickle", "npz of objects"])
def test_pickles_planted_at_every_cache_path_never_run(kind, images, tmp_path, torch_home):
    samples, reference = images
    cache, marker = tmp_path / "cache", tmp_path / "ran"
    first = quality.compute_quality(samples, reference, METRICS, cache)
    written = sorted(cache.glob("*.npz"))
    assert {p.name.split("-digits-cnn-")[-1] for p in written} == {  # per layer: features and logits
        "features-features.npz", "features-logits_unbiased.npz", "stat-fid-features.npz"}
    for path in written:
        plant(path, marker, kind)  # the suite's own file names
        old_name = path.with_suffix(".pt").name  # where torch-fidelity's cache reads with weights_only=False
        plant(cache / old_name, marker, "torch.save")
        plant(torch_home / "fidelity_cache" / old_name, marker, "torch.save")
    with pytest.warns(UserWarning, match="is damaged .*; recomputing it") as warned:
        again = quality.compute_quality(samples, reference, METRICS, cache)
    assert not marker.exists()
    assert len(warned) == len(written)
    assert again == first and {k: first[k] for k in COLUMNS} == direct_call(samples, reference)
    for path in written:  # rewritten as plain arrays
        assert CHECKSUM in read_npz(path)
    # the planted pickles were live: torch-fidelity's own cache reader runs them
    fidelity_utils.cache_lookup_one_recompute_on_miss(written[0].with_suffix("").name, lambda: None,
                                                      cache_root=str(cache), cache=True, verbose=False)
    assert marker.exists()


def damage(path: Path, how: str) -> None:
    """Spoil a cache file: cut it, empty it, change an array under the old checksum, add an array, make it a folder."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "folder":
        path.unlink()
        (path / "inner").mkdir(parents=True)
    else:
        arrays = read_npz(path)
        stored = arrays.pop(CHECKSUM)
        name = sorted(arrays)[0]
        arrays[name] = arrays[name] + 1 if how == "edited" else arrays[name]
        extra = {"extra": np.zeros(3)} if how == "extra array" else {}
        with open(path, "wb") as handle:
            np.savez(handle, **arrays, **extra, **{CHECKSUM: stored})


@pytest.mark.parametrize("how", ["truncated", "empty", "edited", "extra array"])
def test_a_damaged_cache_file_is_recomputed_with_one_warning(how, images, tmp_path):
    samples, reference = images
    cache = tmp_path / "cache"
    first = quality.compute_quality(samples, reference, METRICS, cache)
    (statistics,) = cache.glob("*stat-fid*.npz")
    damage(statistics, how)
    with pytest.warns(UserWarning) as warned:
        again = quality.compute_quality(samples, reference, METRICS, cache)
    assert [str(w.message).count("\n") for w in warned] == [0]
    assert str(statistics) in str(warned[0].message) and "recomputing it" in str(warned[0].message)
    assert again == first
    arrays = read_npz(statistics)
    assert arrays.pop(CHECKSUM) == payload_sha256(arrays)  # written back whole


def test_a_cache_path_that_is_a_folder_is_one_line(images, tmp_path):
    samples, reference = images
    cache = tmp_path / "cache"
    quality.compute_quality(samples, reference, METRICS, cache)
    (statistics,) = cache.glob("*stat-fid*.npz")
    damage(statistics, "folder")
    with pytest.warns(UserWarning, match="recomputing it"), pytest.raises(UserError, match="cannot write") as error:
        quality.compute_quality(samples, reference, METRICS, cache)
    assert "\n" not in str(error.value)


def test_clean_fid_reference_cache_never_unpickles(tmp_path, digits, monkeypatch):
    from test_cleanfid_backend import save_stand_in
    model_dir = save_stand_in(tmp_path / "model")

    def mean_distance(a, b):  # a cheap stand-in for the 2048-d Frechet distance
        return float(np.abs(a.mean(axis=0) - b.mean(axis=0)).sum())

    monkeypatch.setattr(extractors, "cleanfid_frechet_distance", mean_distance)
    config = MetricsConfig(fid_backend="clean-fid", cleanfid_model=str(model_dir / CLEANFID_MODEL_FILE))
    samples, reference = digits.images[:6].roll(1, dims=3), Dataset("digits", digits.images[6:14], None, "0" * 64)
    space = quality.FeatureSpace(extractors.get_extractor(INCEPTION), samples, reference, config, tmp_path / "cache",
                                 {"input2_cache_name": "key"}, None)
    first = space.cleanfid_fid()
    (cached,) = (tmp_path / "cache").glob("key-cleanfid-*.npz")
    marker = tmp_path / "ran"
    plant(cached, marker, "npz of objects")
    plant(cached.with_suffix(".npy"), marker, "pickle")  # the name the cache had before
    with pytest.warns(UserWarning, match="recomputing it"):
        again = space.cleanfid_fid()
    assert not marker.exists() and again == first
    expected = mean_distance(cleanfid_inception_features(samples, model_dir),
                             cleanfid_inception_features(reference.images, model_dir))
    assert first == pytest.approx(expected, rel=1e-6)


# ---- Inception weights (torch-fidelity loads them with weights_only=False) ----------------------------

@pytest.mark.parametrize("where", ["configured", "torch hub"])
def test_inception_weights_holding_a_pickle_are_refused_before_loading(where, digits, tmp_path, torch_home):
    marker = tmp_path / "ran"
    path = tmp_path / "inception.pth" if where == "configured" else \
        torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    plant(path, marker, "torch.save")
    config = MetricsConfig(inception="require", inception_weights=str(path) if where == "configured" else None)
    with pytest.raises(UserError, match="is not a file of plain tensors") as error:
        quality.compute_quality(digits.images[:8], digits, config, tmp_path / "cache", extractors=(INCEPTION,))
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_a_non_tensor_payload_is_refused(digits, tmp_path):
    path = tmp_path / "inception.pth"
    torch.save({"weights": [1, 2, 3]}, path)  # loads with weights_only, but is no state dict
    with pytest.raises(UserError, match="not a state dict of tensors"):
        extractors.check_inception_weights(str(path))


def test_network_weights_load_weights_only_even_when_torch_fidelity_asks_otherwise(digits, tmp_path, monkeypatch):
    """Past the check too (a file swapped after it): torch-fidelity's own torch.load is forced to weights_only."""
    marker = tmp_path / "ran"
    plant(tmp_path / "inception.pth", marker, "torch.save")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # even against a user's opposite setting
    images, config = digits.images[:4].expand(-1, 3, -1, -1), MetricsConfig(kid_subset_size=4, isc_splits=2)
    kwargs = quality.fidelity_kwargs(INCEPTION, str(tmp_path / "inception.pth"), images, digits, config, tmp_path)
    kwargs.update(fid=True)
    with pytest.raises(pickle.UnpicklingError):
        quality.extract_features(kwargs, tmp_path / "cache")
    assert not marker.exists() and os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    torch.load(tmp_path / "inception.pth", weights_only=False)  # the control: outside, the pickle runs
    assert marker.exists()


def test_weights_only_loads_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    with weights_only_loads():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "0"


# ---- clean-fid's TorchScript model in its shared default folder (/tmp) -----------------------------

def shared_folder_with_model(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / CLEANFID_MODEL_FILE).write_bytes(b"stand-in: only its owner and mode are looked at")
    os.chmod(folder / CLEANFID_MODEL_FILE, 0o644)
    monkeypatch.setattr(cleanfid_backend, "cleanfid_default_model_dir", lambda: folder)
    return folder / CLEANFID_MODEL_FILE


def test_clean_fid_model_of_ones_own_in_the_default_folder_is_used(tmp_path, monkeypatch):
    model = shared_folder_with_model(tmp_path, monkeypatch)
    assert cleanfid_backend.resolve_cleanfid_model(None) == model.parent


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "symbolic link", "another owner"])
def test_clean_fid_model_others_could_have_planted_is_refused(how, tmp_path, monkeypatch):
    model = shared_folder_with_model(tmp_path, monkeypatch)
    if how == "another owner":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(model, 4242, -1)
    elif how == "symbolic link":
        real = tmp_path / "elsewhere.pt"
        model.rename(real)
        model.symlink_to(real)
    else:
        os.chmod(model, 0o664 if how == "group-writable" else 0o646)
    with pytest.raises(UserError, match="set \\[metrics\\] cleanfid_model = PATH") as error:
        cleanfid_backend.resolve_cleanfid_model(None)  # (what the run's checks call before any work)
    assert "\n" not in str(error.value) and str(model) in str(error.value)
    assert cleanfid_backend.resolve_cleanfid_model(str(model)) == model.parent  # configured: the user's own choice


# ---- the suite's own files: checkpoints and archives ---------------------------------------------

def test_a_checkpoint_holding_a_pickle_never_runs(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "model.pt", marker, "torch.save")
    with pytest.raises(UserError, match="corrupt or not a PyTorch file"):
        load_model(tmp_path / "model.pt")
    assert not marker.exists()


def test_the_digits_classifier_loads_weights_only(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "digits_cnn.pt", marker, "torch.save")
    with pytest.raises(pickle.UnpicklingError):
        load_classifier(tmp_path / "digits_cnn.pt")
    assert not marker.exists()


def test_an_archive_holding_pickled_objects_never_runs(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "samples.npz", marker, "npz of objects")
    with pytest.raises(UserError, match="pickled objects"):
        read_npz(tmp_path / "samples.npz")
    with pytest.raises(Exception):  # a data set .npz: refused (its message is the data loader's)
        load_dataset(DataConfig("npz", str(tmp_path / "samples.npz")))
    assert not marker.exists()
