"""The results store: one folder per run, written atomically (`RunStore`) and read back (`RunReader`).

    results/<run>/results.csv        one row per cell, units in column names (with `backbone_hash`, the hash of
                                     the backbone's weights a cell ran, since it was recorded)
    results/<run>/run.json           schema version, config, versions, git commit, machine, SHA-256s
    results/<run>/exits.npz          step-log summaries of every cell, keys '<cell_id>/<summary>'
    results/<run>/cells/<cell_id>/   row.json, samples.npz (uint8 NHWC, key arr_0), exits.npz,
                                     and any other <name>.npz a method saved (e.g. uncertainty_maps)

A run is built in `results/.<run>.partial/` and renamed into place when complete, so a reader
never sees half a run; a killed run resumes from its partial folder (completed cells are kept).
Both sides find files through one `RunLayout`. Reading never unpickles: archives are opened with
`allow_pickle=False` and JSON with `json`.
"""
from __future__ import annotations

import fcntl
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError

SCHEMA_VERSION = 1
SAMPLES, EXITS = "samples", "exits"  # the per-cell archives every cell has; other names are method artifacts
SAMPLES_KEY = "arr_0"  # the key other evaluators read samples from
FID_BOOTSTRAP = "fid_bootstrap"  # a cell's FID bootstrap: keys '<column>/point' and '<column>/replicates'
STEP_SUMMARIES = ("timesteps", "timestep_exit_histogram", "timestep_block_fraction")  # per-step exits.npz keys


class RunLayout:
    """Where each file of a run lives, under the run's folder (finished) or its partial folder (being written)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.results_csv = self.root / "results.csv"
        self.run_json = self.root / "run.json"
        self.exits_npz = self.root / "exits.npz"  # every cell's summaries, keys '<cell_id>/<summary>'
        self.cells = self.root / "cells"  # one folder per cell
        self.progress_root = self.root / "progress"  # unfinished cells' sampling batches (partial folder only)

    def cell(self, cell_id: str) -> Path:
        return self.cells / _safe_name(cell_id, "cell id")

    def cell_row(self, cell_id: str) -> Path:
        return self.cell(cell_id) / "row.json"

    def cell_archive(self, cell_id: str, name: str) -> Path:
        """`cells/<cell_id>/<name>.npz`: samples, exits or a method's artifact."""
        return self.cell(cell_id) / f"{_safe_name(name, 'artifact name')}.npz"

    def progress(self, cell_id: str) -> Path:
        return self.progress_root / _safe_name(cell_id, "cell id")


def _safe_name(name: str, kind: str) -> str:
    """`name` when it is one plain path component (a results.csv naming '../x' is refused)."""
    name = str(name)
    if name in ("", ".", "..") or any(ch in name for ch in "/\\\0"):
        raise UserError(f"{kind} {name!r} is not a plain folder or file name; "
                        "the results store is damaged: rerun the benchmark")
    return name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it; a failure leaves the old file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_beside(path)
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


def warn(message: str) -> None:
    """One line on stderr, in the CLI's form."""
    print(f"adadiff-bench: warning: {message}", file=sys.stderr, flush=True)


