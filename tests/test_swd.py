"""The SWD metric (sliced Wasserstein distance over Laplacian-pyramid patches): against a brute-force version
written plainly here, its pyramid against exact reconstruction, its behaviour on identical and shifted sets,
and its place in the metric registry, the runs and the leaderboard."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adadiff_bench.config import MetricsConfig
from adadiff_bench.data import Dataset
from adadiff_bench.errors import UserError
from adadiff_bench.metrics.quality import check_quality_inputs, compute_quality
from adadiff_bench.metrics.specs import parse_column
from adadiff_bench.metrics.swd import (NEIGHBOURHOOD, PATCHES_PER_IMAGE, laplacian_pyramid, patch_positions,
                                       pyramid_levels, reconstruct, sliced_wasserstein, swd_per_level,
                                       sliced_wasserstein_patches)


def blobs(count: int, channels: int, size: int, seed: int, brightness: float = 0.0, noise: float = 0.0):
    """uint8 images of a few soft random blobs (a distribution with structure at several scales)."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(size, dtype=torch.float64)
    centres = torch.rand(count, 3, 2, generator=generator, dtype=torch.float64) * size
    widths = 1.5 + 3 * torch.rand(count, 3, 1, 1, generator=generator, dtype=torch.float64)
    colours = torch.rand(count, 3, channels, generator=generator, dtype=torch.float64)
    distance = (grid.view(1, 1, size, 1) - centres[..., 0, None, None]) ** 2 + \
               (grid.view(1, 1, 1, size) - centres[..., 1, None, None]) ** 2
    bumps = torch.exp(-distance / (2 * widths ** 2))                                  # count x 3 x H x W
    images = 200 * torch.einsum("nbhw,nbc->nchw", bumps, colours) + brightness
    images = images + noise * torch.randn(images.shape, generator=generator, dtype=torch.float64)
    return images.round().clamp(0, 255).to(torch.uint8)


