"""What the suite measures on a GPU: exit speed-ups, fp32 vs bf16, throughput, the metric pass. One report.

Three small tables under one heading, written to `--out` after each (a run cut short keeps what it measured):

1. Exit speed-up, measured vs ideal (benchmarks/exit_speedup.py's protocol, timed with CUDA events):
   `adadiff` on the digits model (checkpoints/adadiff_digits_finetuned.pt on checkpoints/uvit_digits.pt),
   and `random-exit` on a U-ViT-S/2 at 32x32 with random weights (embed 512, depth 12, 8 heads, patch 2),
   whose learned exits would be all-or-nothing, so chance exits at a set layer ratio time the compaction.
   Measured: median over `repeats` back-to-back pairs of time(full) / time(method), with the IQR; ideal:
   the ratio of MACs the step log says ran. Threshold 0 is the price of deciding (nothing exits early).
2. fp32 vs bf16 for `full`: time per image (paired), images/s at the largest batch, and how far bf16 is from
   fp32: eps of one forward of the same input, and the final samples (max |diff|, RMS diff, RMS diff / RMS).
3. The metric pass (`compute_quality` on the device) vs one direct `torch_fidelity.calculate_metrics(cuda=True)`
   call on the same samples, in the digits-cnn space and the Inception space (random variance-preserving
   weights made here, as the tests make them: no Inception weights on a machine without network): FID of
   each, whether every other number agrees too, and the time of each (reference features cached for both).

    python benchmarks/gpu_check.py                 # on a GPU, about 3 min on an H200
    python benchmarks/gpu_check.py --dry-run       # on the CPU, tiny sizes: every code path, the same tables
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

from adadiff_bench.checkpoints import build_model, load_model
from adadiff_bench.config import DataConfig, MetricsConfig, UViTConfig
from adadiff_bench.data import Dataset, load_dataset, to_uint8
from adadiff_bench.device import autocast, check_precision_on, device_info, device_name, resolve_device
from adadiff_bench.errors import UserError
from adadiff_bench.flops import unit_costs
from adadiff_bench.harness import Cell, build_method, generate
from adadiff_bench.metrics.extractors import DIGITS, INCEPTION, get_extractor
from adadiff_bench.metrics.quality import compute_quality, fidelity_kwargs
from adadiff_bench.timing import iqr, time_once

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "checkpoints" / "uvit_digits.pt"
ADADIFF = REPO / "checkpoints" / "adadiff_digits_finetuned.pt"
UVIT_S2 = UViTConfig(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4.0,
                     qkv_bias=False)
SOLVER = "dpm-solver++"
THRESHOLDS = (0.0, 0.2, 0.3)
LAYER_RATIOS = (0.8, 0.6)
# harness column suffix -> torch-fidelity key, for the numbers besides FID that must agree as well
OTHER_KEYS = (("is", "_mean", torch_fidelity.KEY_METRIC_ISC_MEAN), ("kid", "_mean", torch_fidelity.KEY_METRIC_KID_MEAN),
              ("precision", "", torch_fidelity.KEY_METRIC_PRECISION), ("recall", "", torch_fidelity.KEY_METRIC_RECALL))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each section runs: the real check, or the dry run's tiny version of every code path."""
    batches: tuple[int, ...]        # exit timings, both models; the last is the precision table's batch
    digits_steps: int               # AdaDiff's thresholds were set for 25 DPM-Solver++ steps
    s2_steps: int                   # U-ViT-S/2: fewer steps (time ratios do not depend on the step count)
    s2: UViTConfig
    repeats: int                    # timed pairs
    metric_repeats: int
    metric_warmup: bool             # a warm-up call of each before the timed pairs (the dry run skips it)
    metric_samples: int
    reference_images: int | None    # None: all 1,797 digits
    inception_size: int | None      # None: torch-fidelity's 299 x 299


