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
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.bootstrap import basic_interval, paired_basic_interval
from ..metrics.specs import primary_column
from ..results import atomic_write_bytes
from .groups import group_keys, reference_of_groups
from .tables import MATCHED_TARGETS, curves, interpolate_at, markdown_text, setting_label
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
        kept = kept_replicates(view, rows, fid)
        usable = [index for index, arrays in kept.items() if arrays is not None]
        pairs += [pair_row(rows.loc[a], rows.loc[b], b == reference, kept[a], kept[b], level)
                  for a, b in itertools.permutations(usable, 2)]
    return pd.DataFrame(pairs, columns=COLUMNS)


def kept_replicates(view: ReportView, rows: pd.DataFrame, fid: str) -> dict:
    """Per row index, its cell's (point, replicates) of column `fid`, or None when the cell kept none."""
    return {index: view.reader_of(row).fid_bootstrap(row["cell_id"]).get(fid) for index, row in rows.iterrows()}


def pair_row(a: pd.Series, b: pd.Series, b_is_full: bool, kept_a: tuple, kept_b: tuple, level: float) -> list:
    """One row of the table: the two cells and the paired interval of their FID difference (from the bootstrap's
    own point estimates: the rows' FIDs, unless a run computed FID with clean-fid)."""
    (point_a, replicates_a), (point_b, replicates_b) = kept_a, kept_b
    low, high = paired_basic_interval(point_a, replicates_a, point_b, replicates_b, level)
    resolved = bool(np.isfinite(low) and (low > 0 or high < 0))
    return [a["run"], int(a["seed"]), a["setting"], b["setting"], bool(b_is_full), a["layer_ratio"], b["layer_ratio"],
            a["gflops_per_image"], b["gflops_per_image"], point_a, point_b, point_a - point_b, low, high, resolved]


MATCHED_COLUMNS = ["run", "seed", "curve", "target", "fid", "fid_low", "fid_high", "full", "dfid", "dfid_low",
                   "dfid_high", "resolved"]


def paired_matched_table(view: ReportView, level: float = 0.95, targets=MATCHED_TARGETS) -> pd.DataFrame:
    """Per curve, seed and target layer ratio: FID interpolated along that seed's sweep, replicate by replicate,
    with its basic interval and the paired interval of its difference to the seed's `full` (rows whose cells all
    kept replicates; blank outside the sweep's range, as in the matched table)."""
    fid = primary_column(view.frame.columns)
    if fid is None or view.frame.empty:
        return pd.DataFrame(columns=MATCHED_COLUMNS)
    frame = view.valid.assign(group=group_keys(view.valid))
    kept = kept_replicates(view, frame, fid)
    references = {key: reference_of_groups(rows).iloc[0]  # each seed's own `full` cell
                  for key, rows in frame.groupby(["run", "seed", "group"], sort=False)}
    rows = []
    for legend, _, curve in curves(frame):
        if (curve["method"] == "full").all():
            continue
        for (run, seed, group), sweep in curve.groupby(["run", "seed", "group"], sort=True):
            full = kept.get(references.get((run, seed, group), -1))
            if full is None or any(kept[i] is None for i in sweep.index):
                continue
            rows += [matched_row(sweep, kept, full, legend, seed, target, level) for target in targets]
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
    resolved = bool(np.isfinite(dlow) and (dlow > 0 or dhigh < 0))
    return [sweep["run"].iloc[0], int(seed), legend, target, point, low, high, full[0], point - full[0], dlow, dhigh,
            resolved]


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


def markdown_lines(table: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|---|---|" + "---:|" * (len(table.columns) - 2)]
    return lines + ["| " + " | ".join(markdown_text(v) for v in row) + " |" for row in table.itertuples(index=False)]


MATCHED_CAPTION = ("Each curve at matched layer ratio, seed by seed: FID interpolated along the seed's sweep, "
                   "replicate by replicate, with its basic bootstrap interval; then its difference to the seed's "
                   "`full` with the interval paired over samples (≈: it holds 0). Blank where the sweep does not "
                   "reach the target. All numbers are in paired_matched.csv.")


def paired_sample_files(view: ReportView, out: Path, level: float = 0.95) -> tuple[pd.DataFrame, list[Path]]:
    """paired_samples.csv (every pair), paired_matched.csv and paired_samples.md (each cell against `full`, then
    the curves at matched layer ratio); returns (the cells against `full`, the paths), nothing when no cell kept
    replicates."""
    pairs = paired_sample_table(view, level)
    if pairs.empty:
        return pd.DataFrame(), []
    table, matched = against_full(pairs), paired_matched_table(view, level)
    text = f"# FID against `full`, paired over samples\n\n{caption(level)}\n\n" + "\n".join(markdown_lines(table))
    if not matched.empty:
        text += ("\n\n## At matched layer ratio\n\n" + MATCHED_CAPTION + "\n\n"
                 + "\n".join(markdown_lines(matched_for_reading(matched))))
    paths = [out / "paired_samples.csv", out / "paired_matched.csv", out / "paired_samples.md"]
    atomic_write_bytes(paths[0], pairs.to_csv(index=False).encode())
    atomic_write_bytes(paths[1], matched.to_csv(index=False).encode())
    atomic_write_bytes(paths[2], (text + "\n").encode())
    return table, paths
