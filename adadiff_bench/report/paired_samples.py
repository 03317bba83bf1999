"""FID differences between the cells of one seed, paired over samples: the intervals a one-seed board needs.

Every cell of a run seed starts sample i from the same noise, and a run with `fid_bootstrap` draws every cell's
bootstrap resamples from the same sample rows (`metrics.bootstrap.fid_bootstrap_replicates`, saved in each
cell's `fid_bootstrap.npz`). The difference of two cells' replicates is then a bootstrap of their FID
difference in which what each sample's noise does to both cells cancels: an interval far narrower than the
two cells' own intervals side by side, and the only one a board of one seed has (the seed intervals of the
leaderboard need >= 2 seeds).

`paired_samples.csv`: every pair of cells of one run, seed and backbone group, in pandas' long format;
`paired_samples.md`: each cell against its group's `full`, then every curve at matched layer ratio: its FID
interpolated along the seed's sweep, replicate by replicate (linear interpolation is a weighted sum, so the
interpolated replicates are a bootstrap of the interpolated FID), with its own interval and the paired interval
of its difference to `full` (`paired_matched.csv`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.bootstrap import basic_interval, paired_basic_interval
from ..metrics.specs import primary_column
from .groups import group_keys, includes_zero, reference_of_groups
from .tables import MATCHED_TARGETS, curves, frame_to_markdown, interpolate_at, setting_label, write_text
from .view import ReportView

COLUMNS = ["run", "seed", "setting_a", "setting_b", "b_is_full", "layer_ratio_a", "layer_ratio_b", "gflops_a",
           "gflops_b", "fid_a", "fid_b", "dfid", "dfid_low", "dfid_high", "resolved"]
SEED_GROUP = ["run", "seed", "group"]  # the cells whose samples share their noise and their backbone


@dataclass(frozen=True)
class KeptCells:
    """What both tables read, gathered once: the view's valid rows with their backbone `group` and `setting`
    label, each row's cell's (point, replicates) of the ranking FID (None where the cell kept none), and per
    (run, seed, group) the row index of that seed's `full` reference (-1 where there is none)."""
    frame: pd.DataFrame
    kept: dict
    references: dict


def kept_cells(view: ReportView) -> KeptCells | None:
    """The view's cells with their kept replicates read once; None when the view ranks by no FID column."""
    fid = primary_column(view.frame.columns)
    if fid is None or view.valid.empty:
        return None
    frame = view.valid.assign(group=group_keys(view.valid), setting=view.valid.apply(setting_label, axis=1))
    kept = {index: view.fid_replicates(row, fid) for index, row in frame.iterrows()}
    references = {key: reference_of_groups(rows).iloc[0] for key, rows in frame.groupby(SEED_GROUP, sort=False)}
    return KeptCells(frame, kept, references)


def excludes_zero(low: float, high: float) -> bool:
    """A difference the interval resolves (a NaN interval resolves nothing)."""
    return bool(np.isfinite(low) and not includes_zero((low, high))[0])


def paired_sample_table(cells: KeptCells, level: float = 0.95) -> pd.DataFrame:
    """Every ordered pair (a, b) of cells that share a run, a seed and a backbone and kept FID bootstrap
    replicates: FID(a) - FID(b) with its paired basic bootstrap interval, `resolved` where that excludes 0, and
    `b_is_full` where b is the seed's `full` reference (the leaderboard's choice)."""
    pairs = []
    for key, rows in cells.frame.groupby(SEED_GROUP, sort=False):
        usable = [index for index in rows.index if cells.kept[index] is not None]
        pairs += [pair_row(rows.loc[a], rows.loc[b], b == cells.references[key], cells.kept[a], cells.kept[b], level)
                  for a, b in itertools.permutations(usable, 2)]
    return pd.DataFrame(pairs, columns=COLUMNS)


def pair_row(a: pd.Series, b: pd.Series, b_is_full: bool, kept_a: tuple, kept_b: tuple, level: float) -> list:
    """One row of the table: the two cells and the paired interval of their FID difference (from the bootstrap's
    own point estimates: the rows' FIDs, unless a run computed FID with clean-fid)."""
    (point_a, replicates_a), (point_b, replicates_b) = kept_a, kept_b
    low, high = paired_basic_interval(point_a, replicates_a, point_b, replicates_b, level)
    return [a["run"], int(a["seed"]), a["setting"], b["setting"], bool(b_is_full), a["layer_ratio"], b["layer_ratio"],
            a["gflops_per_image"], b["gflops_per_image"], point_a, point_b, point_a - point_b, low, high,
            excludes_zero(low, high)]


