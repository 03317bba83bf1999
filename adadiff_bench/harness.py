"""The harness: a run config -> cells (method x knob setting x seed) -> sampling, metrics, cost, time -> results.

Everything that can be checked is checked before the first sample is drawn: methods, knobs,
solvers, checkpoint, data, Inception weights when required. Then each method prepares what its
settings need (training on demand, rank 0 first under torchrun), and only then is anything written.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .backbone_id import backbone_hash, method_backbone
from .training_budget import row_budget
from .cell_labels import short_labels, short_value
from .calibration_memo import cell_setting, memo_folder, remembered
from .checkpoints import sha256_file
from .config import MethodEntry, RunConfig, check_solver, timed_samples, to_dict
from .data import Dataset, check_matches_model, load_dataset, to_uint8
from .diffusion import LEARNED_VARIANCE_SOLVERS, sample, solver_options, solver_timesteps
from .device import (check_precision_on, device_info, device_name, module_device, resolve_device,
                     set_deterministic, wants_cuda)
from .distributed import World, agree, join_world, leave_world
from .errors import UserError
from .flops import unit_costs
from .guidance import NO_GUIDANCE, check_guidance, guided, label_classes, null_condition
from .methods import PrepareContext, get_method, make_params
from .prompts import attach_prompts, prompt_condition
from .metrics.extractors import resolve_extractors
from .metrics.quality import check_quality_inputs, compute_quality
from .schedules import DEFAULT_SCHEDULE, SCHEDULES, check_schedule_and_solver
from .results import (BUSY_ELSEWHERE, FID_BOOTSTRAP, OTHER_CORES, SCHEMA_VERSION, DamagedFile, RunStore,
                      fid_bootstrap_arrays, make_dir, read_json, read_npz, warn, write_json, write_npz)
from .memory import PeakMemory, check_sampling_memory
from .metrics.specs import headline_columns
from .models.autoencoder import LatentDecoder, decode_stage
from .models.official import (check_run_files, decoded_values, load_run_decoder, load_run_model, published_files,
                              run_checkpoint, run_image_shape)
from .steplog import NullStepLog, StepLog, UnitCosts
from .timing import measure

PACKAGES = ("torch", "torchvision", "torch-fidelity", "clean-fid", "fvcore", "diffusers", "numpy", "scipy",
            "pandas", "matplotlib", "scikit-learn")


@dataclass(frozen=True)
class Cell:
    method: str
    params: tuple[tuple[str, object], ...]  # knob settings, sorted by name
    solver: str
    num_steps: int
    seed: int
    schedule: str = DEFAULT_SCHEDULE     # run-wide ([sampling]): the network's noise schedule
    guidance: float = NO_GUIDANCE        # run-wide ([sampling]): classifier-free guidance weight w
    guidance_channels: int = 0           # run-wide ([sampling]): channels guided (0 = all)

    @property
    def cell_id(self) -> str:
        """A folder name: knobs as `name=value`, paths by their file stem (plus a hash that keeps ids unique)."""
        knobs = "".join(f"-{k}={short_value(v)}" for k, v in self.params)
        cell_id = f"{self.method}{knobs}-{self.solver}-{self.num_steps}steps-seed{self.seed}"
        if any(isinstance(v, str) and "/" in v for _, v in self.params):
            cell_id += "-" + hashlib.sha256(self.params_json.encode()).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9._=+,-]", "_", cell_id)

    @property
    def params_json(self) -> str:
        return json.dumps(dict(self.params), sort_keys=True)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def expand_entry(entry: MethodEntry, config: RunConfig, where: str) -> list[Cell]:
    """The cells of one [[methods]] table: the product of every list-valued setting, times seeds."""
    cls = get_method(entry.name)
    solvers = _as_list(entry.solver if entry.solver is not None else config.sampling.solver)
    steps = _as_list(entry.num_steps if entry.num_steps is not None else config.sampling.num_steps)
    for solver in solvers:
        check_solver(solver, where)
        check_schedule_and_solver(config.sampling.schedule, solver, where)
    if any(s <= 0 for s in steps):
        raise UserError(f"{where}: num_steps must be > 0 (got {steps})")
    check_step_count(config.sampling.schedule, steps, where)
    knob_names = sorted(entry.params)
    knob_values = [_as_list(entry.params[k]) for k in knob_names]
    cells = []
    for values in itertools.product(*knob_values):
        setting = dict(zip(knob_names, values))
        make_params(cls, setting, where)  # validate now, before anything runs
        for solver, num_steps, seed in itertools.product(solvers, steps, config.seeds):
            cells.append(Cell(entry.name, tuple(sorted(setting.items())), solver, num_steps, seed,
                              config.sampling.schedule, config.sampling.guidance, config.sampling.guidance_channels))
    return cells


def check_step_count(schedule: str, steps: list[int], where: str) -> None:
    """A discrete schedule cannot be sampled in more steps than it has training timesteps."""
    limit = getattr(SCHEDULES.get(schedule), "num_train_timesteps", None)
    if limit is not None and max(steps) > limit:
        raise UserError(f"{where}: num_steps must be at most {limit}, the {schedule} schedule's timesteps "
                        f"(got {max(steps)}); use fewer steps")


def swept_knobs(entry: MethodEntry) -> list[str]:
    """The settings an entry sweeps (given as lists): what varies along its curve in the report."""
    swept = [k for k in ("solver", "num_steps") if isinstance(getattr(entry, k), list)]
    return swept + sorted(k for k, v in entry.params.items() if isinstance(v, list))


def plan_curves(config: RunConfig, where: str = "config") -> dict[Cell, tuple[int, list[str]]]:
    """Every cell once, in order, with the [[methods]] entry it came from and the knobs that entry sweeps."""
    cells: dict[Cell, tuple[int, list[str]]] = {}
    check_step_count(config.sampling.schedule, [config.sampling.num_steps], f"{where}: [sampling]")  # the reference
    for i, entry in enumerate(config.methods):
        for cell in expand_entry(entry, config, f"{where}: methods[{i}]"):
            cells.setdefault(cell, (i, swept_knobs(entry)))
    return cells


@dataclass
class Prepared:
    model: torch.nn.Module
    data: Dataset
    costs: UnitCosts
    cells: list[Cell]
    curves: dict[Cell, tuple[int, list[str]]]
    extractors: tuple[str, ...]
    checkpoint_sha256: str
    params: dict[Cell, object]  # each cell's knobs as its method prepared them (e.g. a checkpoint trained on demand)
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    determinism: dict = dataclasses.field(default_factory=dict)
    decoder: LatentDecoder | None = None  # a latent model's decoding stage (its own cost, time and memory)
    decode_macs: float = 0.0

    def method(self, cell: Cell):
        """A fresh method object for `cell`, with its prepared knobs (the timing reference may not be a cell)."""
        return build_method(cell, self.model, self.params.get(cell))

    @functools.cached_property
    def labels(self) -> dict[Cell, str]:
        """Each cell's short label for progress bars and log lines (cell ids name folders)."""
        return short_labels(self.curves)