def brute_force_swd(samples: torch.Tensor, reference: torch.Tensor, seed: int, projections: int) -> float:
    """The metric written out plainly: per level, loops over images and patches, the reference's channel mean
    and std, then per direction the exact 1-D Wasserstein-1 distance of equal-size sets by sorting."""
    levels = pyramid_levels(*samples.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    sample_pyramid = laplacian_pyramid(samples.double(), levels)
    reference_pyramid = laplacian_pyramid(reference.double(), levels)
    per_level = []
    for index in range(levels):
        sets = []
        for level in (sample_pyramid[index], reference_pyramid[index]):
            rows, cols = patch_positions(len(level), level.shape[2], level.shape[3], seed + index)
            sets.append(np.stack([level[i, :, r:r + NEIGHBOURHOOD, c:c + NEIGHBOURHOOD].numpy()
                                  for i in range(len(level)) for r, c in zip(rows[i].tolist(), cols[i].tolist())]))
        source, target = sets
        mean = target.mean(axis=(0, 2, 3), keepdims=True)
        std = target.std(axis=(0, 2, 3), ddof=1, keepdims=True)
        source = ((source - mean) / std).reshape(len(source), -1)
        target = ((target - mean) / std).reshape(len(target), -1)
        directions = torch.randn(source.shape[1], projections, generator=generator, dtype=torch.float64)
        directions = (directions / directions.norm(dim=0, keepdim=True)).numpy()
        distances = [np.abs(np.sort(source @ d) - np.sort(target @ d)).mean() for d in directions.T]
        per_level.append(float(np.mean(distances)))
    return float(np.mean(per_level))


def test_pot_sliced_distance_equals_sorting_per_direction():
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(300, 20, generator=generator)
    target = torch.randn(300, 20, generator=generator) * 1.5 + 0.3
    directions = torch.randn(20, 150, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    by_sorting = np.mean([np.abs(np.sort(source.double().numpy() @ d) - np.sort(target.double().numpy() @ d)).mean()
                          for d in directions.numpy().T])
    assert sliced_wasserstein(source, target, directions) == pytest.approx(by_sorting, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (2, 15, 13), (3, 64, 48)])
def test_laplacian_pyramid_reconstructs_the_image(shape):
    images = blobs(4, 3, max(shape[1:]), seed=2, brightness=40).double()[:, :shape[0], :shape[1], :shape[2]]
    pyramid = laplacian_pyramid(images, max(pyramid_levels(*shape[1:]), 2))
    assert len(pyramid) >= 2 and pyramid[-1].shape[-1] < shape[-1]
    assert torch.allclose(reconstruct(pyramid), images, rtol=0, atol=1e-10)
    assert pyramid[0].abs().mean() < images.abs().mean() / 4  # a band-pass level, not a copy of the image


@pytest.mark.parametrize("size, levels", [(8, 1), (16, 2), (32, 2), (64, 3), (1024, 7), (7, 0)])
def test_pyramid_depth(size, levels):
    assert pyramid_levels(size, size) == levels


@pytest.mark.parametrize("channels, size", [(3, 16), (1, 8)])
def test_metric_equals_brute_force(channels, size):
    samples, reference = blobs(24, channels, size, seed=3, noise=8), blobs(24, channels, size, seed=4)
    assert sliced_wasserstein_patches(samples, reference, seed=5, projections=96) == \
        pytest.approx(brute_force_swd(samples, reference, seed=5, projections=96), rel=1e-4)


def test_identical_sets_are_at_zero_and_fresh_draws_close():
    reference = blobs(48, 3, 16, seed=6)
    assert sliced_wasserstein_patches(reference.clone(), reference, projections=64) == pytest.approx(0.0, abs=1e-7)
    same_distribution = sliced_wasserstein_patches(blobs(48, 3, 16, seed=7), reference, projections=128)
    other = sliced_wasserstein_patches(blobs(48, 3, 16, seed=7, noise=30), reference, projections=128)
    assert 0 < same_distribution < other / 3


@pytest.mark.parametrize("shift", ["brightness", "noise"])
def test_a_growing_shift_grows_the_distance(shift):
    reference = blobs(32, 3, 16, seed=8)  # the same base images, shifted further and further from the reference
    distances = [sliced_wasserstein_patches(blobs(32, 3, 16, seed=8, **{shift: amount}), reference, projections=128)
                 for amount in (0, 5, 10, 20, 40)]
    assert distances[0] == pytest.approx(0.0, abs=1e-7)
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_projections_come_from_their_own_seed():
    samples, reference = blobs(32, 1, 8, seed=10, noise=10), blobs(32, 1, 8, seed=11)
    first = swd_per_level(samples, reference, seed=3, projections=64)
    assert first == swd_per_level(samples, reference, seed=3, projections=64)
    assert first != swd_per_level(samples, reference, seed=4, projections=64) and len(first) == 1
    assert PATCHES_PER_IMAGE == 128


def dataset(images: torch.Tensor) -> Dataset:
    return Dataset("test", images, None, "0" * 64)


@pytest.mark.parametrize("channels, size, extractors", [(3, 16, ()), (1, 8, ("digits-cnn",))])
def test_registered_metric_in_quality(tmp_path, channels, size, extractors):
    samples, reference = blobs(32, channels, size, seed=12, noise=10), blobs(40, channels, size, seed=13)
    config = MetricsConfig(inception="off", kid_subset_size=16, isc_splits=2, swd="on", swd_seed=2,
                           swd_projections=64)
    columns = compute_quality(samples, dataset(reference), config, tmp_path, extractors)
    assert columns["swd_pixels"] == pytest.approx(sliced_wasserstein_patches(samples, reference, 2, 64))
    assert ("fid_digits_cnn" in columns) == bool(extractors)
    parsed = parse_column("swd_pixels")
    assert parsed.metric.name == "swd" and parsed.space == "pixels" and not parsed.quantity.higher_is_better


def test_auto_computes_it_only_where_no_feature_space_reads_the_images(tmp_path):
    config = MetricsConfig(inception="off", kid_subset_size=16, isc_splits=2, swd_projections=32)
    digits = blobs(16, 1, 8, seed=14)
    assert "swd_pixels" not in compute_quality(digits, dataset(digits), config, tmp_path, ("digits-cnn",))
    rgb = blobs(16, 3, 16, seed=15)
    assert set(compute_quality(rgb, dataset(rgb), config, tmp_path, ())) == {"swd_pixels"}
    off = MetricsConfig(inception="off", swd="off")
    assert compute_quality(rgb, dataset(rgb), off, tmp_path, ()) == {}


def test_swd_on_refuses_images_too_small():
    tiny = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    with pytest.raises(UserError, match="at least 8x8"):
        check_quality_inputs(4, dataset(tiny), MetricsConfig(inception="off", swd="on"), ())


def test_leaderboard_shows_the_swd_column(tmp_path):
    from adadiff_bench.report import load_runs
    from adadiff_bench.report.tables import leaderboard, to_markdown
    from test_report_tables import fake_run
    rows = [{"method": "full", "gflops_per_image": 2.0, "swd_pixels": 0.0123},
            {"method": "deepcache", "gflops_per_image": 1.0, "swd_pixels": 0.0456}]
    board = leaderboard(load_runs([fake_run(tmp_path / "r", "r", rows)]).frame, sort_by="swd_pixels")
    assert list(board["method"]) == ["full", "deepcache"]  # lower is better
    markdown = to_markdown(board)
    assert "SWD [pixels] ↓" in markdown and "0.0456" in markdown


def test_without_fid_the_swd_ranks_the_board_marks_its_front_and_fills_the_matched_table(tmp_path):
    """An offline user's own data (no Inception weights, no feature space of theirs): SWD stands in for FID."""
    from adadiff_bench.report import load_runs, write_leaderboard
    from adadiff_bench.report.tables import leaderboard, matched_table
    from test_report_tables import fake_run
    rows = [{"method": "full", "gflops_per_image": 2.0, "swd_pixels": 0.010},
            {"method": "static-exit", "entry": 1, "params": '{"k": 1}', "gflops_per_image": 1.0, "layer_ratio": 0.5, "swd_pixels": 0.050},
            {"method": "static-exit", "entry": 1, "params": '{"k": 2}', "gflops_per_image": 1.5, "layer_ratio": 0.75, "swd_pixels": 0.020},
            {"method": "random-exit", "entry": 2, "gflops_per_image": 1.5, "layer_ratio": 0.75, "swd_pixels": 0.060}]
    run = fake_run(tmp_path / "r", "r", rows)
    board = leaderboard(load_runs([run]).frame).set_index("setting")
    assert board["dswd"].to_dict() == pytest.approx({s: v - 0.010 for s, v in board["swd_pixels"].items()})
    assert board["pareto"].tolist() == [True, True, True, False]  # random-exit: beaten by static-exit k=2
    matched = matched_table(load_runs([run]).frame)
    assert matched.loc[matched["curve"].str.startswith("static-exit"), "swd_pixels at layer ratio 0.6"].item() \
        == pytest.approx(0.050 + (0.6 - 0.5) / 0.25 * (0.020 - 0.050))
    write_leaderboard([run], tmp_path / "out")
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "dSWD vs group's full ↓" in text and "Pareto-optimal in SWD and GFLOPs/image" in text
    assert "No FID was computed: Pareto marks, dSWD" in text and "FID by" not in text


@pytest.mark.parametrize("setting, expected", [
    ('swd = "sometimes"', '[metrics]: swd must be one of auto, on, off (got \'sometimes\')'),
    ("swd_projections = 0", "[metrics]: swd_projections must be > 0 (got 0)"),
    ("swd_seed = -1", "[metrics]: swd_seed: a seed must be in [0, 2^63 - 1] (got -1)"),
])
def test_swd_settings_out_of_range(tmp_path, tiny_checkpoint, capsys, setting, expected):
    from test_errors import METRICS, assert_nothing_written, one_line_error, run_args
    line = one_line_error(run_args(tmp_path, tiny_checkpoint, metrics=METRICS + "\n" + setting), capsys)
    assert expected in line, line
    assert_nothing_written(tmp_path)


def test_a_larger_reference_is_cut_to_a_seeded_subset_of_n_images():
    samples, reference = blobs(16, 3, 16, seed=16, noise=10), blobs(40, 3, 16, seed=17)
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:16].sort().values
    on_subset = swd_per_level(samples, reference[chosen], seed=3, projections=32)
    assert sliced_wasserstein_patches(samples, reference, seed=3, projections=32) == \
        pytest.approx(sum(on_subset) / len(on_subset), rel=1e-12)
    whole = swd_per_level(samples, reference[:16], seed=3, projections=32)  # no larger: used as it is
    assert sliced_wasserstein_patches(samples, reference[:16], seed=3, projections=32) == \
        pytest.approx(sum(whole) / len(whole), rel=1e-12)