MATCHED_COLUMNS = ["run", "seed", "curve", "target", "fid", "fid_low", "fid_high", "full", "dfid", "dfid_low",
                   "dfid_high", "resolved"]


def paired_matched_table(cells: KeptCells, level: float = 0.95, targets=MATCHED_TARGETS) -> pd.DataFrame:
    """Per curve, seed and target layer ratio: FID interpolated along that seed's sweep, replicate by replicate,
    with its basic interval and the paired interval of its difference to the seed's `full` (rows whose cells all
    kept replicates; blank outside the sweep's range, as in the matched table)."""
    kept, rows = cells.kept, []
    for legend, _, curve in curves(cells.frame):
        if (curve["method"] == "full").all():
            continue
        for key, sweep in curve.groupby(SEED_GROUP, sort=True):
            full = kept.get(cells.references.get(key, -1))
            if full is None or any(kept[i] is None for i in sweep.index):
                continue
            rows += [matched_row(sweep, kept, full, legend, key[1], target, level) for target in targets]
    return pd.DataFrame([r for r in rows if r is not None], columns=MATCHED_COLUMNS)


def matched_row(sweep: pd.DataFrame, kept: dict, full: tuple, legend: str, seed, target: float, level: float):
    """One curve at one target: None where the sweep does not reach it."""
    x = sweep["layer_ratio"].to_numpy(float)
    weights = np.array([interpolate_at(x, unit, [target])[0] for unit in np.eye(len(x))])
    if np.isnan(weights).any():
        return None
    point = float(weights @ np.array([kept[i][0] for i in sweep.index]))
    replicates = weights @ np.stack([kept[i][1] for i in sweep.index])
    low, high = basic_interval(point, replicates, level)
    dlow, dhigh = paired_basic_interval(point, replicates, full[0], full[1], level)
    return [sweep["run"].iloc[0], int(seed), legend, target, point, low, high, full[0], point - full[0], dlow, dhigh,
            excludes_zero(dlow, dhigh)]


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


def matched_for_reading(matched: pd.DataFrame) -> pd.DataFrame:
    """The matched table pivoted for reading: a row per run, seed and curve; per target "FID [interval]; dFID
    [paired interval]" (≈ where the paired interval holds 0)."""
    text = [f"{r.fid:.3f} [{r.fid_low:.3f}, {r.fid_high:.3f}]; {r.dfid:+.3f} [{r.dfid_low:+.3f}, {r.dfid_high:+.3f}]"
            + ("" if r.resolved else " ≈") for r in matched.itertuples()]
    wide = matched.assign(text=text, where=[f"{run} / {seed}" for run, seed in zip(matched["run"], matched["seed"])])
    wide = wide.pivot_table(index=["where", "curve"], columns="target", values="text", aggfunc="first", sort=False)
    wide.columns = [f"layer ratio {target:g}" for target in wide.columns]
    return wide.reset_index().rename(columns={"where": "run / seed"}).fillna("")


MATCHED_CAPTION = ("Each curve at matched layer ratio, seed by seed: FID interpolated along the seed's sweep, "
                   "replicate by replicate, with its basic bootstrap interval; then its difference to the seed's "
                   "`full` with the interval paired over samples (≈: it holds 0). Blank where the sweep does not "
                   "reach the target. All numbers are in paired_matched.csv.")


def paired_sample_files(view: ReportView, out: Path, level: float = 0.95) -> tuple[pd.DataFrame, list[Path]]:
    """paired_samples.csv (every pair), paired_matched.csv and paired_samples.md (each cell against `full`, then
    the curves at matched layer ratio); returns (the cells against `full`, the paths), nothing when no cell kept
    replicates."""
    cells = kept_cells(view)
    pairs = paired_sample_table(cells, level) if cells is not None else pd.DataFrame()
    if pairs.empty:
        return pd.DataFrame(), []
    table, matched = against_full(pairs), paired_matched_table(cells, level)
    text = f"# FID against `full`, paired over samples\n\n{caption(level)}\n\n" + frame_to_markdown(table)
    if not matched.empty:
        text += (f"\n## At matched layer ratio\n\n{MATCHED_CAPTION}\n\n"
                 + frame_to_markdown(matched_for_reading(matched)))
    paths = [write_text(out / "paired_samples.csv", pairs.to_csv(index=False)),
             write_text(out / "paired_matched.csv", matched.to_csv(index=False)),
             write_text(out / "paired_samples.md", text)]
    return table, paths