def prepare(config: RunConfig, where: str, world: World = World(), progress: bool = True) -> Prepared:
    """Load and check everything the run needs, then let methods train what they need; raises UserError
    before anything is written."""
    check_run_files(config, where)
    curves = plan_curves(config, where)
    device = resolve_device(config.device, f"{where}: device")
    check_precision_on(config.precision, device, f"{where}: precision")
    determinism = set_deterministic(device, config.deterministic)
    model, params, data, extractors = checked_inputs(config, curves, device, where, config.metrics)
    context = PrepareContext(Path(config.results_dir) / ".adadiff_cache", progress and world.is_main)
    params = agree(world, lambda: prepare_methods(params, curves, model, context, where))
    params = agree(world, lambda: calibrate_methods(params, curves, model, config, where))
    decoder = load_run_decoder(config, device)
    decode_macs = decoder.macs_per_image((model.in_chans, model.img_size, model.img_size)) if decoder else 0.0
    return Prepared(model, data, unit_costs(model), list(curves), curves, extractors,
                    sha256_file(run_checkpoint(config)), params, device, config.precision, determinism,
                    decoder, decode_macs)


def check_learned_variance(solver: str, model, where: str) -> None:
    """A learned-variance sampler needs a network that predicts its variance."""
    if solver in LEARNED_VARIANCE_SOLVERS and not getattr(model, "learned_sigma", False):
        raise UserError(f"{where}: solver {solver!r} steps with the network's learned variance, but this network "
                        "predicts none (a learned-sigma DiT does: out_channels = 2 x in_channels); use solver = \"ddpm\"")


