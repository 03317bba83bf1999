"""Estimator quality without thresholds: how well each uncertainty estimator ranks its exits' true errors.

Reads the `estimator_quality` artifact that AdaDiff cells write with `quality_samples` > 0 (see
`methods/adadiff/quality.py`: per sample, step and exit point, the estimator's uncertainty and the exit's
eps error against full depth on the same input, along full-depth trajectories of evaluation seeds, so
held out from any calibration). For every estimator setting, per exit point and per timestep bucket:

- `spearman`: rank correlation between predicted uncertainty and the exit's eps error (scipy.stats.spearmanr);
- `auroc_tol<tol>`: AUROC of "this exit is within `tol` of full depth" (mean |eps_exit - eps_full| <= tol),
  scored by low uncertainty (sklearn.metrics.roc_auc_score), for each swept tolerance; NaN where every
  sample falls on one side of the tolerance;
- `within_tol<tol>`: the fraction of samples within tolerance (the base rate the AUROC is read against).

Bucket "all" pools every step; the row of exit point "all" pools every exit point but the last (whose
error is zero by definition). The calibration plot bins the predicted uncertainty and shows the mean
observed tanh|eps_exit - eps_full| per bin (the estimator's own units) against the diagonal.
No torch here: the report reads only the results store.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from ..results import atomic_write_bytes
from .exit_figures import short_knob_value
from .style import DOUBLE, new_figure, save, style, styled
from .tables import knobs_of
from .view import ReportView

QUALITY_ARTIFACT = "estimator_quality"
TOLERANCES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # swept tolerances on the mean |eps_exit - eps_full| of a sample
NUM_BUCKETS = 5                            # timestep buckets: the sampling steps cut into this many runs
# knobs that decide when to exit or what to record, not what the estimator predicts: one analysis per setting
DECISION_KNOBS = ("threshold", "threshold_kind", "rule", "patience", "target_layer_ratio", "target_tolerance",
                  "calibration_samples", "calibration_seed", "quality_samples", "map_steps", "map_samples")


def spearman(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Rank correlation of predicted uncertainty with true error (NaN when either is constant)."""
    if len(uncertainty) < 3 or np.ptp(uncertainty) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(uncertainty, error).statistic)


def auroc(uncertainty: np.ndarray, error: np.ndarray, tolerance: float) -> float:
    """AUROC of "within tolerance of full depth" scored by low uncertainty (NaN when one class is empty)."""
    within = error <= tolerance
    if within.all() or not within.any():
        return float("nan")
    return float(roc_auc_score(within, -uncertainty))


def step_buckets(timesteps: np.ndarray, count: int = NUM_BUCKETS) -> list[tuple[str, np.ndarray]]:
    """("all", every step) and `count` runs of consecutive steps, named by the timesteps they span."""
    steps = np.arange(len(timesteps))
    buckets = [("all", steps)]
    for part in np.array_split(steps, min(count, len(steps))):
        buckets.append((f"steps {part[0] + 1}-{part[-1] + 1} (t {timesteps[part[0]]:.4g}..{timesteps[part[-1]]:.4g})",
                        part))
    return buckets


def slice_row(uncertainty: np.ndarray, error: np.ndarray, tolerances=TOLERANCES) -> dict:
    """Spearman, and per tolerance AUROC and base rate, of one slice's flattened arrays."""
    row = {"samples": len(uncertainty), "spearman": spearman(uncertainty, error),
           "mean_uncertainty": float(np.mean(uncertainty)), "mean_eps_error": float(np.mean(error))}
    for tolerance in tolerances:
        row[f"auroc_tol{tolerance:g}"] = auroc(uncertainty, error, tolerance)
        row[f"within_tol{tolerance:g}"] = float(np.mean(error <= tolerance))
    return row


def quality_rows(arrays: dict[str, np.ndarray], setting: str) -> list[dict]:
    """One row per exit point (and "all") x timestep bucket (and "all") of one analysed setting."""
    u, error = arrays["uncertainty"], arrays["eps_error"]           # sample, step, exit point
    exits = u.shape[2] - 1                                          # the last exit is full depth itself
    rows = []
    for exit_label, exit_points in [("all", np.arange(exits)), *[(str(e + 1), np.array([e])) for e in range(exits)]]:
        for bucket, steps in step_buckets(np.asarray(arrays["timesteps"])):
            pick = np.ix_(np.arange(len(u)), steps, exit_points)
            keep = np.isfinite(u[pick]) & np.isfinite(error[pick])
            rows.append({"setting": setting, "exit_point": exit_label, "timestep_bucket": bucket,
                         **slice_row(u[pick][keep], error[pick][keep])})
    return rows