REAL = Sizes(batches=(1, 16, 64, 256), digits_steps=25, s2_steps=10, s2=UVIT_S2, repeats=7, metric_repeats=3,
             metric_warmup=True, metric_samples=1000, reference_images=None, inception_size=None)
DRY = Sizes(batches=(1, 2), digits_steps=2, s2_steps=2,
            s2=dataclasses.replace(UVIT_S2, embed_dim=32, depth=2, num_heads=2), repeats=2, metric_repeats=1,
            metric_warmup=False, metric_samples=16, reference_images=32, inception_size=75)


STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line on stderr, at once (a run cut short shows where it got)."""
    print(f"[gpu_check {time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---- timing -------------------------------------------------------------------------------------------

def paired_times(first: Callable[[], object], second: Callable[[], object], num_images: int, repeats: int,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per image of `first` and `second`, timed back to back `repeats` times after one warm-up of each."""
    first(), second()
    times = np.array([(time_once(first, num_images, device), time_once(second, num_images, device))
                      for _ in range(repeats)])
    return times[:, 0], times[:, 1]


def sampler(cell: Cell, model, batch: int, precision: str) -> Callable[[], object]:
    """One sampling run of `batch` images (one batch), with the method built once outside the clock."""
    method = build_method(cell, model)
    return lambda: generate(cell, model, batch, batch, method=method, precision=precision)


def exit_rows(label: str, model, costs, cells: list[tuple[str, Cell]], full: Cell, sizes: Sizes,
              device: torch.device, precision: str) -> list[list[str]]:
    """One row per batch size and setting: layer ratio, ideal and measured speed-up over `full`."""
    rows = []
    for batch in sizes.batches:
        _, full_log = generate(full, model, batch, batch, precision=precision)
        for setting, cell in cells:
            _, log = generate(cell, model, batch, batch, precision=precision)
            ideal = full_log.macs_per_image(costs) / log.macs_per_image(costs)
            full_s, cell_s = paired_times(sampler(full, model, batch, precision),
                                          sampler(cell, model, batch, precision), batch, sizes.repeats, device)
            ratios = full_s / cell_s
            measured = float(np.median(ratios))
            rows.append([label, cell.method, setting, precision, str(batch), f"{log.layer_ratio():.3f}", f"{ideal:.2f}",
                         f"{measured:.2f} ({iqr(list(ratios)):.2f})", f"{measured / ideal:.2f}",
                         f"{np.median(cell_s) * 1e3:.3f}"])
            say(f"{label} {cell.method} {setting} {precision} batch {batch}: ideal {ideal:.2f}, "
                f"measured {measured:.2f}")
    return rows


# ---- precision ----------------------------------------------------------------------------------------

def differences(low: torch.Tensor, high: torch.Tensor) -> list[str]:
    """max |low - high|, RMS(low - high) and RMS(low - high) / RMS(high), formatted."""
    diff = (low.float() - high.float()).flatten()
    rms = diff.pow(2).mean().sqrt().item()
    return [f"{diff.abs().max().item():.2e}", f"{rms:.2e}", f"{rms / high.float().pow(2).mean().sqrt().item():.2e}"]


