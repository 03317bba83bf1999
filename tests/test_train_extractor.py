"""`adadiff-bench train-extractor`: a feature space trained on a PNG folder written here, a run that computes FID
in it (equal to a closed-form Frechet distance and to torch-fidelity's own call on the same features), and the
refusals: other data, a hostile file, the packaged asset."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
import torch_fidelity
from PIL import Image

from adadiff_bench.checkpoints import build_model, save_checkpoint
from adadiff_bench.cli import main
from adadiff_bench.config import DataConfig, MetricsConfig, UViTConfig
from adadiff_bench.data import load_dataset
from adadiff_bench.metrics.classifier import ASSET_PATH
from adadiff_bench.metrics.extractor_training import extractor_name, load_extractor, read_extractor_file
from adadiff_bench.metrics.extractors import forget_learned_extractors, register_learned_extractor
from adadiff_bench.metrics.quality import ImageTensorDataset, compute_quality
from conftest import write_run_config
from test_security import plant
from test_swd import blobs

RGB16 = UViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2)
STEPS = "30"


def oriented_images(count: int, seed: int) -> np.ndarray:
    """uint8 N x 16 x 16 x 3 blobs over a top-to-bottom ramp (so rotations can be told apart)."""
    ramp = torch.linspace(0, 50, 16).view(1, 1, 16, 1)
    images = (blobs(count, 3, 16, seed=seed).float() * 0.7 + ramp).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def png_folder(folder: Path, count: int = 40, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(oriented_images(count, seed)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(autouse=True, scope="module")
def forget_trained_spaces():
    """The spaces these tests register stay out of the other test files' registry."""
    yield
    forget_learned_extractors()


