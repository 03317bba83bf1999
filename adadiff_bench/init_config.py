"""`adadiff-bench init --data PATH`: a starter run config for your own images, and the training configs of
its base model and of AdaDiff's estimators.

The data (a folder of PNG/JPEG images or an .npz, read by `data.load_dataset`) fixes the image shape. The run
config holds every built-in method that samples from the base model alone, each with a small sweep, checked
against that model (a setting the model cannot take is left out, with the reason, as a comment); methods that
need a network trained for them are listed in comments, except AdaDiff, whose estimators the run trains on
demand from a training config written beside it (swept over target layer ratios). A comment names the
feature space the quality metrics will use. Without `--checkpoint`, a U-ViT training config sized to the data is
written beside the run config and the run config points at the checkpoint it exports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import itertools
from pathlib import Path

from .checkpoints import build_model, load_model
from .config import DataConfig, MetricsConfig, UViTConfig
from .data import Dataset, load_dataset
from .errors import UserError
from .harness import check_step_count
from .methods import available_methods, get_method, make_params
from .results import atomic_write_bytes

NUM_STEPS = 25
SOLVER = "dpm-solver++"
NUM_SAMPLES = 500
BATCH_SIZE = 250

def sweeps(blocks: int) -> dict[str, dict[str, object]]:
    """Built-in methods that need nothing but the base model (of `blocks` blocks), one setting each: a first run
    that finishes in reasonable time; listing more values in a knob traces a curve."""
    return {
        "full": {},
        "solver-steps": {"num_steps": [10]},
        "static-exit": {"k": [max(1, 3 * blocks // 4)]},
        "random-exit": {"layer_ratio": [0.75]},
        "pabee": {"patience": [2]},
        "calm": {"tau": [0.99]},
        "oracle": {"tau": [0.1]},
        "ase": {"checkpoint": "", "strength": [0.5]},
        "deepcache": {"interval": [3]},
        "fora": {"interval": [3]},
        "delta-dit": {"interval": [3]},
        "first-block-cache": {"threshold": [0.12]},
        "teacache": {"threshold": [0.1]},
        "adaptive-diffusion": {"threshold": [0.3]},
    }


# methods that sample with a network trained for them (AdaDiff's is trained on demand): the table that makes it
NEEDS_TRAINING = {"berxit": "[berxit]", "l2c": "[l2c]", "duodiff": "a second, shallow U-ViT ([model] depth)"}
ADADIFF_TARGETS = [0.6, 0.8]  # layer ratios: each finds its own threshold on calibration samples
ADADIFF_STEPS = 3000  # the fine-tune's cap: held-out stopping may end it sooner
# the converged-recipe rule (see `recipe`): `steps` is a cap, the held-out loss decides where training stops
STOPPING_RULE = ("# steps is a cap: every eval_every steps the EMA weights' loss on the held-out tenth of the data is\n"
                 "# recorded, and training stops once `patience` evaluations in a row have not improved\n")


def base_model_config(image_shape: tuple[int, int, int]) -> UViTConfig:
    """A U-ViT of the digits model's size for C x H x W images (patches of 2, or 4 from 32 px on)."""
    channels, height, width = image_shape
    if height != width:
        raise UserError(f"the images are {height}x{width}; the U-ViT needs square images: crop or resize them")
    patch = 4 if height >= 32 and height % 4 == 0 else 2 if height % 2 == 0 else 1
    return UViTConfig(img_size=height, patch_size=patch, in_chans=channels, embed_dim=128, depth=12, num_heads=4,
                      mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True, skip=True)


def data_config(path: str) -> DataConfig:
    if not Path(path).exists():
        raise UserError(f"--data {path!r} does not exist; pass a folder of PNG/JPEG images or an .npz file")
    return DataConfig("folder" if Path(path).is_dir() else "npz", path)


