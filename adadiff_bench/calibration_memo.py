"""Calibration runs remembered on disk, so that a resumed run does not sample its calibration sets again.

A compute target's threshold search (AdaDiff's `target_layer_ratio`) samples its calibration set a dozen
times or more; at 1,000 DDPM steps on 2 cores that is minutes per target, paid again at every resume.
Each of those runs is a pure function of what it samples with: the cell's setting, the knobs, the
number of images, the seed, the batch size, precision and device, and the bytes of the checkpoints. The
memo keys one measured layer ratio by a hash of all of these (and the suite's and torch's versions),
so a resumed run replays the search from disk and lands on the same threshold, bit for bit.

Memo files live in `<results_dir>/.adadiff_cache/layer_ratios/`. They are read as data only: a file that
does not parse, or holds anything but a layer ratio in [0, 1], is ignored and measured again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .checkpoints import sha256_file
from .results import DamagedFile, read_json, write_json

MeasureLayerRatio = Callable[[object, int, int], float]   # (knobs, num_samples, seed) -> layer ratio


def memo_folder(results_dir: str | Path) -> Path:
    return Path(results_dir) / ".adadiff_cache" / "layer_ratios"


def file_digest(path: object) -> str:
    """The SHA-256 of a knob that names a file or folder; '' for any other knob value."""
    return sha256_file(path) if isinstance(path, (str, Path)) and str(path) and Path(path).exists() else ""


def remembered(measure: MeasureLayerRatio, folder: Path, setting: dict) -> MeasureLayerRatio:
    """`measure` that first looks for its answer under `folder`, and stores what it measures there.

    `setting` holds everything the measurement depends on besides its arguments (JSON-serialisable)."""
    def layer_ratio_of(knobs, num_samples: int, seed: int) -> float:
        key = {**setting, "knobs": repr(knobs), "knob_checkpoint_sha256": file_digest(getattr(knobs, "checkpoint", "")),
               "num_samples": num_samples, "seed": seed, "suite": __version__, "torch": torch.__version__}
        path = folder / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"
        stored = stored_ratio(path)
        if stored is not None:
            return stored
        ratio = float(measure(knobs, num_samples, seed))
        write_json(path, {"layer_ratio": ratio, "key": key})
        return ratio
    return layer_ratio_of


def stored_ratio(path: Path) -> float | None:
    """The layer ratio a memo file holds, or None when it is missing or holds anything else."""
    if not path.is_file():
        return None
    try:
        value = read_json(path).get("layer_ratio")
    except DamagedFile:
        return None
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if valid and 0.0 <= value <= 1.0 else None


def cell_setting(cell) -> dict:
    """A cell's fields without its seed (a calibration samples with its own seed), as JSON-friendly values."""
    fields = dataclasses.asdict(cell)
    fields.pop("seed", None)
    return {name: repr(value) for name, value in fields.items()}
