"""What tables and figures read: the rows of one or several finished runs, merged, and a reader per run.

`load_runs` opens each run through `RunReader` (the only way into the results store), checks that the
runs measured quality the same way, and adds the columns every report needs: `run` (the run's name),
`family` (the method family as recorded; "other" for rows without one), the run's reference cost
on every row (`reference_gflops`, `reference_time_s`) and its base model's path (`run_checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..plugins import load_plugins
from ..results import RunReader

UNKNOWN_FAMILY = "other"


@dataclass(frozen=True, eq=False)
class ReportView:
    """The merged rows of the runs a report shows, each run's run.json and its reader.

    Figures take one of these: `frame` for numbers, `samples`/`exits`/`artifact` for a row's cell
    archives (found through the row's `run`), never paths.
    """
    frame: pd.DataFrame
    infos: dict[str, dict] = field(default_factory=dict)        # run name -> run.json
    readers: dict[str, RunReader] = field(default_factory=dict)  # run name -> its reader

    @property
    def valid(self) -> pd.DataFrame:
        """The rows whose numbers count (a cell marked invalid is left out of figures)."""
        return self.frame[self.frame["valid"].astype(bool)] if "valid" in self.frame.columns else self.frame

    @property
    def several_runs(self) -> bool:
        return len(self.infos) > 1

    def of_run(self, name: str) -> ReportView:
        """The same view restricted to one run."""
        return ReportView(self.frame[self.frame["run"] == name], {name: self.infos[name]},
                          {name: self.readers[name]} if name in self.readers else {})

    def reader_of(self, row: pd.Series) -> RunReader:
        """The reader of the run a row comes from."""
        return self.readers[row["run"]]

    def samples(self, row: pd.Series) -> np.ndarray | None:
        """The row's generated images (uint8 NHWC), or None when its cell kept none."""
        return self.reader_of(row).samples(row["cell_id"])

    def exits(self, row: pd.Series) -> dict[str, np.ndarray] | None:
        """The row's per-step step-log summaries, or None (see `RunReader.exits`)."""
        return self.reader_of(row).exits(row["cell_id"])

    def fid_replicates(self, row: pd.Series, column: str) -> tuple[float, np.ndarray] | None:
        """The row's FID bootstrap over its samples for ranking column `column`, (point, replicates), or None when
        its cell kept none (see `RunReader.fid_bootstrap`) or the view has no reader of its run."""
        if row.get("run") not in self.readers:
            return None
        return self.reader_of(row).fid_bootstrap(row["cell_id"]).get(column)

    def artifact(self, row: pd.Series, name: str) -> dict[str, np.ndarray] | None:
        """Another archive the row's method saved, e.g. name="uncertainty_maps", or None."""
        return self.reader_of(row).artifact(row["cell_id"], name)


def load_runs(run_dirs: list[str | Path]) -> ReportView:
    """The results of one or several finished runs as one view.

    Runs are only merged when they measured quality the same way: the same reference data (its SHA-256)
    and the same number of samples per cell (FID's n). Metric plugins are loaded first, so that their
    columns are known to the tables.
    """
    load_plugins("adadiff_bench.metrics")
    frames, infos, readers = [], {}, {}
    for run_dir in run_dirs:
        reader = RunReader(run_dir)
        if len(run_dirs) > 1:  # merging compares the runs' data
            reader.require("data")
        frame, info = reader.frame(), reader.info
        name = unique_name(reader.name, infos)
        infos[name], readers[name] = info, reader
        frames.append(frame.assign(run=name, reference_gflops=reference_cost(frame, info), family=families(frame),
                                   reference_time_s=reference_cost(frame, info, "time_per_image_s"),
                                   run_checkpoint=run_checkpoint(info), at_reference=at_reference(frame, info)))
    check_comparable(frames, infos)
    return ReportView(pd.concat(frames, ignore_index=True), infos, readers)


def run_checkpoint(info: dict) -> str:
    """The path of the run's base model as run.json records it ("" when it does not): names backbone groups."""
    checkpoint = info.get("checkpoint")
    path = checkpoint.get("path") if isinstance(checkpoint, dict) else None
    return path if isinstance(path, str) else ""


def unique_name(name: str, taken: dict) -> str:
    """A run's name, suffixed when two runs share it."""
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}#{i}", i + 1
    return candidate


def families(frame: pd.DataFrame) -> pd.Series:
    """Each row's method family as recorded in results.csv; "other" where the run did not record one."""
    if "family" not in frame.columns:
        return pd.Series(UNKNOWN_FAMILY, index=frame.index)
    return frame["family"].fillna(UNKNOWN_FAMILY)


def check_comparable(frames: list[pd.DataFrame], infos: dict[str, dict]) -> None:
    """Refuse to mix runs of different reference data or a different n in one table."""
    names = list(infos)
    if len(names) < 2:
        return
    first_data, first_n = infos[names[0]]["data"], set(frames[0]["num_samples"])
    for name, frame in zip(names[1:], frames[1:]):
        data = infos[name]["data"]
        if data["sha256"] != first_data["sha256"]:
            raise UserError(f"runs {names[0]!r} and {name!r} measured quality against different data "
                            f"({first_data['name']} {first_data['sha256'][:12]} vs {data['name']} {data['sha256'][:12]}); "
                            "merge only runs on the same data set")
        if set(frame["num_samples"]) != first_n:
            raise UserError(f"runs {names[0]!r} and {name!r} use a different number of samples per cell "
                            f"(n = {sorted(first_n)} vs {sorted(set(frame['num_samples']))}); FID depends on n, "
                            "so merge only runs with the same num_samples")


def at_reference(frame: pd.DataFrame, info: dict) -> pd.Series:
    """Rows sampled at the run's reference solver and steps (all rows when run.json names none)."""
    ref = info.get("reference")
    if not isinstance(ref, dict):
        return pd.Series(True, index=frame.index)
    return (frame["solver"] == ref.get("solver")) & (frame["num_steps"] == ref.get("num_steps"))


def reference_cost(frame: pd.DataFrame, info: dict, column: str = "gflops_per_image") -> pd.Series:
    """A cost of the run's reference (`full` at the run's default solver and steps), on every row."""
    ref = info.get("reference")
    if ref is None or column not in frame.columns:
        return pd.Series(np.nan, index=frame.index)
    is_ref = (frame["method"] == "full") & (frame["params"] == "{}") & (frame["solver"] == ref["solver"]) \
        & (frame["num_steps"] == ref["num_steps"])
    value = frame.loc[is_ref, column].mean() if is_ref.any() else np.nan
    return pd.Series(value, index=frame.index, dtype=float)