def checked_inputs(config: RunConfig, curves: dict, device: torch.device, where: str, metrics) -> tuple:
    """(model on `device`, each cell's knobs, data, feature extractors) after every check a run makes before
    methods prepare: prompts, guidance, memory, each cell's knobs against the model, the data against the model,
    the metrics' inputs (`metrics` may differ from the config's: a dry run resolves no download)."""
    model = load_run_model(config, where).to(device)
    attach_prompts(model, config.sampling.prompts, config.sampling.guidance != NO_GUIDANCE, where)
    check_guidance(config.sampling.guidance, model, f"{where}: [sampling]", config.sampling.guidance_channels)
    timed = timed_samples(config.timing, config.sampling.num_samples) if config.timing.enabled else 0
    check_sampling_memory(max(config.sampling.num_samples, timed), max(c.num_steps for c in curves),
                          model.num_blocks, model.in_chans * model.img_size ** 2, decoded_values(config), where)
    params = {}
    for cell, (entry, _) in curves.items():
        cls, place = get_method(cell.method), f"{where}: methods[{entry}]"
        params[cell] = make_params(cls, dict(cell.params), place)
        cls.check(params[cell], model, place)
        cls.check_schedule(params[cell], cell.solver, cell.num_steps, place)
        check_learned_variance(cell.solver, model, place)
    data = load_dataset(config.data)
    channels, size, _ = run_image_shape(config, model)
    check_matches_model(data, size, channels)
    if model.num_classes > 0 and data.labels is None:
        raise UserError(f"{where}: the model is class-conditional but data set {data.name!r} has no labels")
    extractors = resolve_extractors(tuple(data.images.shape[1:]), metrics, where)
    check_quality_inputs(config.sampling.num_samples, data, metrics, extractors, where)
    return model, params, data, extractors


def prepare_methods(params: dict, curves: dict, model, context: PrepareContext, where: str) -> dict:
    """Each distinct setting prepared once by its method (training on demand), and checked again as prepared."""
    prepared: dict = {}
    for cell, raw in params.items():
        key = (cell.method, cell.params)
        if key not in prepared:
            cls, place = get_method(cell.method), f"{where}: methods[{curves[cell][0]}]"
            prepared[key] = cls.prepare(raw, context)
            if prepared[key] != raw:
                cls.check(prepared[key], model, place)
    return {cell: prepared[(cell.method, cell.params)] for cell in params}


def reference_cell(config: RunConfig) -> Cell:
    """The `full` method at the run's default solver and steps: what speed-ups are measured against."""
    return Cell("full", (), config.sampling.solver, config.sampling.num_steps, config.seeds[0],
                config.sampling.schedule, config.sampling.guidance, config.sampling.guidance_channels)


def build_method(cell: Cell, model, params=None):
    """The method object of `cell`: its knobs as prepared (`params`) or, without them, as written."""
    cls = get_method(cell.method)
    return cls(model, params if params is not None else make_params(cls, dict(cell.params), cell.method))