def temporary_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file `.<name>.<pid>.<random>.tmp` beside `path`, after deleting the ones
    that writers of `path` which no longer run (killed) left there."""
    remove_stale_temporaries(path)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Delete `.<name>.<pid>.*.tmp` beside `path` whose process is gone (a temporary of a running writer stays)."""
    prefix = f".{path.name}."
    for stray in Path(path).parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = stray.name[len(prefix):].split(".")[0]
        if not (pid.isdigit() and process_alive(int(pid))):
            stray.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True


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

    @property
    def layout(self) -> RunLayout:
        """The files of the run being written (under its partial folder)."""
        return RunLayout(self.partial)

    def cell_dir(self, cell_id: str) -> Path:
        return self.layout.cell(cell_id)

    def progress_dir(self, cell_id: str) -> Path:
        """Where a cell's finished sampling batches wait until the cell is complete (a killed cell resumes)."""
        return self.layout.progress(cell_id)

    def acquire_lock(self) -> None:
        """Hold the run's lock file while it is written; a second writer of the same run is refused."""
        make_dir(self.root)
        try:
            handle = open(self.lock_path, "a+")
        except OSError as exc:
            raise UserError(f"cannot write in results folder {str(self.root)!r} ({exc.strerror or exc}); "
                            "fix its permissions or choose another results_dir") from None
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
        """The cells of the partial folder that are complete and intact; a damaged cell is deleted with a
        one-line warning, so that it is computed again."""
        cells = self.layout.cells
        if not cells.is_dir():
            return set()
        done = set()
        for cell_id in sorted(p.name for p in cells.iterdir() if self.layout.cell_row(p.name).is_file()):
            try:
                self.verify_cell(cell_id)
                done.add(cell_id)
            except UserError as exc:
                damage = f"{str(exc.path)!r} is damaged ({exc.reason})" if isinstance(exc, DamagedFile) else str(exc)
                warn(f"{damage}; cell {cell_id} will be computed again")
                shutil.rmtree(self.cell_dir(cell_id), ignore_errors=True)
        return done

    def verify_cell(self, cell_id: str) -> None:
        """Parse a finished cell in full: its row names it, and its samples, exits and artifacts all read."""
        row = read_json(self.layout.cell_row(cell_id))
        if row.get("cell_id") != cell_id:
            raise DamagedFile(self.layout.cell_row(cell_id), f"it names cell {row.get('cell_id')!r}")
        wrong = row_fields_of_the_wrong_kind(row)
        if wrong:
            raise DamagedFile(self.layout.cell_row(cell_id), f"no valid {', '.join(wrong)}")
        for name in (SAMPLES, EXITS):
            if not self.layout.cell_archive(cell_id, name).is_file():
                raise DamagedFile(self.layout.cell_archive(cell_id, name), "missing")
        for archive in sorted(self.cell_dir(cell_id).glob("*.npz")):
            arrays = read_npz(archive)
            samples = arrays.get(SAMPLES_KEY) if archive.name == f"{SAMPLES}.npz" else None
            if archive.name == f"{SAMPLES}.npz" and (samples is None or samples.dtype != np.uint8):
                raise DamagedFile(archive, f"no uint8 {SAMPLES_KEY}")

    def remove_leftovers(self) -> None:
        """What a killed run leaves besides its partial folder: temporary files of interrupted writes and
        the previous run a killed `--overwrite` had set aside (call with the lock held)."""
        remove_stray_temporaries(self.partial)
        shutil.rmtree(self.root / f".{self.final.name}.old", ignore_errors=True)

    def write_cell(self, cell_id: str, row: dict, samples_nhwc: np.ndarray, summaries: dict[str, np.ndarray],
                   artifacts: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """Samples, exits and artifacts first, row.json last: a cell counts as done only once its row exists."""
        layout = self.layout
        write_npz(layout.cell_archive(cell_id, SAMPLES), **{SAMPLES_KEY: samples_nhwc})
        write_npz(layout.cell_archive(cell_id, EXITS), **summaries)
        for name, arrays in (artifacts or {}).items():
            write_npz(layout.cell_archive(cell_id, name), **arrays)
        write_json(layout.cell_row(cell_id), row)
        shutil.rmtree(self.progress_dir(cell_id), ignore_errors=True)  # its batches are in samples.npz now

    def read_cell_row(self, cell_id: str) -> dict:
        return read_json(self.layout.cell_row(cell_id))

    def finish(self, rows: list[dict], run_info: dict, cell_ids: list[str]) -> Path:
        """Assemble results.csv and exits.npz from the cells, then move the run into place."""
        layout = self.layout
        write_csv(layout.results_csv, pd.DataFrame(rows))
        exits = {}
        for cell_id in cell_ids:
            arrays = read_npz(layout.cell_archive(cell_id, EXITS))
            exits.update({f"{cell_id}/{key}": value for key, value in arrays.items()})
        write_npz(layout.exits_npz, **exits)
        write_json(layout.run_json, run_info)
        shutil.rmtree(layout.progress_root, ignore_errors=True)
        remove_stray_temporaries(self.partial)
        old = self.root / f".{self.final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        try:
            if self.final.exists():  # --overwrite: set the old run aside, put the new one in place, delete the old
                os.replace(self.final, old)
            os.replace(self.partial, self.final)
        except OSError as exc:
            raise UserError(f"cannot move the finished run into {str(self.final)!r} ({exc.strerror or exc}); "
                            "fix the results folder's permissions, then rerun the same command to finish") from None
        shutil.rmtree(old, ignore_errors=True)
        return self.final


ARCHIVE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)  # what a damaged .npz raises on reading


