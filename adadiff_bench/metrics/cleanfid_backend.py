"""clean-fid as a cross-check backend for FID (torch-fidelity remains the main engine).

clean-fid (Parmar, Zhang and Zhu, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation",
CVPR 2022) computes FID with the TensorFlow Inception-V3 graph exported to TorchScript
(`inception-2015-12-05.pt`). Its "clean" mode resizes every image to 299x299 *outside* the network,
one channel at a time, with PIL's antialiased bicubic filter on float32 values (no uint8 rounding after
the resize), and feeds the network values in [0, 255], which the wrapper maps to [-1, 1].

This module reproduces that pipeline on in-memory uint8 tensors (no PNG round trip, CPU only), and
computes the Frechet distance with clean-fid's own `frechet_distance` on statistics formed the way
clean-fid forms them. Nothing is ever downloaded: the model file must already be on disk.

A TorchScript file is a program, and clean-fid's default folder is `/tmp`, which every user can write
to: a model file there is used only when it is a regular file owned by the user running the suite and
writable by nobody else (`check_private_file`); otherwise the run is refused before any work, with the
fix (a folder of one's own, set as `cleanfid_model`). A configured `cleanfid_model` is trusted as the
user's choice.
"""
from __future__ import annotations

import os
import platform
import stat
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer

from ..errors import UserError

CLEANFID_MODEL_FILE = "inception-2015-12-05.pt"
CLEAN_SIZE = (299, 299)
FEATURE_DIM = 2048


def cleanfid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of N x D features as clean-fid forms them (np.mean, np.cov with rows as samples)."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def cleanfid_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two N x D feature arrays, by clean-fid's statistics and `frechet_distance`."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features must be two N x D arrays with the same D, "
                         f"got {features_a.shape} and {features_b.shape}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError(f"FID needs at least 2 feature rows per set, got {len(features_a)} and {len(features_b)}")
    mu_a, sigma_a = cleanfid_statistics(features_a)
    mu_b, sigma_b = cleanfid_statistics(features_b)
    return float(cleanfid_fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def cleanfid_default_model_dir() -> Path:
    """The folder where clean-fid itself keeps its Inception file (cleanfid/features.py: ./ on Windows, /tmp else)."""
    return Path("./") if platform.system() == "Windows" else Path("/tmp")


def resolve_cleanfid_model(configured: str | None) -> Path | None:
    """The folder holding clean-fid's Inception file: the configured one, else clean-fid's default, else None."""
    if configured:
        return configured_model_dir(Path(configured).expanduser())
    default = cleanfid_default_model_dir()
    if not (default / CLEANFID_MODEL_FILE).is_file():
        return None
    check_private_file(default / CLEANFID_MODEL_FILE)
    return default


def check_private_file(path: Path) -> None:
    """Refuse a file in a shared folder that another user could have put there or could change (POSIX)."""
    if not hasattr(os, "getuid"):  # (on Windows clean-fid's default folder is the current one, not a shared one)
        return
    info = path.lstat()
    problem = ("is a symbolic link" if stat.S_ISLNK(info.st_mode) else
               "is not a regular file" if not stat.S_ISREG(info.st_mode) else
               f"belongs to user id {info.st_uid}, not to you" if info.st_uid != os.getuid() else
               "can be changed by other users" if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else None)
    if problem:
        raise UserError(f"clean-fid model {str(path)!r} {problem}, and a TorchScript file runs as code; move your own "
                        f"copy to a folder only you can write and set [metrics] cleanfid_model = PATH")


def configured_model_dir(path: Path) -> Path:
    """The folder of a configured model path (the file itself or a folder holding it); UserError if absent."""
    if path.is_file() and path.name == CLEANFID_MODEL_FILE:
        return path.parent
    if path.is_dir() and (path / CLEANFID_MODEL_FILE).is_file():
        return path
    if path.is_file():
        raise UserError(f"clean-fid model {str(path)!r} must be named {CLEANFID_MODEL_FILE} (clean-fid loads it by "
                        f"that name); rename it or set [metrics] cleanfid_model to its folder")
    raise UserError(f"clean-fid model {str(path)!r} not found (expected {CLEANFID_MODEL_FILE} or a folder "
                    f"holding it); set [metrics] cleanfid_model to an existing file or folder")


def load_cleanfid_inception(model_dir: Path) -> InceptionV3W:
    """clean-fid's Inception wrapper in "clean" mode (no resize inside), loaded from `model_dir`, never downloaded."""
    return InceptionV3W(str(model_dir), download=False, resize_inside=False).to("cpu").eval()


def clean_resized(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 N x 3 x 299 x 299 in [0, 255], by clean-fid's PIL bicubic resizer."""
    resize = make_resizer("PIL", False, "bicubic", CLEAN_SIZE)
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    # clean-fid resizes H x W x 3 numpy images, as PIL.Image.convert("RGB") would give them
    resized = [resize(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in rgb]
    return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2)).contiguous()


@torch.no_grad()
def cleanfid_inception_features(images: torch.Tensor, model_dir: Path, batch_size: int = 64) -> np.ndarray:
    """N x 2048 float32 clean-fid "clean" Inception features of uint8 N x C x H x W images (C = 1 or 3), on CPU."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be a uint8 N x C x H x W tensor with C = 1 or 3, "
                         f"got {images.dtype} {tuple(images.shape)}")
    model = load_cleanfid_inception(model_dir)
    batches = [model(clean_resized(batch)).numpy() for batch in images.split(batch_size)]
    return np.concatenate(batches) if batches else np.zeros((0, FEATURE_DIM), dtype=np.float32)
