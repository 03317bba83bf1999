"""The results store: one folder per run, written atomically.

    results/<run>/results.csv        one row per cell, units in column names
    results/<run>/run.json           schema version, config, versions, git commit, machine, SHA-256s
    results/<run>/exits.npz          step-log summaries of every cell, keys '<cell_id>/<summary>'
    results/<run>/cells/<cell_id>/   row.json, samples.npz (uint8 NHWC, key arr_0), exits.npz

A run is built in `results/.<run>.partial/` and renamed into place when complete, so a reader
never sees half a run; a killed run resumes from its partial folder (completed cells are kept).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError

SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it; a failure leaves the old file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {str(path)!r} ({exc.strerror or exc}); free space or fix permissions, "
                        "then rerun the same command to resume") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _serialise(write: Callable[[io.BytesIO], None]) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    atomic_write_bytes(path, _serialise(lambda buf: np.savez_compressed(buf, **arrays)))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def make_dir(path: Path) -> None:
    """mkdir -p with a one-line error when the path cannot be created."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise UserError(f"cannot create results folder {str(path)!r} ({exc.strerror or exc}); "
                        "choose another results_dir or fix the path") from None


class RunStore:
    """Paths and atomic writes for one named run."""

    def __init__(self, results_dir: str | Path, name: str):
        self.root = Path(results_dir)
        self.final = self.root / name
        self.partial = self.root / f".{name}.partial"
        self.lock_path = self.root / f".{name}.lock"
        self._lock = None

    def cell_dir(self, cell_id: str) -> Path:
        return self.partial / "cells" / cell_id

    def progress_dir(self, cell_id: str) -> Path:
        """Where a cell's finished sampling batches wait until the cell is complete (a killed cell resumes)."""
        return self.partial / "progress" / cell_id

    def acquire_lock(self) -> None:
        """Hold the run's lock file while it is written; a second writer of the same run is refused."""
        make_dir(self.root)
        handle = open(self.lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"run {self.final.name!r} is being written by another process right now "
                            f"(lock {self.lock_path}); wait for it to finish or pick another `name`") from None
        self._lock = handle

    def release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def completed_cells(self) -> set[str]:
        cells = self.partial / "cells"
        if not cells.is_dir():
            return set()
        return {p.name for p in cells.iterdir() if (p / "row.json").is_file()}

    def write_cell(self, cell_id: str, row: dict, samples_nhwc: np.ndarray, summaries: dict[str, np.ndarray],
                   artifacts: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """Samples, exits and artifacts first, row.json last: a cell counts as done only once its row exists."""
        folder = self.cell_dir(cell_id)
        write_npz(folder / "samples.npz", arr_0=samples_nhwc)
        write_npz(folder / "exits.npz", **summaries)
        for name, arrays in (artifacts or {}).items():
            write_npz(folder / f"{name}.npz", **arrays)
        write_json(folder / "row.json", row)
        shutil.rmtree(self.progress_dir(cell_id), ignore_errors=True)  # its batches are in samples.npz now

    def read_cell_row(self, cell_id: str) -> dict:
        return json.loads((self.cell_dir(cell_id) / "row.json").read_text())

    def finish(self, rows: list[dict], run_info: dict, cell_ids: list[str]) -> Path:
        """Assemble results.csv and exits.npz from the cells, then move the run into place."""
        write_csv(self.partial / "results.csv", pd.DataFrame(rows))
        exits = {}
        for cell_id in cell_ids:
            with np.load(self.cell_dir(cell_id) / "exits.npz") as archive:
                exits.update({f"{cell_id}/{key}": archive[key] for key in archive.files})
        write_npz(self.partial / "exits.npz", **exits)
        write_json(self.partial / "run.json", run_info)
        shutil.rmtree(self.partial / "progress", ignore_errors=True)
        old = None
        if self.final.exists():
            old = self.root / f".{self.final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """(results table, run.json) of a finished run."""
    run_dir = Path(run_dir)
    csv, info = run_dir / "results.csv", run_dir / "run.json"
    if not csv.is_file() or not info.is_file():
        raise UserError(f"{str(run_dir)!r} is not a finished run (no results.csv/run.json); "
                        "run `adadiff-bench run --config ...` first")
    return pd.read_csv(csv), json.loads(info.read_text())