def fid_bootstrap_arrays(kept: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`quality.compute_quality`'s kept arrays as the FID_BOOTSTRAP archive's flat keys."""
    return {f"{column}/{name}": np.asarray(array) for column, arrays in kept.items() for name, array in arrays.items()}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, read in full (each member's CRC-32 is checked as it is read), never
    unpickling: an object array or a damaged archive is refused with one line naming the file."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DamagedFile(path, "a single .npy array, not an .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(f"{str(path)!r} holds pickled objects, which the results store never loads; "
                            "rewrite it with plain numeric arrays (rerun the benchmark)") from None
        raise DamagedFile(path, exc) from None
    except ARCHIVE_ERRORS as exc:
        raise DamagedFile(path, exc) from None


class DamagedFile(UserError):
    """A file of the results store that does not parse (truncated, overwritten, not what its name says)."""

    def __init__(self, path: Path, cause: BaseException | str):
        if not isinstance(cause, str):
            cause = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:120]}"
        reason = cause
        super().__init__(f"{str(path)!r} is damaged ({reason}); delete it and rerun the command that wrote it")
        self.path, self.reason = Path(path), reason


def read_json(path: Path) -> dict:
    """A JSON object from the results store, with a one-line error naming the file when it does not parse."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DamagedFile(path, exc) from None
    if not isinstance(value, dict):
        raise DamagedFile(path, f"a JSON {type(value).__name__}, not an object")
    return value


def remove_stray_temporaries(folder: Path) -> list[Path]:
    """Delete the `.<name>.*.tmp` files a killed atomic write left under `folder` (only while no writer runs)."""
    strays = [p for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for stray in strays:
        stray.unlink(missing_ok=True)
    return strays


class RunReader:
    """The one way into a finished run for everything that reads results (reports, notebooks).

    `name` and `info` come from run.json, `frame()` is results.csv; `samples`, `exits` and `artifact`
    read one cell's archives and give None when the cell lacks them. Nothing is ever unpickled.
    """

    def __init__(self, run_dir: str | Path):
        self.layout = RunLayout(run_dir)
        if not self.layout.results_csv.is_file() or not self.layout.run_json.is_file():
            raise UserError(f"{str(self.layout.root)!r} is not a finished run (no results.csv/run.json); "
                            "run `adadiff-bench run --config ...` first")
        self.info: dict = read_json(self.layout.run_json)
        check_run_info(self.info, self.layout.run_json)
        self._frame: pd.DataFrame | None = None
        self._fid_bootstraps: dict[str, dict[str, tuple[float, np.ndarray]]] = {}  # (a report reads each twice)

    def require(self, *tables: str) -> None:
        """Refuse (one line) a run.json without these tables and the fields reports read from them."""
        check_run_info(self.info, self.layout.run_json, tables)

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def name(self) -> str:
        """The run's name as configured (the folder's name when run.json lacks it)."""
        return self.info.get("config", {}).get("name") or self.path.name

    def frame(self) -> pd.DataFrame:
        """results.csv: one row per cell (a fresh copy on each call)."""
        if self._frame is None:
            self._frame = read_results_csv(self.layout.results_csv)
        return self._frame.copy()

    @property
    def cell_ids(self) -> list[str]:
        """The cells of the run, in the order of results.csv."""
        frame = self.frame()
        return [str(c) for c in frame["cell_id"]] if "cell_id" in frame.columns else []

    def samples(self, cell_id: str) -> np.ndarray | None:
        """A cell's generated images, uint8 N x H x W x C, or None when the cell kept none."""
        arrays = self.artifact(cell_id, SAMPLES)
        return None if arrays is None else arrays[SAMPLES_KEY]

    def exits(self, cell_id: str) -> dict[str, np.ndarray] | None:
        """A cell's step-log summaries, or None when it has none or lacks the per-step ones (`STEP_SUMMARIES`)."""
        arrays = self.artifact(cell_id, EXITS)
        return arrays if arrays is not None and all(key in arrays for key in STEP_SUMMARIES) else None

    def artifact(self, cell_id: str, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of `cells/<cell_id>/<name>.npz` (e.g. name="uncertainty_maps"), or None when absent."""
        path = self.layout.cell_archive(cell_id, name)
        return read_npz(path) if path.is_file() else None

    def fid_bootstrap(self, cell_id: str) -> dict[str, tuple[float, np.ndarray]]:
        """A cell's FID bootstrap per column, {column: (point, replicates)}; {} when it has none. Arrays of any
        other shape or kind are left out (the file may have been edited). Read once per reader."""
        if cell_id in self._fid_bootstraps:
            return self._fid_bootstraps[cell_id]
        arrays = self.artifact(cell_id, FID_BOOTSTRAP) or {}
        kept = {}
        for key, point in arrays.items():
            column, _, part = key.rpartition("/")
            replicates = arrays.get(f"{column}/replicates")
            if part == "point" and point.shape == () and replicates is not None and replicates.ndim == 1 \
                    and point.dtype.kind == "f" and replicates.dtype.kind == "f":
                kept[column] = (float(point), replicates.astype(float))
        self._fid_bootstraps[cell_id] = kept
        return kept

    def verify_archives(self) -> None:
        """Every cell archive's CRC-32s, checked without building its arrays: a damaged one stops a reader with
        one line naming it before the reader writes anything."""
        for cell_id in self.cell_ids:
            folder = self.layout.cell(cell_id)
            for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
                try:
                    with zipfile.ZipFile(path) as archive:
                        bad = archive.testzip()
                except ARCHIVE_ERRORS as exc:
                    raise DamagedFile(path, exc) from None
                if bad is not None:
                    raise DamagedFile(path, f"member {bad!r} fails its CRC check")

    def artifact_names(self, cell_id: str) -> list[str]:
        """The names of the archives a method saved for the cell besides its samples and exits, sorted."""
        folder = self.layout.cell(cell_id)
        names = (p.name.removesuffix(".npz") for p in folder.glob("*.npz")) if folder.is_dir() else ()
        return sorted(n for n in names if n not in (SAMPLES, EXITS))


# ---- what readers rely on: checked once, on opening, with one line naming the file --------------------

RUN_JSON_TABLES = {"config": (), "data": ("name", "num_images", "sha256"), "machine": ("torch_threads",),
                   "reference": ("solver", "num_steps")}
TEXT_COLUMNS = ("cell_id", "method", "params", "solver")
BACKBONE_HASH = "backbone_hash"  # optional: SHA-256 of the weights of the backbone a cell ran (`backbone_id`)
NUMBER_COLUMNS = ("num_steps", "num_samples", "seed", "layer_ratio")
OTHER_CORES = "timing_other_cores"  # optional: cores other processes kept busy while a cell was timed (`timing`)
BUSY_ELSEWHERE = 0.5  # cores: at or above this, a cell's times are suspect (`run` warns; reports say which)


def check_run_info(info: dict, path: Path, needed: tuple[str, ...] = ()) -> None:
    """run.json of this schema version (one that states none is read as this one) whose tables are tables, and
    the `needed` tables with the fields that reports read from them."""
    version = info.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"{str(path)!r} has results schema version {version!r}, but this adadiff-bench reads "
                        f"version {SCHEMA_VERSION}; rerun the benchmark with this version, or report the run with "
                        "the version that wrote it")
    for table, fields in RUN_JSON_TABLES.items():
        value = info.get(table)
        if value is None and table not in needed:
            continue
        if not isinstance(value, dict):
            raise DamagedFile(path, f"its {table!r} is {'missing' if value is None else 'not a table'}")
        missing = [f for f in fields if f not in value] if table in needed else []
        if missing:
            raise DamagedFile(path, f"it lacks {', '.join(f'{table}.{f}' for f in missing)}")


def row_fields_of_the_wrong_kind(row: dict) -> list[str]:
    """The fields every report reads that a cell's row lacks or holds as the wrong kind of value."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    wrong = [c for c in TEXT_COLUMNS if not isinstance(row.get(c), str)]
    wrong += [c for c in NUMBER_COLUMNS if not number(row.get(c))]
    return wrong + ([] if isinstance(row.get("valid"), bool) else ["valid"])


def read_results_csv(path: Path) -> pd.DataFrame:
    """results.csv with at least one row and the columns every report reads, of the right kinds."""
    try:
        frame = pd.read_csv(path, dtype={BACKBONE_HASH: str})  # (runs before the column: absent, one unknown group)
    except (OSError, ValueError) as exc:  # (empty, binary, ragged rows)
        raise DamagedFile(path, exc) from None
    missing = [c for c in (*TEXT_COLUMNS, *NUMBER_COLUMNS, "valid") if c not in frame.columns]
    if missing:
        raise DamagedFile(path, f"no column {', '.join(missing)}")
    if frame.empty:
        raise DamagedFile(path, "no rows")
    not_numbers = [c for c in NUMBER_COLUMNS if not pd.api.types.is_numeric_dtype(frame[c]) or frame[c].isna().any()]
    if not_numbers or not frame["valid"].isin([True, False]).all():
        raise DamagedFile(path, f"column {', '.join(not_numbers or ['valid'])} holds values of the wrong kind")
    return frame
