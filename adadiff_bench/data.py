"""Data sets as uint8 NCHW tensors (the form metrics read) plus labels.

`digits` is scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, values 0..16), the
built-in benchmark. Users bring their own as a `folder` of PNG/JPEG files or an `npz` holding uint8
NHWC images under `arr_0` (the format other evaluators read), labels optional under `labels`.
"""
from __future__ import annotations

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Dataset:
    name: str
    images: torch.Tensor          # uint8, N C H W
    labels: torch.Tensor | None   # int64, N (or None when unlabelled)
    sha256: str                   # of the image bytes, recorded in run.json

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.labels is not None else 0

    def as_model_input(self) -> torch.Tensor:
        """uint8 [0, 255] -> float32 [-1, 1]."""
        return to_model_range(self.images)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to nearest (the inverse of `to_model_range`)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_dataset(config: DataConfig) -> Dataset:
    if config.name == "digits":
        images, labels = _digits()
    elif config.name == "folder":
        images, labels = _folder(Path(config.path))
    else:
        images, labels = _npz(Path(config.path))
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    return Dataset(config.name, tensor, None if labels is None else torch.from_numpy(labels.astype(np.int64)), digest)


def check_matches_model(data: Dataset, img_size: int, in_chans: int) -> None:
    """Refuse data the model cannot have been trained on (resolution or channel count)."""
    _, channels, height, width = data.images.shape
    if (height, width) != (img_size, img_size) or channels != in_chans:
        raise UserError(f"data set {data.name!r} has images of {channels}x{height}x{width} (CxHxW) but the model "
                        f"expects {in_chans}x{img_size}x{img_size}; resize the data or use a matching checkpoint")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    # values 0..16 -> 0..255, exactly the uint8 image of v/8 - 1 in [-1, 1]
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target


def _folder(path: Path) -> tuple[np.ndarray, None]:
    if not path.is_dir():
        raise UserError(f"image folder {str(path)!r} does not exist; set [data] path to a folder of PNG/JPEG files")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"image folder {str(path)!r} holds no .png/.jpg/.jpeg files; point [data] path at your images")
    arrays = [_read_image(file) for file in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images in {str(path)!r} differ in size or channels ({sorted(shapes)[:3]}...); "
                        "resize them to one resolution first")
    images = np.stack(arrays)
    return (images[..., None] if images.ndim == 3 else images), None


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of a 16-bit grayscale PNG


def _read_image(file: Path) -> np.ndarray:
    """One image file as uint8 H x W (grayscale) or H x W x 3, 16-bit grayscale rescaled (65535 -> 255)."""
    from PIL import Image
    if not file.is_file():
        raise UserError(f"{str(file)!r} is not a readable image file (a folder or a broken link); "
                        "remove or rename it, or point [data] path at a folder of image files only")
    try:
        with Image.open(file) as image:
            image.load()  # decode now: a truncated file fails here, inside the try
            if image.mode in SIXTEEN_BIT_MODES:
                return _sixteen_bit_to_uint8(np.asarray(image), file)
            return np.asarray(image.convert("L" if image.mode == "1" or image.mode == "L" else "RGB"))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise UserError(f"{str(file)!r} is not a readable image ({type(exc).__name__}: {_first_line(exc)}); "
                        "replace it with a valid PNG/JPEG or remove it from the folder") from None


def _sixteen_bit_to_uint8(values: np.ndarray, file: Path) -> np.ndarray:
    """16-bit grayscale 0..65535 -> uint8 0..255, rounding to nearest (8-bit v stored as 257 v comes back as v)."""
    if values.min() < 0 or values.max() > 65535:
        raise UserError(f"{str(file)!r} holds values outside 0..65535 ({values.min()}..{values.max()}); "
                        "save it as an 8- or 16-bit PNG")
    return np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise UserError(f"npz file {str(path)!r} does not exist; set [data] path to a .npz with uint8 NHWC images in arr_0")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: this is a single .npy array, not an .npz archive; "
                            "save images with np.savez(path, images)")
        with archive:
            if "arr_0" not in archive:
                raise UserError(f"{path}: no array named arr_0 (found {', '.join(archive.files) or 'none'}); "
                                "save images with np.savez(path, images)")
            images = archive["arr_0"]
            labels = archive["labels"] if "labels" in archive else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"{path}: cannot read as .npz ({_first_line(exc)}); write it with numpy.savez "
                        "(plain numeric arrays, no objects)") from None
    if images.dtype != np.uint8:
        raise UserError(f"{path}: arr_0 has dtype {images.dtype}, expected uint8 in [0, 255]; convert with "
                        "(x * 255).round().astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: arr_0 has shape {images.shape}, expected N x H x W x C with C = 1 or 3 (NHWC); "
                        "save grayscale or RGB images in that layout")
    if len(images) == 0 or 0 in images.shape[1:3]:
        raise UserError(f"{path}: arr_0 holds no images (shape {images.shape}); "
                        "save at least 2 images (np.savez(path, images))")
    return images, None if labels is None else _checked_labels(labels, len(images), path)


def _checked_labels(labels: np.ndarray, count: int, path: Path) -> np.ndarray:
    """Class labels: one non-negative integer per image."""
    fix = "save one non-negative integer class per image (np.savez(path, images, labels=labels.astype(np.int64)))"
    if labels.dtype.kind not in "iu":
        raise UserError(f"{path}: labels have dtype {labels.dtype}, expected integers; {fix}")
    if labels.shape != (count,):
        raise UserError(f"{path}: labels have shape {labels.shape} for {count} images; {fix}")
    if count and labels.min() < 0:
        raise UserError(f"{path}: labels hold a negative class ({labels.min()}); {fix}")
    return labels