def calibrate_methods(params: dict, curves: dict, model, config: RunConfig, where: str) -> dict:
    """Settings that ask for a compute target (AdaDiff's `target_layer_ratio`) find their knobs on calibration
    samples of their own cell's solver and steps (a method's `calibrate` hook), once per distinct setting.
    Each calibration run's layer ratio is remembered on disk (`calibration_memo`), so a resumed run replays
    its searches instead of sampling them again."""
    calibrated: dict = {}
    run_setting = functools.cache(lambda: calibration_setting(config, model))  # hashes the checkpoint once, if needed
    for cell, prepared in params.items():
        calibrate = getattr(get_method(cell.method), "calibrate", None)
        key = (cell.method, cell.params, cell.solver, cell.num_steps)
        if calibrate is None or key in calibrated:
            continue

        def layer_ratio_of(knobs, num_samples: int, seed: int, cell=cell) -> float:
            _, log = generate(dataclasses.replace(cell, seed=seed), model, num_samples, config.sampling.batch_size,
                              method=build_method(cell, model, knobs), precision=config.precision)
            return log.layer_ratio()

        memo = remembered(layer_ratio_of, memo_folder(config.results_dir), {**run_setting(), **cell_setting(cell)})
        calibrated[key] = calibrate(prepared, memo, config.seeds, f"{where}: methods[{curves[cell][0]}]")
    return {cell: calibrated.get((cell.method, cell.params, cell.solver, cell.num_steps), prepared)
            for cell, prepared in params.items()}


def calibration_setting(config: RunConfig, model) -> dict:
    """What a calibration run depends on besides its cell and knobs: the network's bytes and how it samples."""
    sampling = {k: v for k, v in to_dict(config.sampling).items() if k != "num_samples"}
    return {"checkpoint_sha256": sha256_file(run_checkpoint(config)), "model": repr(to_dict(config.model)),
            "sampling": repr(sampling), "precision": config.precision, "device": str(module_device(model))}


def generate(cell: Cell, model, num_samples: int, batch_size: int, progress: bool = False,
             desc: str = "", method=None, record: bool = True, world: World = World(),
             checkpoints: Path | None = None, precision: str = "fp32") -> tuple[torch.Tensor, StepLog]:
    """Sample `num_samples` images for one cell; returns (float images on the CPU, step log).

    The network runs where `model` lives, at `precision` (autocast); each finished batch comes back to the CPU.

    With several processes (`world`), each samples its share of the batches and all of them get the
    gathered result. With `checkpoints`, every finished batch is saved there and a rerun takes saved
    batches back instead of sampling them again (a killed long cell resumes). `record=False` keeps no
    step log (a NullStepLog): only to measure the instrumentation's own cost.
    """
    method = method or build_method(cell, model)
    log = (StepLog if record else NullStepLog)(num_samples, solver_timesteps(cell.solver, cell.num_steps,
                                                                             cell.schedule), model.num_blocks)
    unconditional = None
    if cell.guidance != NO_GUIDANCE:  # the unconditional pass: its own method object and log
        log.add_unconditional_pass()
        unconditional = build_method(cell, model, method.params)
    starts = world.my_batches(list(range(0, num_samples, batch_size)))
    batches = {}
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        indices = np.arange(start, min(start + batch_size, num_samples))
        saved = checkpoints / f"batch_{start:08d}.npz" if checkpoints is not None else None
        if saved is not None and saved.is_file() and intact_batch(saved, len(indices)):
            batches[start] = take_back_batch(saved, indices, log, method)
            continue
        batches[start] = sample_batch(cell, model, method, log, indices, precision, unconditional).cpu()
        if saved is not None:
            save_batch(saved, batches[start], indices, log, method)
    if world.active:
        batches = gather_batches(world, batches, log)
    return torch.cat([batches[start] for start in sorted(batches)]), log


def sample_batch(cell: Cell, model, method, log: StepLog, indices: np.ndarray, precision: str = "fp32",
                 unconditional=None) -> torch.Tensor:
    """One batch of samples (on the model's device), logged into the rows `indices` of `log`; under guidance
    `unconditional` (a second method object) runs the unconditional pass into `log.unconditional`."""
    image_shape = (model.in_chans, model.img_size, model.img_size)
    log.set_batch(indices)
    method.start_batch(log)
    denoiser = method
    if unconditional is not None:
        unconditional.start_batch(log.unconditional)
        denoiser = guided(method, unconditional, cell.guidance, null_condition(model), cell.guidance_channels)
    return sample(denoiser, cell.solver, cell.num_steps, image_shape, indices, cell.seed,
                  label_classes(model, cell.guidance), on_step=lambda ctx: log.set_step(ctx.step),
                  device=module_device(model), precision=precision, schedule=cell.schedule,
                  condition=prompt_condition(model, indices))


