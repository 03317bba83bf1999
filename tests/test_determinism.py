"""Same config and seed: the same samples, step log and metrics at batch sizes 1, 7 and 64.

Every registered method that does not declare itself batch-dependent draws 64 samples at batch
size 1, 7 (a ragged last batch of one sample) and 64 (a single batch): the float images must be
bit-identical and the step logs equal. A method runs on the tiny U-ViT unless its knobs name a
checkpoint (trained on the shipped digits model), the tiny model fails its checks, or only the
trained model makes its decisions differ between samples; and on a short DDPM schedule (whose
solver steps draw noise from the per-sample generators) unless its knobs refuse it. Quality
metrics of `full` and `adadiff` are compared once, and the settings that declare themselves
batch-dependent must really change with batch size.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_bench.checkpoints import build_model, load_model
from adadiff_bench.config import DataConfig, MetricsConfig
from adadiff_bench.data import load_dataset, to_uint8
from adadiff_bench.diffusion import LEARNED_VARIANCE_SOLVERS, SOLVER_SETTINGS
from adadiff_bench.errors import UserError
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.metrics.quality import compute_quality
from adadiff_bench.methods import available_methods, get_method, make_params
from conftest import DIGITS_BACKBONE, REPO, TINY

NUM_SAMPLES = 64
BATCH_SIZES = (1, 7, 64)
SHORT_SCHEDULE = ("ddpm", 5)
DEFAULT_SCHEDULE = ("dpm-solver++", 25)  # what every method's default knobs accept (the conformance test's)
ADADIFF_KNOBS = {"checkpoint": "checkpoints/adadiff_digits_finetuned.pt", "threshold": 0.3}

# Knobs other than the defaults, which are set for the 13-block digits model and 25 DPM-Solver++
# steps: the thresholds are moved until decisions differ between samples on the short schedule
# (a batch-size bug hides when every sample decides alike), and the depth-bound knobs are scaled
# to the tiny model's 5 blocks and the 5 steps (both Δ-DiT stages run).
TEST_KNOBS = {
    "adadiff": ADADIFF_KNOBS,
    "adaptive-diffusion": {"threshold": 3.0},
    "delta-dit": {"boundary": 3, "num_cached": 2},
    "first-block-cache": {"threshold": 0.7},
    "oracle": {"tau": 0.05},
    "static-exit": {"k": 3},
    "teacache": {"threshold": 4.0},
}
# Methods whose decisions are the same for every sample on the untrained tiny model.
ON_DIGITS = {"adaptive-diffusion", "pabee"}

# Knob settings known to make a method batch-dependent, beyond methods whose class declares it.
BATCH_DEPENDENT_SETTINGS = [("adadiff", {**ADADIFF_KNOBS, "rule": "per-batch"})]

LOG_ARRAYS = ("blocks_run", "exit_point", "embed_calls", "head_calls", "extra_macs")


@pytest.fixture(autouse=True)
def run_from_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # default knobs name shipped files by repository-relative paths


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"tiny": build_model(TINY).eval(), "digits": load_model(DIGITS_BACKBONE)}


@pytest.fixture(scope="module")
def sample(models):
    """`sample(cell, model_name, batch_size)` -> (images, log) of 64 samples, each run done once per module."""
    runs = {}

    def run(cell: Cell, model_name: str, batch_size: int):
        key = (cell, model_name, batch_size)
        if key not in runs:
            runs[key] = generate(cell, models[model_name], NUM_SAMPLES, batch_size)
        return runs[key]
    return run


def names_a_file(params) -> bool:
    return any(isinstance(v, str) and v and Path(v).is_file() for v in dataclasses.asdict(params).values())


def make_cell(name: str, knobs: dict, models) -> tuple[Cell, str]:
    """(cell, model name): the tiny model where the knobs allow it, the short schedule where they accept it."""
    cls = get_method(name)
    params = make_params(cls, knobs, name)
    model_name = "digits" if names_a_file(params) or name in ON_DIGITS else "tiny"
    try:
        cls.check(params, models[model_name], name)
    except UserError:
        model_name = "digits"
        cls.check(params, models[model_name], name)
    solver, num_steps = SHORT_SCHEDULE
    try:
        cls.check_schedule(params, solver, num_steps, name)
    except UserError:
        solver, num_steps = DEFAULT_SCHEDULE
    return Cell(name, tuple(sorted(knobs.items())), solver, num_steps, 0), model_name


def which(rows) -> str:
    rows = [int(r) for r in rows]
    return f"{len(rows)} samples ({', '.join(map(str, rows[:8]))}{', ...' if len(rows) > 8 else ''})"


def differences(a, b) -> list[str]:
    """What differs between two (images, log) results: empty when they are identical."""
    (images_a, log_a), (images_b, log_b) = a, b
    found = []
    if not torch.equal(images_a, images_b):
        diff = (images_a - images_b).abs().flatten(1).amax(1)
        found.append(f"images: max |diff| {diff.max().item():.3g} in {which(torch.nonzero(diff).flatten())}")
    for key in LOG_ARRAYS:
        rows = np.nonzero((getattr(log_a, key) != getattr(log_b, key)).reshape(NUM_SAMPLES, -1).any(1))[0]
        if len(rows):
            found.append(f"step log {key} in {which(rows)}")
    return found


def assert_batch_independent(sample, cell: Cell, model_name: str) -> None:
    reference = sample(cell, model_name, NUM_SAMPLES)
    assert torch.isfinite(reference[0]).all()
    for batch_size in BATCH_SIZES[:-1]:
        found = differences(sample(cell, model_name, batch_size), reference)
        assert not found, f"{cell.cell_id} ({model_name}): batch {batch_size} vs {NUM_SAMPLES}: " + "; ".join(found)


@pytest.mark.parametrize("name", available_methods())
def test_batch_size_changes_nothing(name, models, sample):
    cell, model_name = make_cell(name, TEST_KNOBS.get(name, {}), models)
    if build_method(cell, models[model_name]).batch_dependent:
        pytest.skip(f"{name} declares itself batch-dependent (test_batch_dependent_settings_say_so)")
    assert_batch_independent(sample, cell, model_name)


# (the learned-variance DDPM needs a learned-sigma DiT: test_dit checks it at two batch sizes against diffusers)
@pytest.mark.parametrize("solver", sorted(set(SOLVER_SETTINGS) - {SHORT_SCHEDULE[0]} - set(LEARNED_VARIANCE_SOLVERS)))
def test_other_solvers_change_nothing_either(solver, sample):
    assert_batch_independent(sample, Cell("full", (), solver, 4, 0), "tiny")


def test_metrics_do_not_depend_on_batch_size(sample, tmp_path):
    config = MetricsConfig(inception="off", kid_subset_size=32, isc_splits=2)
    digits = load_dataset(DataConfig())
    for name, knobs in (("full", {}), ("adadiff", ADADIFF_KNOBS)):
        cell = Cell(name, tuple(sorted(knobs.items())), *SHORT_SCHEDULE, 0)
        metrics = [compute_quality(to_uint8(sample(cell, "digits", b)[0]), digits, config, tmp_path)
                   for b in (1, NUM_SAMPLES)]
        assert metrics[0] and all(np.isfinite(v) for v in metrics[0].values())
        assert metrics[0] == metrics[1], name


def test_batch_dependent_settings_say_so(models, sample):
    """The known batch-dependent settings declare it, and at least one declared setting really differs."""
    declared = []
    for name, knobs in [(n, TEST_KNOBS.get(n, {})) for n in available_methods()] + BATCH_DEPENDENT_SETTINGS:
        cell, model_name = make_cell(name, knobs, models)
        if build_method(cell, models[model_name]).batch_dependent:
            declared.append((cell, model_name))
        else:
            assert (name, knobs) not in BATCH_DEPENDENT_SETTINGS, f"{name} {knobs} should declare itself batch-dependent"
    differ = [cell.cell_id for cell, model_name in declared
              if differences(sample(cell, model_name, 1), sample(cell, model_name, NUM_SAMPLES))]
    assert differ, f"no declared batch-dependent setting changes with batch size: {[c.cell_id for c, _ in declared]}"


def test_per_batch_rule_is_per_sample_at_batch_one(sample):
    """AdaDiff's per-batch rule averages over the batch: over a batch of one it is the per-sample rule."""
    per_sample = Cell("adadiff", tuple(sorted(ADADIFF_KNOBS.items())), *SHORT_SCHEDULE, 0)
    per_batch = Cell("adadiff", tuple(sorted({**ADADIFF_KNOBS, "rule": "per-batch"}.items())), *SHORT_SCHEDULE, 0)
    assert not differences(sample(per_batch, "digits", 1), sample(per_sample, "digits", NUM_SAMPLES))
