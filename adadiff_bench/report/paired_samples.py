"""FID differences between the cells of one seed, paired over samples: the intervals a one-seed board needs.

Every cell of a run seed starts sample i from the same noise, and a run with `fid_bootstrap` draws every cell's
bootstrap resamples from the same sample rows (`metrics.bootstrap.fid_bootstrap_replicates`, saved in each
cell's `fid_bootstrap.npz`). The difference of two cells' replicates is then a bootstrap of their FID
difference in which what each sample's noise does to both cells cancels: an interval far narrower than the
two cells' own intervals side by side, and the only one a board of one seed has (the seed intervals of the
leaderboard need >= 2 seeds).

`paired_samples.csv`: every pair of cells of one run, seed and backbone group, in pandas' long format;
`paired_samples.md`: each cell against its group's `full`.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.bootstrap import paired_basic_interval
from ..metrics.specs import primary_column
from ..results import atomic_write_bytes
from .groups import group_keys, reference_of_groups
from .tables import markdown_text, setting_label
from .view import ReportView

COLUMNS = ["run", "seed", "setting_a", "setting_b", "b_is_full", "layer_ratio_a", "layer_ratio_b", "gflops_a",
           "gflops_b", "fid_a", "fid_b", "dfid", "dfid_low", "dfid_high", "resolved"]


def paired_sample_table(view: ReportView, level: float = 0.95) -> pd.DataFrame:
    """Every ordered pair (a, b) of cells that share a run, a seed and a backbone and kept FID bootstrap
    replicates: FID(a) - FID(b) with its paired basic bootstrap interval, `resolved` where that excludes 0, and
    `b_is_full` where b is the group's `full` reference (the leaderboard's choice)."""
    fid = primary_column(view.frame.columns)
    if fid is None or view.frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame = view.valid
    frame = frame.assign(group=group_keys(frame), setting=frame.apply(setting_label, axis=1))
    pairs = []
    for _, rows in frame.groupby(["run", "seed", "group"], sort=False):
        reference = reference_of_groups(rows).iloc[0]
        kept = {index: view.reader_of(row).fid_bootstrap(row["cell_id"]).get(fid) for index, row in rows.iterrows()}
        usable = [index for index, arrays in kept.items() if arrays is not None]
        pairs += [pair_row(rows.loc[a], rows.loc[b], b == reference, kept[a], kept[b], level)
                  for a, b in itertools.permutations(usable, 2)]
    return pd.DataFrame(pairs, columns=COLUMNS)


def pair_row(a: pd.Series, b: pd.Series, b_is_full: bool, kept_a: tuple, kept_b: tuple, level: float) -> list:
    """One row of the table: the two cells and the paired interval of their FID difference (from the bootstrap's
    own point estimates: the rows' FIDs, unless a run computed FID with clean-fid)."""
    (point_a, replicates_a), (point_b, replicates_b) = kept_a, kept_b
    low, high = paired_basic_interval(point_a, replicates_a, point_b, replicates_b, level)
    resolved = bool(np.isfinite(low) and (low > 0 or high < 0))
    return [a["run"], int(a["seed"]), a["setting"], b["setting"], bool(b_is_full), a["layer_ratio"], b["layer_ratio"],
            a["gflops_per_image"], b["gflops_per_image"], point_a, point_b, point_a - point_b, low, high, resolved]


def against_full(pairs: pd.DataFrame) -> pd.DataFrame:
    """For reading: each cell against its group's `full`, dFID with its paired interval (≈ where it holds 0)."""
    shown = pairs[pairs["b_is_full"]]
    return pd.DataFrame({
        "run / seed": [f"{run} / {seed}" for run, seed in zip(shown["run"], shown["seed"])],
        "setting": shown["setting_a"], "layer ratio": shown["layer_ratio_a"].map("{:.3f}".format),
        "FID": shown["fid_a"].map("{:.3f}".format), "full": shown["fid_b"].map("{:.3f}".format),
        "dFID [paired interval]": [f"{d:+.3f} [{low:+.3f}, {high:+.3f}]" + ("" if resolved else " ≈") for
                                   d, low, high, resolved in shown[["dfid", "dfid_low", "dfid_high", "resolved"]]
                                   .itertuples(index=False)]})


def caption(level: float = 0.95) -> str:
    return (f"Each cell's FID minus its seed's `full` (same backbone), with the basic bootstrap interval at level "
            f"{level} of the difference: both cells resampled on the same sample rows (sample i of every cell "
            "starts from the same noise). ≈: the interval holds 0. Every pair of cells is in paired_samples.csv.")


def paired_sample_files(view: ReportView, out: Path, level: float = 0.95) -> tuple[pd.DataFrame, list[Path]]:
    """paired_samples.csv (every pair) and .md (each cell against `full`); returns (the .md's table, the paths),
    nothing when no cell kept replicates."""
    pairs = paired_sample_table(view, level)
    if pairs.empty:
        return pd.DataFrame(), []
    table = against_full(pairs)
    lines = ["| " + " | ".join(table.columns) + " |", "|---|---|" + "---:|" * (len(table.columns) - 2)]
    lines += ["| " + " | ".join(markdown_text(value) for value in row) + " |" for row in table.itertuples(index=False)]
    paths = [out / "paired_samples.csv", out / "paired_samples.md"]
    atomic_write_bytes(paths[0], pairs.to_csv(index=False).encode())
    atomic_write_bytes(paths[1], (f"# FID against `full`, paired over samples\n\n{caption(level)}\n\n"
                                  + "\n".join(lines) + "\n").encode())
    return table, paths