def metrics_lines(dataset: Dataset) -> list[str]:
    """The `[metrics]` table with comments: the feature space the quality metrics will use on this machine, or,
    when none reads these images, the SWD (no network) and the learned feature space `train-extractor` makes
    for this data (named by the data's hash, so its file name is known before it exists)."""
    from .metrics.extractor_training import default_output
    from .metrics.extractors import resolve_extractors
    from .metrics.swd import fits as swd_fits
    with contextlib.redirect_stderr(io.StringIO()):  # (its note about skipped metrics is ours to word here)
        spaces = resolve_extractors(tuple(dataset.images.shape[1:]), MetricsConfig(), "init")
    if spaces:
        return [f"# quality metrics (FID, KID, precision/recall) will be computed in: {', '.join(spaces)}",
                "[metrics]", 'inception = "auto"']
    extractor = default_output(dataset)
    line = f"extractor = {_toml(str(extractor))}"
    swd = "on" if swd_fits(dataset.images.shape) else "auto"  # ("on" refuses smaller images)
    return ["# no packaged feature space reads these images (digits-cnn reads 1x8x8 only; Inception's weights were",
            "# not found), so the run computes the sliced Wasserstein distance (swd, no network needed; \"on\" keeps",
            "# it when a learned space is added). For FID, KID and precision/recall in a feature space learned on",
            "# this data, run",
            "#   adadiff-bench train-extractor --config <this file>",
            *(["# (done: its file is named below)"] if extractor.exists() else ["# and uncomment the extractor line"]),
            "[metrics]", 'inception = "auto"', f"swd = {_toml(swd)}", line if extractor.exists() else f"# {line}"]


def method_entries(model, where: str) -> list[str]:
    """`[[methods]]` tables for every applicable method; a setting the model refuses becomes a comment."""
    blocks = model.num_blocks
    lines = []
    for name, knobs in sweeps(blocks).items():
        if name not in available_methods():
            continue
        reason = _refusal(name, knobs, model, where)
        body = [f"name = {_toml(name)}"] + [f"{key} = {_toml(value)}" for key, value in knobs.items()]
        if reason:
            lines += ["", f"# left out: {reason}"] + [f"# {line}" for line in ["[[methods]]", *body]]
        else:
            lines += ["", "[[methods]]", *body]
    return lines


def _refusal(name: str, knobs: dict, model, where: str) -> str:
    """Why the model cannot take one of the sweep's settings ("" when it takes all)."""
    cls = get_method(name)
    steps = knobs.get("num_steps", NUM_STEPS)
    knob_lists = {k: v if isinstance(v, list) else [v] for k, v in knobs.items() if k != "num_steps"}
    try:
        for values in itertools.product(*knob_lists.values()):
            params = make_params(cls, dict(zip(knob_lists, values)), where)
            cls.check(params, model, where)
            for count in steps if isinstance(steps, list) else [steps]:
                check_step_count("linear", [count], where)
                cls.check_schedule(params, SOLVER, count, where)
    except UserError as exc:
        return str(exc)
    return ""


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def run_config_text(name: str, data: DataConfig, dataset: Dataset, checkpoint: str, model, trained_by: str,
                    adadiff_config: str) -> str:
    shape = tuple(dataset.images.shape[1:])
    lines = [f"# A starter run config for {data.path} ({len(dataset.images)} images, {'x'.join(map(str, shape))} CxHxW)"
             f", written by `adadiff-bench init`.",
             f"# Check it without running: adadiff-bench run --config <this file> --dry-run",
             *([f"# The base model comes from: adadiff-bench train --config {trained_by}"] if trained_by else []),
             "# One setting per method, n = 500, one seed: a first look (the dry run estimates its time). Any list",
             "# is a sweep (threshold = [0.05, 0.1, 0.2] traces a curve); publish with more samples and seeds = [0, 1, 2].",
             f"name = {_toml(name)}", f"checkpoint = {_toml(checkpoint)}", "seeds = [0]", "",
             "[data]", f"name = {_toml(data.name)}", f"path = {_toml(data.path)}", "",
             "[sampling]", f"solver = {_toml(SOLVER)}", f"num_steps = {NUM_STEPS}",
             f"num_samples = {NUM_SAMPLES}", f"batch_size = {BATCH_SIZE}", "", *metrics_lines(dataset),
             *method_entries(model, "init"), "",
             "# AdaDiff is fine-tuned from the base model, estimators and all, when the run starts (once; cached",
             "# in <results_dir>/.adadiff_cache); each target layer ratio finds its threshold on calibration samples",
             "[[methods]]", 'name = "adadiff"', f"train = {_toml(adadiff_config)}",
             f"target_layer_ratio = {_toml(ADADIFF_TARGETS)}", "",
             "# AdaDiff fine-tunes the base model, so its rows form a backbone group of their own: this is that",
             "# group's full-depth reference. The other exit methods above run on the base model, which was",
             "# never trained to exit early; to compare them on AdaDiff's backbone, train it with",
             f"# `adadiff-bench train --config {adadiff_config}` and give them its export as `checkpoint`",
             "[[methods]]", 'name = "full"', f"train = {_toml(adadiff_config)}", ""]
    for name_, table in NEEDS_TRAINING.items():
        if name_ in available_methods():
            lines.append(f"# {name_}: needs a network trained for it (a training config with {table}; "
                         f"`adadiff-bench methods {name_}`)")
    return "\n".join(lines) + "\n"