def save_batch(path: Path, images: torch.Tensor, indices: np.ndarray, log: StepLog, method) -> None:
    """A finished batch's images, step-log rows and the method's artifacts so far, in one atomic file."""
    artifacts = {f"artifact/{name}/{key}": value for name, arrays in method.artifacts().items()
                 for key, value in arrays.items()}
    write_npz(path, images=images.numpy(), **{f"log/{k}": v for k, v in log.rows(indices).items()}, **artifacts)


def intact_batch(path: Path, count: int) -> bool:
    """Whether a saved batch reads in full and holds `count` images; a damaged one is deleted, with a warning,
    and sampled again."""
    try:
        arrays = read_npz(path)
        logs = [value for key, value in arrays.items() if key.startswith("log/")]
        if "images" in arrays and logs and all(len(a) == count for a in [arrays["images"], *logs]):
            return True
        reason = f"{str(path)!r} is not a batch of this cell"
    except DamagedFile as exc:
        reason = f"{str(path)!r} is damaged ({exc.reason})"
    except UserError as exc:  # (pickled objects)
        reason = str(exc)
    warn(f"{reason}; sampling that batch again")
    path.unlink(missing_ok=True)
    return False


def take_back_batch(path: Path, indices: np.ndarray, log: StepLog, method) -> torch.Tensor:
    """A batch saved by `save_batch`: its log rows and artifacts go back in place; returns its images."""
    with np.load(path, allow_pickle=False) as archive:
        log.set_rows(indices, {k.removeprefix("log/"): archive[k] for k in archive.files if k.startswith("log/")})
        artifacts: dict[str, dict] = {}
        for key in (k for k in archive.files if k.startswith("artifact/")):
            _, name, field = key.split("/", 2)
            artifacts.setdefault(name, {})[field] = archive[key]
        method.restore_artifacts(artifacts)
        return torch.from_numpy(archive["images"])


def gather_batches(world: World, batches: dict[int, torch.Tensor], log: StepLog) -> dict[int, torch.Tensor]:
    """Every process's batches and step-log rows, on every process."""
    mine = {start: (images.numpy(), log.rows(batch_rows(start, images))) for start, images in batches.items()}
    gathered = {}
    for part in world.gather(mine):
        for start, (images, rows) in part.items():
            log.set_rows(batch_rows(start, images), rows)
            gathered[start] = torch.from_numpy(images)
    return gathered


def batch_rows(start: int, images) -> np.ndarray:
    return np.arange(start, start + len(images))


def time_cell(cell: Cell, reference: Cell, prep: Prepared, config: RunConfig, progress: bool = False) -> dict:
    """The timing protocol (see `timing`): warm-up, then repeats interleaved with the reference."""
    timing = config.timing
    n, batch = timed_samples(timing, config.sampling.num_samples), config.sampling.batch_size

    def run(c: Cell):
        return lambda: generate(c, prep.model, n, batch, method=prep.method(c), precision=prep.precision)

    def warmup():  # runs of one batch touch every code path, allocation and first CUDA call before the clock starts
        for _ in range(timing.warmup_batches):  # (full step counts: some methods only run their own schedule)
            for c in {cell, reference}:
                generate(c, prep.model, min(n, batch), batch, method=prep.method(c), precision=prep.precision)

    result = measure(run(cell), None if cell == reference else run(reference), n, timing.repeats, warmup,
                     prep.device, progress, desc=f"time {n} images")
    return dataclasses.asdict(result)


