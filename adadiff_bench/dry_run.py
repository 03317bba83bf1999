"""`adadiff-bench run --config CONFIG --dry-run`: what a run would do, and about how long it would take.

The config goes through the checks a run makes before its first sample (the ones `harness.prepare` makes
before methods train on demand): methods, knobs, solvers, the network, the data and the feature extractors.
Then it prints every cell (method, knobs, solver, steps, seed), the files each loads (path and SHA-256) or
the training config it would train on demand, and an estimated time from a timed batch of `full` at the
run's solver and steps. Nothing is written: no results folder, no training cache, no Inception download.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import sha256_file
from .config import RunConfig, timed_samples
from .device import check_precision_on, resolve_device
from .errors import UserError
from .harness import Cell, checked_inputs, generate, plan_curves, reference_cell
from .metrics.extractors import INCEPTION
from .models.official import check_run_files, run_checkpoint

PROBE_IMAGES = 64  # the timed batch at most (the run's batch size when smaller: per-image cost depends on it)
PROBE_REPEATS = 2  # timed tries of that batch; the faster one counts


@dataclass
class Probe:
    """Seconds per image and solver step of `full` (guidance passes included), from a timed batch."""
    seconds_per_image_step: float
    images: int
    num_steps: int
    solver: str


def checked_run(config: RunConfig, where: str):
    """(cells, model, each cell's knobs, data, extractors), after the checks a run makes before sampling."""
    check_run_files(config, where)
    curves = plan_curves(config, where)
    device = resolve_device(config.device, f"{where}: device")
    check_precision_on(config.precision, device, f"{where}: precision")
    metrics = config.metrics
    if metrics.inception == "download":  # (a dry run fetches nothing: the spaces are the ones on disk now)
        metrics = dataclasses.replace(metrics, inception="auto")
    model, params, data, extractors = checked_inputs(config, curves, device, where, metrics)
    return list(curves), model, params, data, extractors


def probe(config: RunConfig, model) -> Probe:
    """Time one batch of `full` at the run's solver and steps, the faster of `PROBE_REPEATS` tries, after a
    warm-up of two steps at the same batch size (a cold first batch, or another process's burst, read up to
    1.7 times slower than the run then went)."""
    reference = reference_cell(config)
    images = min(PROBE_IMAGES, config.sampling.batch_size, config.sampling.num_samples)
    generate(dataclasses.replace(reference, num_steps=min(2, reference.num_steps)), model, images, images,
             precision=config.precision)
    tries = []
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        generate(reference, model, images, images, precision=config.precision)
        tries.append(time.perf_counter() - started)
    return Probe(min(tries) / (images * reference.num_steps), images, reference.num_steps, reference.solver)


def cell_seconds(cell: Cell, config: RunConfig, per_image_step: float) -> tuple[float, float]:
    """(sampling, timing pass) seconds of a cell at full depth: images x steps x the probe's cost per image-step.
    The timing pass runs warm-up batches, then `repeats` calls of the cell interleaved with the reference."""
    sampling = config.sampling.num_samples * cell.num_steps * per_image_step
    if not config.timing.enabled:
        return sampling, 0.0
    timing = config.timing
    reference = reference_cell(config)
    timed = timed_samples(timing, config.sampling.num_samples)
    steps_per_round = cell.num_steps + (reference.num_steps if cell != reference else 0)
    warmup = timing.warmup_batches * min(timed, config.sampling.batch_size) * steps_per_round
    return sampling, (warmup + timing.repeats * timed * steps_per_round) * per_image_step


def cell_files(params, results_dir: str, hashes: dict[str, str]) -> list[str]:
    """What a cell's knobs name on disk: checkpoints it loads (with their SHA-256), training configs it would
    train on demand (`.toml`)."""
    found = []
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if not (isinstance(value, str) and value and Path(value).is_file()):
            continue
        if value.endswith(".toml"):
            found.append(f"trains on demand from {value} ({_training_steps(value)} steps) unless already cached "
                         f"under {Path(results_dir) / '.adadiff_cache'}")
        else:
            hashes.setdefault(value, sha256_file(value))
            found.append(f"loads {value} (sha256 {hashes[value][:12]})")
    return found


def _training_steps(path: str) -> str:
    from .training import load_train_config
    try:
        return str(load_train_config(path).train.steps)
    except UserError:
        return "?"


def describe_cell(cell: Cell) -> str:
    knobs = " ".join(f"{k}={v}" for k, v in cell.params)
    return f"{cell.method}{' ' + knobs if knobs else ''}  solver={cell.solver} steps={cell.num_steps} seed={cell.seed}"


def dry_run(config: RunConfig, where: str) -> None:
    """Check `config`, then print its cells, what each loads or trains, and the estimated time; write nothing."""
    torch.set_num_threads(config.timing.threads)
    cells, model, params, data, extractors = checked_run(config, where)
    checkpoint = run_checkpoint(config)
    hashes = {checkpoint: sha256_file(checkpoint)}
    folder = Path(config.results_dir) / config.name
    print(f"run {config.name!r} -> {folder}"
          f"{' (exists: the same config resumes it, another needs --overwrite)' if folder.exists() else ''}")
    print(f"network: {checkpoint} (sha256 {hashes[checkpoint][:12]}); data: {data.name}, {len(data.images)} images "
          f"{'x'.join(map(str, data.images.shape[1:]))}; {config.sampling.num_samples} samples per cell")
    print(f"quality metrics in: {', '.join(extractors)}" if extractors else
          "quality metrics: no feature extractor applies (see the note above)")
    if config.metrics.inception == "download" and INCEPTION not in extractors:
        print('inception = "download": the run will download the Inception weights (the dry run did not)')
    measured = probe(config, model)
    total_sampling = total_timing = 0.0
    print(f"{len(cells)} cells:")
    for index, cell in enumerate(cells, 1):
        sampling, timing = cell_seconds(cell, config, measured.seconds_per_image_step)
        total_sampling, total_timing = total_sampling + sampling, total_timing + timing
        print(f"  [{index}] {describe_cell(cell)}  ~{_duration(sampling + timing)}")
        for line in cell_files(params[cell], config.results_dir, hashes) or ["loads only the run's network"]:
            print(f"       {line}")
    print(f"estimated time: ~{_duration(total_sampling + total_timing)} (sampling {_duration(total_sampling)}, "
          f"timing pass {_duration(total_timing)})")
    print(f"the estimate rests on the faster of {PROBE_REPEATS} timed batches of {measured.images} images of `full` "
          f"({measured.solver}, {measured.num_steps} steps) on this machine: {measured.seconds_per_image_step * 1e3:.2f} ms per image "
          "and step, times each cell's images x steps at full depth (methods that skip blocks or steps take less); "
          "not included: quality metrics, training on demand, calibration, latent decoding")
    print("dry run: nothing was written")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