def analysed_settings(view: ReportView) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(label, artifact) per distinct estimator setting and seed; cells that differ only in when to exit
    (thresholds, targets) share one analysis, so the first is kept."""
    found: dict[tuple, tuple[dict, pd.Series, dict]] = {}
    for _, row in view.frame.iterrows():
        arrays = view.artifact(row, QUALITY_ARTIFACT)
        if arrays is None:
            continue
        knobs = {k: v for k, v in knobs_of(row).items() if k not in DECISION_KNOBS}
        key = (row["method"], tuple(sorted(knobs.items())), row["solver"], row["num_steps"], row["seed"])
        found.setdefault(key, (knobs, row, arrays))
    settings = list(found.values())
    labels = _labels([(knobs, row) for knobs, row, _ in settings])
    return [(label, arrays) for label, (_, _, arrays) in zip(labels, settings)]


def _labels(settings: list[tuple[dict, pd.Series]]) -> list[str]:
    """The knobs that tell the analysed settings apart (plus seed, solver and steps where those differ)."""
    keys = sorted({k for knobs, _ in settings for k in knobs})
    varying = [k for k in keys if len({str(knobs.get(k)) for knobs, _ in settings}) > 1]
    labels = []
    for knobs, row in settings:
        parts = [f"{k}={short_knob_value(knobs[k])}" for k in varying if k in knobs]
        for column in ("seed", "solver", "num_steps"):
            if len({r[column] for _, r in settings}) > 1:
                parts.append(f"{column}={row[column]}")
        labels.append(", ".join(parts) or "adadiff")
    return labels


def quality_table(view: ReportView) -> pd.DataFrame:
    """Every analysed setting's rows (see `quality_rows`); empty when no cell asked for the analysis."""
    rows = [row for label, arrays in analysed_settings(view) for row in quality_rows(arrays, label)]
    return pd.DataFrame(rows)


def summary_markdown(table: pd.DataFrame) -> str:
    """Per setting, all exits and steps pooled: Spearman and AUROC per tolerance; and the mean within-slice
    Spearman (per exit point and timestep bucket), which asks whether the estimator ranks *samples*."""
    pooled = table[(table["exit_point"] == "all") & (table["timestep_bucket"] == "all")]
    slices = table[(table["exit_point"] != "all") & (table["timestep_bucket"] != "all")]
    within = slices.groupby("setting", sort=False)["spearman"].mean()
    header = ["setting", "Spearman (pooled)", "Spearman (mean within exit x bucket)",
              *[f"AUROC tol {t:g} (within)" for t in TOLERANCES]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in pooled.iterrows():
        cells = [row["setting"], _number(row["spearman"]), _number(within.get(row["setting"], np.nan))]
        cells += [f"{_number(row[f'auroc_tol{t:g}'])} ({row[f'within_tol{t:g}']:.2f})" for t in TOLERANCES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


def calibration_curve(uncertainty: np.ndarray, observed: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted and mean observed value per equal-width bin of predicted uncertainty (empty bins dropped)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(uncertainty, edges) - 1, 0, bins - 1)
    filled = [b for b in range(bins) if np.any(which == b)]
    return (np.array([uncertainty[which == b].mean() for b in filled]),
            np.array([observed[which == b].mean() for b in filled]))


@styled
def estimator_quality(view: ReportView, out: str | Path) -> list[Path]:
    """estimator_quality.csv and .md (the table) and the figure: Spearman by exit point, AUROC against the
    tolerance, and the calibration plot, one line per analysed estimator setting."""
    out = Path(out)
    settings = analysed_settings(view)
    if not settings:
        return []
    table = quality_table(view)
    paths = [out / "estimator_quality.csv", out / "estimator_quality.md"]
    atomic_write_bytes(paths[0], table.to_csv(index=False).encode())
    atomic_write_bytes(paths[1], summary_markdown(table).encode())
    fig, axes = new_figure(DOUBLE, 2.8, 1, 3, squeeze=False)
    by_exit, by_tolerance, calibration = axes[0]
    for i, (label, arrays) in enumerate(settings):
        rows = table[(table["setting"] == label) & (table["timestep_bucket"] == "all")]
        per_exit = rows[rows["exit_point"] != "all"]
        by_exit.plot(per_exit["exit_point"].astype(int), per_exit["spearman"], label=label, **style(i))
        pooled = rows[rows["exit_point"] == "all"].iloc[0]
        by_tolerance.plot(TOLERANCES, [pooled[f"auroc_tol{t:g}"] for t in TOLERANCES], label=label, **style(i))
        last = arrays["uncertainty"].shape[2] - 1
        predicted, observed = calibration_curve(arrays["uncertainty"][..., :last].ravel(),
                                                arrays["tanh_error"][..., :last].ravel())
        calibration.plot(predicted, observed, label=label, **style(i))
    by_exit.axhline(0, color="0.5", linewidth=0.6)
    by_exit.set(xlabel="exit point (blocks run)", ylabel="Spearman(uncertainty, eps error)",
                title="rank correlation per exit (all steps)")
    by_tolerance.axhline(0.5, color="0.5", linewidth=0.6, linestyle="--")
    by_tolerance.set(xscale="log", xlabel="tolerance on mean |eps_exit - eps_full|", ylabel="AUROC",
                     title="AUROC of 'within tolerance' (pooled)")
    calibration.plot([0, 1], [0, 1], color="0.5", linewidth=0.6, linestyle="--")
    calibration.set(xlabel="predicted uncertainty u", ylabel="observed mean tanh|eps_exit - eps_full|",
                    title="calibration (exits before the last)")
    by_exit.legend(frameon=False, fontsize=5.5)
    fig.suptitle("AdaDiff estimator quality without thresholds, on held-out evaluation seeds", fontsize=7.5)
    return paths + save(fig, out, "estimator_quality")