def train_config_text(data: DataConfig, model: UViTConfig, export: str, out_dir: str) -> str:
    fields = "\n".join(f"{f.name} = {_toml(getattr(model, f.name))}" for f in dataclasses.fields(model)
                       if getattr(model, f.name) is not None)
    return (f"# The base U-ViT for {data.path}, written by `adadiff-bench init`.\n"
            f"# Train it with: adadiff-bench train --config <this file>\n"
            f"[data]\nname = {_toml(data.name)}\npath = {_toml(data.path)}\n\n[model]\n{fields}\n\n"
            f"[train]\n{STOPPING_RULE}steps = 6000\nbatch_size = 128\nlr = 3e-4\nwarmup_steps = 200\n"
            f"ema_decay = 0.999\nema_warmup = true\nholdout = 0.1\neval_every = 250\npatience = 4\n"
            f"checkpoint_every = 250\nseed = 0\nout_dir = {_toml(out_dir)}\nexport = {_toml(export)}\n")


def adadiff_config_text(data: DataConfig, base_checkpoint: str, name: str) -> str:
    """AdaDiff on the base model as the official code trains it (as configs/adadiff_digits_finetuned.toml): the
    official estimator and loss, every weight fine-tuned with the official optimiser, a warmed-up EMA, held-out
    stopping. (A frozen backbone's exits are unusable: the base was never trained to exit early.)"""
    return (f"# AdaDiff for {base_checkpoint}, written by `adadiff-bench init`: every weight fine-tuned, as the\n"
            f"# official code does; the run config trains it on demand (or: adadiff-bench train --config <this file>)\n"
            f"# The {ADADIFF_STEPS:,}-step cap is a first look's budget and may stop short of convergence (the full-depth\n"
            f"# row of the fine-tuned backbone shows what that costs); the digits recipe runs 12,000 steps\n"
            f"# (configs/adadiff_digits_finetuned.toml): raise `steps` for results you publish\n"
            f"[data]\nname = {_toml(data.name)}\npath = {_toml(data.path)}\n\n"
            f"[adadiff]\nbase_checkpoint = {_toml(base_checkpoint)}\nestimator = \"official\"\nheads = \"shared\"\n"
            f"loss = \"official\"\nfreeze_backbone = false\n\n"
            f"[train]\n{STOPPING_RULE}steps = {ADADIFF_STEPS}\nbatch_size = 128\nlr = 4e-4\nweight_decay = 0.03\n"
            f"beta1 = 0.99\nbeta2 = 0.999\nwarmup_steps = 200\nema_decay = 0.9999\nema_warmup = true\nholdout = 0.1\n"
            f"eval_every = 250\npatience = 4\ncheckpoint_every = 250\nseed = 0\n"
            f"out_dir = {_toml(f'results/train/{name}_adadiff')}\nexport = {_toml(f'checkpoints/{name}_adadiff.pt')}\n")


def init(data_path: str, out: str | None = None, checkpoint: str | None = None, force: bool = False) -> list[Path]:
    """Write the run config, AdaDiff's training config and, without `checkpoint`, the base model's; returns
    their paths."""
    data = data_config(data_path)
    dataset = load_dataset(data)
    name = Path(data_path.rstrip("/")).stem or "mydata"
    run_path = Path(out or f"configs/{name}.toml")
    base_path = run_path.with_name(f"{run_path.stem}_train.toml")
    adadiff_path = run_path.with_name(f"{run_path.stem}_adadiff_train.toml")
    existing = [str(p) for p in (run_path, adadiff_path, *([] if checkpoint else [base_path])) if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} already exist(s); pass --force to overwrite or choose another --out")
    texts = {}
    if checkpoint:
        base, model = checkpoint, load_model(checkpoint)
    else:
        architecture = base_model_config(tuple(dataset.images.shape[1:]))
        base, model = f"checkpoints/{name}_uvit.pt", build_model(architecture)
        texts[base_path] = train_config_text(data, architecture, base, f"results/train/{name}_uvit")
    texts[adadiff_path] = adadiff_config_text(data, base, name)
    texts[run_path] = run_config_text(name, data, dataset, base, model, "" if checkpoint else str(base_path),
                                      str(adadiff_path))
    for path, text in texts.items():
        atomic_write_bytes(path, text.encode())
    return list(texts)