def evaluate_cell(cell: Cell, prep: Prepared, config: RunConfig, cache_dir: Path, progress: bool,
                  world: World = World(), checkpoints: Path | None = None):
    """Sample, measure quality, cost and time of one cell.

    Returns (row, uint8 NHWC samples, step-log summaries, method artifacts such as uncertainty maps) on
    rank 0 and None on the other ranks (which only sample their share and time their own pass).
    """
    s = config.sampling
    method = prep.method(cell)
    method.record_artifacts = True  # only in this pass: the timed pass records nothing extra
    label = prep.labels[cell]
    with PeakMemory(prep.device) as peak:
        images, log = generate(cell, prep.model, s.num_samples, s.batch_size, progress and world.is_main,
                               desc=f"sample {label}", method=method, world=world, checkpoints=checkpoints,
                               precision=prep.precision)
    timing = time_cell(cell, reference_cell(config), prep, config, progress and world.is_main) \
        if config.timing.enabled else None
    timings, peaks = world.gather(timing), world.gather(peak.mb)
    if not world.is_main:
        return None
    if hasattr(method, "analyse"):  # a method's own analysis pass (AdaDiff's estimator quality): after, never timed
        method.analyse(cell, s.batch_size, prep.precision)
    decoding = {}
    if prep.decoder is not None:  # latents -> uint8 images: a stage of its own, not in the network's MACs or time
        samples, finite, decoding = decode_stage(prep.decoder, images, s.batch_size, prep.device)
    else:
        finite = bool(torch.isfinite(images).all())
        samples = to_uint8(torch.nan_to_num(images))
    macs = log.macs_per_image(prep.costs)
    row = {"method": cell.method, "family": method.family, "params": cell.params_json, "solver": cell.solver,
           "num_steps": cell.num_steps, "num_samples": s.num_samples, "seed": cell.seed,
           "schedule": cell.schedule, "guidance": cell.guidance, "guidance_channels": cell.guidance_channels,
           "batch_dependent": method.batch_dependent, "ceiling": method.ceiling,
           "valid": finite, "invalid_reason": "" if finite else "NaN or Inf in generated samples",
           "entry": prep.curves[cell][0], "swept": json.dumps(prep.curves[cell][1]),
           "backbone_hash": backbone_hash(method_backbone(method)),  # reports compare within one backbone
           **row_budget([run_checkpoint(config)] + [getattr(prep.params[cell], knob, "")
                                                    for knob in type(method).trained_files])}
    kept: dict = {}  # FID's bootstrap replicates, saved beside the row for paired comparisons between cells
    if finite:
        row.update(compute_quality(samples, prep.data, config.metrics, cache_dir, prep.extractors,
                                   device=prep.device, kept=kept))
    row.update({"macs_per_image": macs, "flops_per_image": 2 * macs, "gflops_per_image": 2 * macs / 1e9,
                "layer_ratio": log.layer_ratio(), "cache_bytes": method.cache_bytes,
                "peak_mem_mb": max(peaks), "peak_mem_kind": peak.kind, "processes": world.size,
                "device": str(prep.device), "device_name": device_name(prep.device), "precision": prep.precision,
                "threads": torch.get_num_threads()})
    row["exit_warning"] = exit_warning(cell, method, log)
    if row["exit_warning"]:
        warn(f"{label}: {row['exit_warning']}: the knob is outside the range where the method adapts; "
             "move it until samples exit at different points")
    if config.metrics.reference_stats:  # which reference FID compared against (KID, PR: the reference images)
        row["fid_reference_stats"] = config.metrics.reference_stats
    if prep.decoder is not None:
        row.update({"decode_macs_per_image": prep.decode_macs, "total_macs_per_image": macs + prep.decode_macs,
                    **decoding})
    if timing is not None:
        row.update(combine_timings(timings))
        warn_if_shared(label, row, world)
    row.update(getattr(method, "row_fields", dict)())  # a method's own columns (AdaDiff: a target's calibration)
    row["cell_id"] = cell.cell_id
    artifacts = method.artifacts()
    if kept:
        artifacts[FID_BOOTSTRAP] = fid_bootstrap_arrays(kept)
    return row, samples.permute(0, 2, 3, 1).numpy(), log.summaries(), artifacts