@torch.no_grad()
def precision_row(label: str, model, num_steps: int, batch: int, repeats: int, device: torch.device) -> list[str]:
    """`full` in fp32 and in bf16: time per image, images/s, and bf16's distance from fp32 (eps and samples)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    eps_fp32 = model(x, t, None)
    with autocast(device, "bf16"):
        eps_bf16 = model(x, t, None)
    full = Cell("full", (), SOLVER, num_steps, 0)
    samples = {p: generate(full, model, batch, batch, precision=p)[0] for p in ("fp32", "bf16")}
    fp32_s, bf16_s = paired_times(sampler(full, model, batch, "fp32"), sampler(full, model, batch, "bf16"), batch,
                                  repeats, device)
    speedup = fp32_s / bf16_s
    say(f"{label} full batch {batch}: fp32 {np.median(fp32_s) * 1e3:.3f} ms/image, bf16 {np.median(bf16_s) * 1e3:.3f}")
    return [label, str(batch), str(num_steps), f"{np.median(fp32_s) * 1e3:.3f} ({iqr(list(fp32_s)) * 1e3:.3f})",
            f"{np.median(bf16_s) * 1e3:.3f} ({iqr(list(bf16_s)) * 1e3:.3f})",
            f"{np.median(speedup):.2f} ({iqr(list(speedup)):.2f})", f"{1 / np.median(fp32_s):.0f}",
            f"{1 / np.median(bf16_s):.0f}", *differences(eps_bf16, eps_fp32),
            *differences(samples["bf16"], samples["fp32"])]


# ---- the metric pass ------------------------------------------------------------------------------------

def variance_preserving_init(network: torch.nn.Module) -> None:
    """Kaiming (fan-in) convs, identity batch norms, 1/sqrt(fan-in) linear layers: activations keep their scale."""
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
            torch.nn.init.zeros_(module.bias)


def random_inception_weights(path: Path) -> str:
    """A random but non-degenerate Inception-V3 state dict in torch-fidelity's layout (as tests/test_metrics.py)."""
    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda *args, **kwargs: None):
        network = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    variance_preserving_init(network)
    torch.save(network.state_dict(), path)
    return str(path)


def timed(fn: Callable[[], dict]) -> tuple[float, dict]:
    """(seconds, result) of one call; metric results are host numbers, so the call has finished on the device."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def metric_rows(samples: torch.Tensor, reference: Dataset, config: MetricsConfig, cache_dir: str, repeats: int,
                warmup: bool, device: torch.device) -> list[list[str]]:
    """Per feature space: harness FID vs direct torch-fidelity FID, the other numbers, and the time of each.

    After the warm-up both read the reference's cached features (as a run does after its first cell)."""
    rows = []
    for space in (DIGITS, INCEPTION):
        spec = get_extractor(space)
        kwargs = fidelity_kwargs(space, spec.weights(config, ""), samples, reference, config, cache_dir, device)
        harness = lambda: compute_quality(samples, reference, config, cache_dir, (space,), device=device)  # noqa: E731
        direct = lambda: torch_fidelity.calculate_metrics(**kwargs)  # noqa: E731
        if warmup:
            harness(), direct()
        harness_s, direct_s = [], []
        for _ in range(repeats):
            seconds, ours = timed(harness)
            harness_s.append(seconds)
            seconds, theirs = timed(direct)
            direct_s.append(seconds)
        fid_ours, fid_theirs = ours[f"fid_{spec.column}"], theirs[torch_fidelity.KEY_METRIC_FID]
        others = all(ours[f"{name}_{spec.column}{suffix}"] == theirs[key] for name, suffix, key in OTHER_KEYS)
        ratios = np.array(harness_s) / np.array(direct_s)
        rows.append([space, f"{len(samples)} / {len(reference.images)}", "yes" if kwargs["cuda"] else "no",
                     f"{fid_ours:.6g}", f"{fid_theirs:.6g}", f"{abs(fid_ours - fid_theirs):.1e}",
                     "yes" if others else "NO", f"{np.median(harness_s):.3f}", f"{np.median(direct_s):.3f}",
                     f"{np.median(ratios):.2f} ({iqr(list(ratios)):.2f})"])
        say(f"metrics {space}: FID {fid_ours:.6g} (harness) vs {fid_theirs:.6g} (direct), "
            f"{np.median(harness_s):.3f} s vs {np.median(direct_s):.3f} s")
    return rows


def subset(data: Dataset, count: int | None) -> Dataset:
    """The first `count` images of `data` as a data set of their own (its own hash keys the cache)."""
    if count is None:
        return data
    images = data.images[:count]
    return Dataset(data.name, images, data.labels[:count], hashlib.sha256(images.numpy().tobytes()).hexdigest())


