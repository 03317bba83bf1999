"""`adadiff-bench example-data OUT`: a folder of colour PNGs to try the your-own-data path on, made offline from
the built-in digits (scikit-learn's 1,797 8x8 scans). Each digit is enlarged to `size` pixels (bilinear) and its
ink painted in a colour drawn per image from a seeded generator, on black. It stands in for a user's images:
unlabelled, RGB, a size no packaged feature space reads; it is not a benchmark data set.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .data import _digits
from .errors import UserError

MAX_SIZE = 256
INK_RANGE = (0.35, 1.0)  # each colour channel's share of full ink: bright colours, never black on black


def example_images(size: int, count: int, seed: int) -> np.ndarray:
    """`count` digits as uint8 N x size x size x 3: enlarged, then tinted by a seeded colour per image."""
    digits, _ = _digits()
    colours = np.random.default_rng(seed).uniform(*INK_RANGE, (count, 3))
    grey = np.stack([np.asarray(Image.fromarray(image[..., 0]).resize((size, size), Image.BILINEAR))
                     for image in digits[:count]]).astype(np.float64)
    return np.round(grey[..., None] * colours[:, None, None, :]).astype(np.uint8)


def check_arguments(out: Path, size: int, count: int) -> None:
    available = len(_digits()[0])
    if not 8 <= size <= MAX_SIZE:
        raise UserError(f"--size must be between 8 and {MAX_SIZE} pixels (got {size})")
    if not 1 <= count <= available:
        raise UserError(f"--count must be between 1 and {available}, the number of built-in digits (got {count})")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new folder (example-data never writes into an existing one)")


def write_example_data(out: str | Path, size: int = 16, count: int = 1797, seed: int = 0) -> Path:
    """Write the PNGs into a new folder `out`, all or nothing (built beside it, then renamed)."""
    out = Path(out)
    check_arguments(out, size, count)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        for index, image in enumerate(example_images(size, count, seed)):
            Image.fromarray(image).save(partial / f"{index:04d}.png")
        os.replace(partial, out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); free space or fix permissions") from None
    return out