def exit_warning(cell: Cell, method, log: StepLog) -> str:
    """Why an adaptive early-exit setting is degenerate ("" when it is not): it never exits, or it exits at one
    and the same point for every sample and step."""
    if method.family != "early-exit" or method.fixed_exit_point:
        return ""
    points = log.exit_points_seen()
    if len(points) != 1 or points[0] < 1:
        return ""
    if points[0] == log.num_blocks:
        return "never exits (layer ratio 1.000 over the whole cell)"
    return f"always exits at block {points[0]} of {log.num_blocks} (every sample, every step)"


def warn_if_shared(label: str, row: dict, world: World) -> None:
    """One line when other processes kept cores busy while this cell was timed (a single process's run: under
    torchrun the ranks time side by side, and each counts the others)."""
    busy = row.get(OTHER_CORES, float("nan"))
    if world.size == 1 and busy >= BUSY_ELSEWHERE:
        warn(f"{label}: other processes kept {busy:.1f} cores busy while this cell was timed, so its times "
             "(not its FLOPs or quality) may be off (its row's timing_other_cores says so); compare times "
             "from a quiet machine")


def combine_timings(timings: list[dict]) -> dict:
    """One process's timing as is; several processes' (each timed its own pass): means of their medians."""
    if len(timings) == 1:
        return timings[0]
    combined = {key: float(np.mean([t[key] for t in timings])) for key in
                ("time_per_image_s", "time_per_image_s_iqr", "reference_time_per_image_s", OTHER_CORES)}
    combined["speedup"] = combined["reference_time_per_image_s"] / combined["time_per_image_s"]
    combined["timing_repeats"] = timings[0]["timing_repeats"]
    combined["timing_num_samples"] = timings[0]["timing_num_samples"]
    combined["time_per_image_s_ranks"] = json.dumps([t["time_per_image_s"] for t in timings])
    return combined


def run(config: RunConfig, where: str = "config", overwrite: bool = False, progress: bool = True) -> Path:
    """Run every cell of `config` and write the results store; returns the run folder.

    Under torchrun every process samples its share of each cell and rank 0 alone writes.
    """
    world = join_world(cuda=wants_cuda(config.device))
    try:
        return run_cells(config, where, overwrite, progress, world)
    finally:
        leave_world(world)


def run_cells(config: RunConfig, where: str, overwrite: bool, progress: bool, world: World) -> Path:
    """`run` inside a (possibly one-process) world: rank 0 decides, locks and writes; every rank samples."""
    torch.set_num_threads(config.timing.threads)
    prep = prepare(config, where, world, progress)
    store = RunStore(config.results_dir, config.name)
    config_dict = to_dict(config)
    say = print if world.is_main else (lambda *args, **kwargs: None)
    try:
        done = agree(world, lambda: open_partial(store, config_dict, overwrite, where))
        cache_dir = Path(config.results_dir) / ".cache"
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        rows = []
        eta = CellClock(sum(c.cell_id not in done for c in prep.cells))
        for index, cell in enumerate(prep.cells, 1):
            label = f"[{index}/{len(prep.cells)}] {prep.labels[cell]}"
            if cell.cell_id in done:
                say(f"{label}: already done, kept", flush=True)
                rows.append(store.read_cell_row(cell.cell_id) if world.is_main else None)
                continue
            say(f"{label}: sampling {config.sampling.num_samples} images", flush=True)
            result = evaluate_cell(cell, prep, config, cache_dir, progress, world, store.progress_dir(cell.cell_id))
            if world.is_main:
                store.write_cell(cell.cell_id, *result)
                rows.append(result[0])
                say(f"{label}: {_headline(result[0])}", flush=True)
                if progress:
                    print(f"{label}: {eta.tick()}", file=sys.stderr, flush=True)
            world.barrier()
        path = store.finish(rows, run_info(config, prep, started, world), [c.cell_id for c in prep.cells]) \
            if world.is_main else None
        say(f"results written to {path}/results.csv", flush=True)
        return Path(world.broadcast(str(path)))
    finally:
        store.release_lock()