# ---- the report ---------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]], text_columns: int) -> str:
    """A markdown table: the first `text_columns` columns left-aligned, the rest (numbers) right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


EXIT_HEADER = ["model", "method", "setting", "precision", "batch", "layer ratio", "ideal speed-up",
               "measured speed-up (IQR)", "measured / ideal", "method ms/image"]
PRECISION_HEADER = ["model (`full`)", "batch", "steps", "fp32 ms/image (IQR)", "bf16 ms/image (IQR)",
                    "bf16 speed-up (IQR)", "fp32 images/s", "bf16 images/s", "eps max abs diff", "eps RMS diff",
                    "eps RMS diff / RMS", "samples max abs diff", "samples RMS diff", "samples RMS diff / RMS"]
METRIC_HEADER = ["feature space", "samples / reference", "on the device", "FID (harness)", "FID (direct)",
                 "abs diff", "IS, KID, precision, recall identical", "harness s", "direct s",
                 "harness / direct (IQR)"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, dry_run: bool) -> str:
    """The heading and one paragraph saying where and with what this ran."""
    info = device_info(device)
    where = device_name(device)
    details = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}", f"Python {platform.python_version()}",
               f"{torch.get_num_threads()} CPU threads", f"commit {git_commit()}",
               datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]
    if device.type == "cuda":
        details[1:1] = [f"{info['gpu_memory_gib']} GiB, compute capability {info['compute_capability']}",
                        f"driver {info.get('driver')}", f"cuDNN {info.get('cudnn')}",
                        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, conv {torch.backends.cudnn.allow_tf32}"]
    title = f"## GPU check: {where} ({device})" + (" - DRY RUN on the CPU, tiny sizes: no number here means anything"
                                                   if dry_run else "")
    return f"{title}\n\n{', '.join(details)}."


def write_report(path: Path | None, sections: list[str]) -> str:
    text = "\n\n".join(sections) + "\n"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the report's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def on_device(model, device: torch.device):
    """(the model moved to `device`, its unit costs): the costs are traced on the CPU first."""
    costs = unit_costs(model)
    return model.to(device), costs


def exit_section(sizes: Sizes, digits, digits_costs, s2, s2_costs, device: torch.device) -> str:
    """AdaDiff on the digits model in fp32; random exits on the U-ViT-S/2 in fp32 and in bf16."""
    digits_full = Cell("full", (), SOLVER, sizes.digits_steps, 0)
    adadiff = [(f"threshold {threshold:g}", Cell("adadiff", (("checkpoint", str(ADADIFF)), ("threshold", threshold)),
                                                 SOLVER, sizes.digits_steps, 0)) for threshold in THRESHOLDS]
    rows = exit_rows("digits U-ViT", digits, digits_costs, adadiff, digits_full, sizes, device, "fp32")
    s2_full = Cell("full", (), SOLVER, sizes.s2_steps, 0)
    random_exits = [(f"layer ratio {ratio:g}", Cell("random-exit", (("layer_ratio", ratio),), SOLVER,
                                                    sizes.s2_steps, 0)) for ratio in LAYER_RATIOS]
    for precision in ("fp32", "bf16"):
        rows += exit_rows(s2_label(sizes), s2, s2_costs, random_exits, s2_full, sizes, device, precision)
    clock = "CUDA events" if device.type == "cuda" else "perf_counter"
    return (f"**Exit speed-up over `full`** ({SOLVER}; digits {sizes.digits_steps} steps, U-ViT {sizes.s2_steps} "
            f"steps; median of {sizes.repeats} back-to-back pairs, {clock}; ideal = MACs ratio from the step log)"
            f"\n\n{markdown_table(EXIT_HEADER, rows, 4)}")


def precision_section(sizes: Sizes, digits, s2, device: torch.device) -> str:
    """`full` in fp32 and bf16 on both models, at the largest batch."""
    batch = sizes.batches[-1]
    rows = [precision_row("digits U-ViT", digits, sizes.digits_steps, batch, sizes.repeats, device),
            precision_row(s2_label(sizes), s2, sizes.s2_steps, batch, sizes.repeats, device)]
    return (f"**fp32 vs bf16 autocast, `full`** (median of {sizes.repeats} pairs; eps: one forward of the same input "
            f"at random timesteps; samples: the same seeds)\n\n{markdown_table(PRECISION_HEADER, rows, 1)}")


def metric_section(sizes: Sizes, digits, device: torch.device) -> str:
    """The metric pass vs a direct torch-fidelity call, on samples of the digits model."""
    if sizes.inception_size is not None:  # dry run: Inception reads 75x75 instead of 299x299 (speed only)
        fidelity_inception.FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = sizes.inception_size
    reference = subset(load_dataset(DataConfig()), sizes.reference_images)
    full = Cell("full", (), SOLVER, sizes.digits_steps, 0)
    images, _ = generate(full, digits, sizes.metric_samples, min(sizes.metric_samples, 500))
    samples = to_uint8(torch.nan_to_num(images))
    with tempfile.TemporaryDirectory() as scratch:
        weights = random_inception_weights(Path(scratch) / "inception.pth")
        config = MetricsConfig(inception="require", inception_weights=weights, kid_subset_size=min(100, len(samples)),
                               isc_splits=min(10, len(samples)))
        rows = metric_rows(samples, reference, config, str(Path(scratch) / "cache"), sizes.metric_repeats,
                           sizes.metric_warmup, device)
    warmup = " after a warm-up" if sizes.metric_warmup else ""
    return (f"**Metric pass vs direct torch-fidelity** (median of {sizes.metric_repeats} pairs{warmup}; Inception: "
            f"random variance-preserving weights; KID subsets of {config.kid_subset_size})"
            f"\n\n{markdown_table(METRIC_HEADER, rows, 1)}")


def s2_label(sizes: Sizes) -> str:
    return "U-ViT-S/2 32x32 random" if sizes.s2 == UVIT_S2 else f"U-ViT {sizes.s2.embed_dim}-wide random"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU, 2 repeats, 2 batch sizes: every code path and the tables")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda; cpu with --dry-run)")
    parser.add_argument("--out", type=Path,
                        help="write the report here (default: benchmarks/results/gpu-<device name>.md; "
                             "with --dry-run: nowhere, stdout only)")
    args = parser.parse_args()
    sizes = DRY if args.dry_run else REAL
    try:
        device = resolve_device(args.device or ("cpu" if args.dry_run else "cuda"), "--device")
        check_precision_on("bf16", device, "--device")
    except UserError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    out = args.out
    if out is None and not args.dry_run:
        out = REPO / "benchmarks" / "results" / f"gpu-{slug(device_name(device))}.md"
    say(f"device {device} ({device_name(device)}); report to {out or 'stdout'}")
    digits, digits_costs = on_device(load_model(BASE).eval(), device)
    torch.manual_seed(0)
    s2, s2_costs = on_device(build_model(sizes.s2).eval(), device)

    sections, failed = [environment(device, args.dry_run)], []
    for title, build in (("Exit speed-up", lambda: exit_section(sizes, digits, digits_costs, s2, s2_costs, device)),
                         ("fp32 vs bf16", lambda: precision_section(sizes, digits, s2, device)),
                         ("Metric pass", lambda: metric_section(sizes, digits, device))):
        try:
            sections.append(build())
        except Exception as error:  # noqa: BLE001 (a GPU's minutes are scarce: say what broke, go on to the next)
            traceback.print_exc()
            failed.append(title)
            sections.append(f"**{title}: FAILED** ({type(error).__name__}: {str(error).splitlines()[0]})")
        write_report(out, sections)
    print(write_report(out, sections), flush=True)
    say(f"done{'; FAILED: ' + ', '.join(failed) if failed else ''}; report in {out or 'stdout'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