def train(data: Path, out: Path, capsys, *extra: str) -> list[str]:
    assert main(["train-extractor", "--data", str(data), "--out", str(out), "--steps", STEPS, *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PNG folder and an extractor trained on it (with the time it took and what it printed)."""
    root = tmp_path_factory.mktemp("learned")
    folder = png_folder(root / "png")
    out = root / "extractor.pt"
    started = time.perf_counter()
    code = main(["train-extractor", "--data", str(folder), "--out", str(out), "--steps", STEPS])
    return folder, out, time.perf_counter() - started, code


def test_trains_in_seconds_and_states_its_held_out_score_last(trained, capsys):
    folder, out, seconds, code = trained
    assert code == 0 and seconds < 60
    data = load_dataset(DataConfig("folder", str(folder)))
    saved = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors and values only
    meta = saved["meta"]
    assert meta["name"] == extractor_name(data.sha256) == f"learned-{data.sha256[:12]}"
    assert meta["data_sha256"] == data.sha256 and meta["task"] == "rotation" and meta["heldout_images"] == 8
    assert (meta["channels"], meta["height"], meta["width"]) == (3, 16, 16)
    lines = train(folder, out.with_name("again.pt"), capsys)
    last = re.fullmatch(r"(learned-[0-9a-f]{12}) held-out accuracy ([0-9.]+), loss ([0-9.]+) \(8 held-out images\)",
                        lines[-1])
    assert last and last[1] == meta["name"]
    assert float(last[2]) == pytest.approx(meta["heldout_accuracy"], abs=1e-4)
    assert float(last[3]) == pytest.approx(meta["heldout_loss"], abs=1e-4)
    again = torch.load(out.with_name("again.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], saved["state_dict"][k]) for k in again)  # seeded: the same weights


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The closed form: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))


def test_a_run_reports_fid_in_the_learned_space(trained, tmp_path, capsys):
    folder, extractor, _, _ = trained
    checkpoint = tmp_path / "rgb16.pt"
    torch.manual_seed(0)
    save_checkpoint(checkpoint, build_model(RGB16).eval(), RGB16)
    config = write_run_config(
        tmp_path, checkpoint, data=f'name = "folder"\npath = "{folder}"',
        sampling='solver = "ddim"\nnum_steps = 3\nnum_samples = 24\nbatch_size = 24',
        metrics=f'inception = "off"\nkid_subset_size = 16\nisc_splits = 2\nextractor = "{extractor}"\n'
                'swd = "on"\nswd_projections = 32',
        timing="enabled = false")
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    name = read_extractor_file(extractor)["meta"]["name"]
    column = f"fid_{name.replace('-', '_')}"
    run = tmp_path / "results" / "tiny"
    row = pd.read_csv(run / "results.csv").iloc[0]
    assert {column, f"kid_{name.replace('-', '_')}_mean", "swd_pixels"} <= set(row.index)
    assert f"is_{name.replace('-', '_')}_mean" not in row.index  # rotations give no class logits for IS
    with np.load(run / "cells" / row["cell_id"] / "samples.npz") as archive:
        samples = torch.from_numpy(archive["arr_0"]).permute(0, 3, 1, 2).contiguous()
    reference = load_dataset(DataConfig("folder", str(folder))).images
    network, _ = load_extractor(extractor)
    with torch.no_grad():
        closed_form = frechet_distance(network.features(samples).double().numpy(),
                                       network.features(reference).double().numpy())
    assert row[column] == pytest.approx(closed_form, rel=1e-3)
    direct = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(samples), input2=ImageTensorDataset(reference), feature_extractor=name,
        feature_extractor_weights_path=str(extractor), fid=True, cuda=False, verbose=False, cache=False,
        save_cpu_ram=True)
    assert row[column] == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-6)


def test_a_space_trained_on_labels_gives_the_inception_score(tmp_path, capsys):
    images = oriented_images(30, seed=3)
    labels = np.arange(30) % 3
    images[labels == 1] = 255 - images[labels == 1]  # classes that differ
    np.savez(tmp_path / "labelled.npz", arr_0=images, labels=labels)
    out = tmp_path / "labelled.pt"
    train(tmp_path / "labelled.npz", out, capsys)
    meta = read_extractor_file(out)["meta"]
    assert meta["task"] == "classes" and meta["num_classes"] == 3
    spec = register_learned_extractor(str(out))
    data = load_dataset(DataConfig("npz", str(tmp_path / "labelled.npz")))
    config = MetricsConfig(inception="off", kid_subset_size=10, isc_splits=2, extractor=str(out))
    columns = compute_quality(data.images[:20], data, config, tmp_path / "cache", (spec.name,))
    assert f"is_{spec.column}_mean" in columns and f"fid_{spec.column}" in columns


def one_line(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_with_extractor(tmp_path, folder: Path, extractor: Path) -> list[str]:
    checkpoint = tmp_path / "rgb16.pt"
    save_checkpoint(checkpoint, build_model(RGB16).eval(), RGB16)
    config = write_run_config(tmp_path, checkpoint, data=f'name = "folder"\npath = "{folder}"',
                              metrics=f'inception = "off"\nextractor = "{extractor}"', timing="enabled = false")
    return ["run", "--config", str(config), "--no-progress"]


def test_an_extractor_trained_on_other_data_is_refused(trained, tmp_path, capsys):
    _, extractor, _, _ = trained
    other = png_folder(tmp_path / "other", seed=9)
    line = one_line(run_with_extractor(tmp_path, other, extractor), capsys)
    trained_on = read_extractor_file(extractor)["meta"]["data_sha256"][:12]
    this = load_dataset(DataConfig("folder", str(other))).sha256[:12]
    assert f"was trained on data {trained_on}, but this run's data 'folder' is {this}" in line
    assert "train-extractor" in line and not (tmp_path / "results").exists()


def test_a_hostile_extractor_file_never_runs(tmp_path, capsys):
    folder, marker, extractor = png_folder(tmp_path / "png", count=12), tmp_path / "ran", tmp_path / "hostile.pt"
    plant(extractor, marker, "torch.save")
    line = one_line(run_with_extractor(tmp_path, folder, extractor), capsys)
    assert "is not a file of plain tensors" in line and str(extractor) in line
    assert not marker.exists() and not (tmp_path / "results").exists()
    torch.save({"state_dict": {}, "meta": {"format": "something else"}}, extractor)
    assert "was not written by `adadiff-bench train-extractor`" in one_line(
        run_with_extractor(tmp_path, folder, extractor), capsys)


def test_never_writes_the_packaged_asset_or_over_a_file(trained, tmp_path, capsys):
    folder, extractor, _, _ = trained
    line = one_line(["train-extractor", "--data", str(folder), "--out", str(ASSET_PATH), "--steps", "1"], capsys)
    assert "never writes into the installed package" in line
    line = one_line(["train-extractor", "--data", str(folder), "--out", str(extractor), "--steps", "1"], capsys)
    assert "already exists; pass --overwrite" in line


def test_too_few_images(tmp_path, capsys):
    folder = png_folder(tmp_path / "few", count=6)
    line = one_line(["train-extractor", "--data", str(folder), "--out", str(tmp_path / "x.pt"), "--steps", "1"], capsys)
    assert "holds 6 images; train-extractor needs at least 10" in line and not (tmp_path / "x.pt").exists()
    line = one_line(["train-extractor", "--data", str(folder), "--out", str(tmp_path / "x.pt"), "--steps", "0"], capsys)
    assert "--steps must be >= 1 (got 0)" in line and not (tmp_path / "x.pt").exists()


def test_an_extractor_file_that_is_not_there(tmp_path, capsys):
    folder = png_folder(tmp_path / "png", count=12)
    line = one_line(run_with_extractor(tmp_path, folder, tmp_path / "missing.pt"), capsys)
    assert "feature extractor file" in line and "does not exist; train one with `adadiff-bench train-extractor" in line
    assert not (tmp_path / "results").exists()


def test_every_test_the_catalogue_section_names_exists():
    """docs/errors.md, "Quality metrics on your own data": each named test is defined in the file its row names."""
    repo = Path(__file__).resolve().parents[1]
    section = (repo / "docs" / "errors.md").read_text().split("\n## Quality metrics on your own data", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = re.findall(r"`(test_\w+)` \((tests/\w+\.py)\)", section)
    assert len(rows) == 8
    for name, file in rows:
        assert f"def {name}(" in (repo / file).read_text(), (name, file)