class CellClock:
    """Elapsed time over the cells this run computes, and the rest estimated at the mean time per cell."""

    def __init__(self, to_compute: int):
        self.to_compute, self.finished, self.started = to_compute, 0, time.monotonic()

    def tick(self) -> str:
        self.finished += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.finished * max(self.to_compute - self.finished, 0)
        return (f"{self.finished}/{self.to_compute} cells computed, elapsed {_duration(elapsed)}, "
                f"about {_duration(left)} left")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def open_partial(store: RunStore, config_dict: dict, overwrite: bool, where: str) -> set[str]:
    """Lock the run, refuse a clash, open its partial folder; returns the cells already done."""
    store.acquire_lock()
    store.remove_leftovers()
    _check_existing(store, config_dict, overwrite, where)
    make_dir(store.partial)
    write_json(store.partial / "config.json", config_dict)
    return store.completed_cells()


def _check_existing(store: RunStore, config_dict: dict, overwrite: bool, where: str) -> None:
    """Refuse to mix configs under one run name; a partial run of the same config resumes."""
    name = config_dict["name"]
    if overwrite:
        shutil.rmtree(store.partial, ignore_errors=True)
        return
    if store.final.exists():
        info = store.final / "run.json"
        same = info.is_file() and _saved_config(info, "config") == json.loads(json.dumps(config_dict))
        raise UserError(f"{where}: run {name!r} already exists in {store.final}"
                        f"{' (complete, same config)' if same else ' with a different config'}; "
                        "pass --overwrite to replace it or pick another `name`")
    saved = store.partial / "config.json"
    if saved.is_file() and _saved_config(saved) != json.loads(json.dumps(config_dict)):
        raise UserError(f"{where}: {store.partial} holds an unfinished run named {name!r} made with a different "
                        "config; pick another `name` or pass --overwrite to discard it")


def _saved_config(path: Path, key: str | None = None):
    """The config a run folder was made with; a damaged file stops the run with one line naming it and the fix."""
    try:
        saved = read_json(path)
    except DamagedFile as exc:
        raise UserError(f"{exc.path} is damaged, so the run it belongs to cannot be checked against this config; "
                        f"delete {exc.path.parent} (or pass --overwrite) to start the run afresh") from None
    return saved.get(key) if key else saved


def _headline(row: dict) -> str:
    if not row["valid"]:
        return f"INVALID ({row['invalid_reason']}); the run goes on"
    parts = [f"{k}={row[k]:.4g}" for k in headline_columns(row) if isinstance(row[k], float)]
    parts.append(f"GFLOPs/image={row['gflops_per_image']:.3f}")
    parts.append(f"layer_ratio={row['layer_ratio']:.3f}")
    if "speedup" in row:
        parts.append(f"time/image={row['time_per_image_s'] * 1e3:.2f} ms speedup={row['speedup']:.2f}x")
    return " ".join(parts)


def run_info(config: RunConfig, prep: Prepared, started: str, world: World = World()) -> dict:
    """run.json: everything needed to trust and reproduce the numbers."""
    versions = {"adadiff-bench": __version__}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(config),
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "git_commit": _git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processes": world.size,
                    "python": platform.python_version(), **device_info(prep.device),
                    "determinism": prep.determinism, "precision": prep.precision},
        "checkpoint": {"path": run_checkpoint(config), "sha256": prep.checkpoint_sha256},
        **published_files(config),
        "method_checkpoints": {path: sha256_file(path) for path in sorted(  # as prepared: trained on demand too
            {str(p.checkpoint) for p in prep.params.values() if getattr(p, "checkpoint", "")})},
        "data": {"name": prep.data.name, "path": config.data.path, "num_images": len(prep.data.images),
                 "sha256": prep.data.sha256},
        "reference": dataclasses.asdict(reference_cell(config)),
        "feature_extractors": list(prep.extractors),
        "unit_macs": {"embed": prep.costs.embed, "blocks": prep.costs.blocks.tolist(), "head": prep.costs.head},
        "flops_convention": "MACs of matmuls, convolutions and attention (fvcore, SDPA handle); FLOPs = 2 x MACs",
        "solvers": {name: solver_options(name) for name in sorted({c.solver for c in prep.cells})},
        "cells": [c.cell_id for c in prep.cells],
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
