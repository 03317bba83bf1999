"""The reference images' features and statistics on disk, in a format that cannot run code.

Each cache file is an `.npz` of named arrays plus `sha256`, a checksum of those arrays (names, dtypes,
shapes and bytes). Files are read with `allow_pickle=False`, so an archive holding Python objects is
refused rather than unpickled. A file that is absent is computed and written atomically; a file that
cannot be read, holds other arrays or fails its checksum (truncated, corrupt, planted) is recomputed
and rewritten, with a one-line warning naming it. torch-fidelity's own cache (`torch.load` with
`weights_only=False`) is never used: the suite hands it `cache=False`.

The checksum catches accidents, not forgery: whoever can write the results folder can also write a
consistent file with wrong numbers, as they could edit `results.csv`. What no file here can do is run code.
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..results import atomic_write_bytes

CHECKSUM = "sha256"


def cache_file(cache_dir: str | Path, *parts: str) -> Path:
    """`<cache_dir>/<part>-<part>-....npz`, each part reduced to file-name-safe characters."""
    return Path(cache_dir) / ("-".join(re.sub(r"[^A-Za-z0-9_.=+-]+", "_", part) for part in parts) + ".npz")


def payload_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def cached_arrays(path: Path, names: Iterable[str], compute: Callable[[], dict[str, np.ndarray]]) -> dict:
    """The arrays `names` from the cache file `path`; computed (and written) when it is absent or damaged."""
    arrays = read_arrays(path, tuple(names))
    if arrays is None:
        arrays = {name: np.asarray(value) for name, value in compute().items()}
        write_arrays(path, arrays)
    return arrays


def read_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The verified arrays of a cache file, or None when it is absent or damaged (then with a warning)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        arrays, stored = _load(path, names)
    except Exception as exc:  # (whatever the file holds, failing to read it means recomputing it)
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    else:
        if stored == payload_sha256(arrays):
            return arrays
        problem = "its checksum does not match its arrays"
    warnings.warn(f"reference cache file {str(path)!r} is damaged ({problem}); recomputing it", stacklevel=3)
    return None


def _load(path: Path, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str]:
    """The arrays and the stored checksum of an .npz file holding exactly `names` and the checksum."""
    with open(path, "rb") as handle:  # (our handle: closed even when numpy fails half way)
        archive = np.load(handle, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        if sorted(archive.files) != sorted((*names, CHECKSUM)):
            raise ValueError(f"holds {sorted(archive.files)}, not {sorted((*names, CHECKSUM))}")
        stored = archive[CHECKSUM]
        if stored.dtype.kind != "U" or stored.shape != ():
            raise ValueError("its checksum is not a string")
        return {name: archive[name] for name in names}, str(stored)


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The arrays and their checksum as one .npz, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{CHECKSUM: np.array(payload_sha256(arrays))})
    atomic_write_bytes(path, buffer.getvalue())
