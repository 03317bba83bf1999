"""Published FID reference statistics: `[metrics] reference_stats = "PATH.npz"`.

A file holds `mu` (D) and `sigma` (D x D), the mean and covariance of a reference set's Inception
pool3 features (D = 2048): U-ViT's `fid_stats/*.npz`, ADM's reference batches. With one, FID in the
Inception space compares the samples' statistics with these instead of with reference images
(KID and precision/recall still read the reference images). The FID itself is torch-fidelity's
`metric_fid.fid_statistics_to_metric`, which wants both sides in one dtype: published statistics
are float64, the suite's own are float32 (mean) and float64 (covariance), so each published array
takes the dtype of its counterpart. Files are read with `np.load(allow_pickle=False)`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError

POOL3_DIM = 2048  # Inception-V3's pool3 features, the space every published statistic lives in
APPLIES_TO = "inception"  # the feature space (extractor name) published statistics belong to


def load_reference_stats(path: str | Path, dim: int = POOL3_DIM) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of a published statistics file, checked: one line naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference_stats {str(path)!r} not found; point [metrics] reference_stats at a .npz "
                        "with mu and sigma (e.g. U-ViT's fid_stats)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("mu", "sigma") if key in archive.files}
            found = archive.files
    except (OSError, ValueError) as exc:
        raise UserError(f"reference_stats {str(path)!r} is not a readable .npz ({type(exc).__name__}); "
                        "re-download it") from None
    if set(arrays) != {"mu", "sigma"}:
        raise UserError(f"reference_stats {str(path)!r} needs arrays mu and sigma (found {', '.join(found) or 'none'})")
    check_shapes(arrays["mu"], arrays["sigma"], dim, str(path))
    return arrays


def check_shapes(mu: np.ndarray, sigma: np.ndarray, dim: int, path: str) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UserError(f"reference_stats {path!r} has mu {mu.shape} and sigma {sigma.shape}, but the Inception "
                        f"pool3 space needs ({dim},) and ({dim}, {dim}); use statistics of pool3 features")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise UserError(f"reference_stats {path!r} holds {mu.dtype} / {sigma.dtype} arrays; expected floats")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"reference_stats {path!r} holds NaN or Inf; re-download it")


def matching_dtypes(published: dict[str, np.ndarray], own: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The published arrays cast to the dtypes of the suite's own statistics (torch-fidelity asserts equal dtypes)."""
    return {key: np.asarray(published[key]).astype(np.asarray(own[key]).dtype, copy=False) for key in ("mu", "sigma")}


def fid_to_reference(statistics: dict[str, np.ndarray], published: dict[str, np.ndarray]) -> float:
    """FID between the samples' {"mu", "sigma"} and published ones, by torch-fidelity."""
    from torch_fidelity import KEY_METRIC_FID
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    check_shapes(published["mu"], published["sigma"], len(statistics["mu"]), "given")
    return float(fid_statistics_to_metric(statistics, matching_dtypes(published, statistics), False)[KEY_METRIC_FID])


def sample_statistics_dtypes() -> dict[str, np.dtype]:
    """The dtypes torch-fidelity's own statistics have (float32 features): mean float32, covariance float64."""
    features = np.zeros((2, 1), dtype=np.float32)
    return {"mu": np.mean(features, axis=0).dtype, "sigma": np.cov(features, rowvar=False).dtype}


def published_as_reference(path: str | Path, dim: int = POOL3_DIM) -> dict[str, np.ndarray]:
    """A published file as the reference statistics of a feature space, in the dtypes of the samples' own."""
    dtypes = sample_statistics_dtypes()
    return {key: value.astype(dtypes[key]) for key, value in load_reference_stats(path, dim).items()}
