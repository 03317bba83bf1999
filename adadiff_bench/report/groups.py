"""One backbone per comparison: which backbone group a row belongs to, its label, and its `full` reference.

Rows record `backbone_hash` (a hash of the backbone's weights alone, `adadiff_bench.backbone_id`); rows of
runs made before it was recorded form one unknown group per run. Within a group, dFID is FID minus the
group's `full` FID, Pareto marks are computed among the group's rows only, and seed intervals say whether
a difference is resolved.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.bootstrap import mean_bootstrap_interval, paired_basic_interval

BACKBONE_HASH = "backbone_hash"
UNKNOWN = "unknown"


def group_keys(frame: pd.DataFrame) -> pd.Series:
    """Each row's backbone group: its backbone hash, or `unknown:<run>` where the run recorded none."""
    known = frame[BACKBONE_HASH] if BACKBONE_HASH in frame.columns else pd.Series(np.nan, index=frame.index)
    known = known.where(known.notna() & (known.astype(str) != ""))
    run = frame["run"].astype(str) if "run" in frame.columns else pd.Series("", index=frame.index)
    return known.fillna(UNKNOWN + ":" + run).astype(str)


def is_unknown(key: str) -> bool:
    return key.startswith(UNKNOWN + ":")


def checkpoint_stem(row: pd.Series) -> str:
    """The file stem of the checkpoint a row names, else of the training config that makes it on demand, else
    of its run's checkpoint ("" when none is known)."""
    params = row.get("params", "")
    knobs = json.loads(params) if isinstance(params, str) and params else {}
    path = knobs.get("checkpoint") or knobs.get("train") or row.get("run_checkpoint", "")
    if not isinstance(path, str) or not path:
        return ""
    path = Path(path)  # a file named for its role (an on-demand training's weights.pt) is named by its folder too
    return f"{path.parent.name}/{path.stem}" if path.stem in GENERIC_STEMS and path.parent.name else path.stem


GENERIC_STEMS = ("weights", "ema", "last", "model", "checkpoint", "diffusion_pytorch_model")


def group_label(key: str, rows: pd.DataFrame, several_runs: bool) -> str:
    """A short name for a group: its checkpoint's file stem (from its `full` rows when it has some, else the
    stem most of its rows name) and the first 8 hex digits of its hash."""
    if is_unknown(key):
        return "unknown backbone" + (f" ({key.split(':', 1)[1]})" if several_runs else "")
    full = rows[rows["method"] == "full"]
    stems = [s for s in (full if len(full) else rows).apply(checkpoint_stem, axis=1) if s]
    stem = pd.Series(stems).mode().iloc[0] if stems else ""
    return f"{stem} {key[:8]}".strip()


def reference_of_groups(board: pd.DataFrame) -> pd.Series:
    """Per board row, the board index of its group's `full` reference; -1 for a group without a `full` row.

    Of a group's `full` settings, the one at its run's reference solver and steps comes first (`at_reference`,
    when the view recorded it), then the run's own base model (no knobs), then the first listed."""
    full = board[board["method"] == "full"]
    at_reference = full["at_reference"].fillna(False).astype(bool) if "at_reference" in full.columns else True
    no_knobs = full["params"].fillna("{}").isin(["{}", ""]) if "params" in full.columns else True
    preference = pd.Series(0, index=full.index) - 2 * at_reference - no_knobs
    chosen = full.assign(preference=preference).sort_values("preference", kind="stable").groupby("group").head(1)
    first = pd.Series(chosen.index, index=chosen["group"])
    return board["group"].map(first).fillna(-1).astype(int)


def overlaps(low_a, high_a, low_b, high_b) -> np.ndarray:
    """Whether two intervals share a point (NaN bounds: unknown, False)."""
    low_a, high_a, low_b, high_b = (np.asarray(v, dtype=float) for v in (low_a, high_a, low_b, high_b))
    known = np.isfinite(low_a) & np.isfinite(high_a) & np.isfinite(low_b) & np.isfinite(high_b)
    return known & (low_a <= high_b) & (low_b <= high_a)


def unresolved_pareto(board: pd.DataFrame, low: str, high: str, difference: PairedDifference) -> np.ndarray:
    """★ rows that the intervals do not show to beat every cheaper competitor of their group, so that their place
    on the front may be noise. Against a competitor where a paired interval of the FID difference exists
    (`PairedDifference`) it decides (it must lie below 0); otherwise whether the two rows' own intervals overlap."""
    marks = np.zeros(len(board), dtype=bool)
    cost = board["gflops_per_image"].to_numpy(float)
    for i in np.flatnonzero(board["pareto"].to_numpy(bool)):
        cheaper = (board["group"] == board["group"].iloc[i]).to_numpy() & (cost < cost[i]) \
            & board["competitor"].to_numpy(bool)
        for j in np.flatnonzero(cheaper):
            paired = difference(i, j)
            if np.isfinite(paired[0]):
                marks[i] |= paired[1] >= 0
            else:
                marks[i] |= bool(overlaps(board[low].iloc[i], board[high].iloc[i], board[low].iloc[j],
                                          board[high].iloc[j]))
    return marks


def paired_interval(a: dict, b: dict, level: float) -> tuple[float, float]:
    """Bootstrap interval of the mean of (a - b) over the seeds both settings ran (NaN with fewer than 2)."""
    shared = [seed for seed in a if seed in b and np.isfinite(a[seed]) and np.isfinite(b[seed])]
    return mean_bootstrap_interval([a[seed] - b[seed] for seed in shared], level)


@dataclass(frozen=True)
class PairedDifference:
    """The paired interval of FID(i) - FID(j) between two board rows: over the seeds both ran where they share
    >= 2 (`paired_interval`); else, where both rows are one seed each of the same run and seed and their cells
    kept FID bootstrap replicates, over samples (`paired_basic_interval`: the replicates were drawn on the same
    sample rows, whose noise both cells share); NaN otherwise."""
    per_seed: list[dict]   # per board row: {seed: FID}
    one_seed: list         # per board row: ((run, seed), point, replicates), or None
    level: float

    def __call__(self, i: int, j: int) -> tuple[float, float]:
        low, high = paired_interval(self.per_seed[i], self.per_seed[j], self.level)
        a, b = self.one_seed[i], self.one_seed[j]
        if np.isfinite(low) or a is None or b is None or a[0] != b[0]:
            return low, high
        return paired_basic_interval(a[1], a[2], b[1], b[2], self.level)


def includes_zero(intervals: np.ndarray) -> np.ndarray:
    """Per (low, high) row, whether the interval holds 0: a difference it does not resolve."""
    intervals = np.asarray(intervals, dtype=float).reshape(-1, 2)
    return (intervals[:, 0] <= 0) & (0 <= intervals[:, 1])
