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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from ..results import atomic_write_bytes
from .exit_figures import short_knob_value
from .figures import fit
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


def quality_rows(arrays: dict[str, np.ndarray], setting: str, seed: int) -> list[dict]:
    """One row per exit point (and "all") x timestep bucket (and "all") of one analysed setting and seed."""
    u, error = arrays["uncertainty"], arrays["eps_error"]           # sample, step, exit point
    exits = u.shape[2] - 1                                          # the last exit is full depth itself
    rows = []
    for exit_label, exit_points in [("all", np.arange(exits)), *[(str(e + 1), np.array([e])) for e in range(exits)]]:
        for bucket, steps in step_buckets(np.asarray(arrays["timesteps"])):
            pick = np.ix_(np.arange(len(u)), steps, exit_points)
            keep = np.isfinite(u[pick]) & np.isfinite(error[pick])
            rows.append({"setting": setting, "seed": seed, "exit_point": exit_label, "timestep_bucket": bucket,
                         **slice_row(u[pick][keep], error[pick][keep])})
    return rows


@dataclass
class Analysed:
    """One estimator setting's analysis: its label (the knobs that tell it apart) and its artifact per seed."""
    label: str
    seeds: dict[int, dict[str, np.ndarray]]


def analysed_settings(view: ReportView) -> list[Analysed]:
    """Each distinct estimator setting with its artifact per seed. Cells that differ only in when to exit
    (thresholds, targets) share one analysis, so the first is kept; settings whose analyses are identical at
    every seed (one trained network reached through several knobs: the ablation's official estimator is also
    its frozen backbone, official loss and eps target) are one setting, named by all its labels."""
    found: dict[tuple, tuple[dict, pd.Series, dict[int, dict]]] = {}
    for _, row in view.frame.iterrows():
        arrays = view.artifact(row, QUALITY_ARTIFACT)
        if arrays is None:
            continue
        knobs = {k: v for k, v in knobs_of(row).items() if k not in DECISION_KNOBS}
        key = (row["method"], tuple(sorted(knobs.items())), row["solver"], row["num_steps"])
        found.setdefault(key, (knobs, row, {}))[2].setdefault(int(row["seed"]), arrays)
    settings = list(found.values())
    labels = _labels([(knobs, row) for knobs, row, _ in settings])
    merged: list[Analysed] = []
    for label, (_, _, seeds) in zip(labels, settings):
        same = next((kept for kept in merged if _same_analysis(kept.seeds, seeds)), None)
        if same is None:
            merged.append(Analysed(label, seeds))
        else:
            same.label += f" = {label}"
    return merged


def _same_analysis(a: dict[int, dict], b: dict[int, dict]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[s]["uncertainty"], b[s]["uncertainty"], equal_nan=True)
                                        and np.array_equal(a[s]["eps_error"], b[s]["eps_error"], equal_nan=True)
                                        for s in a)


def _labels(settings: list[tuple[dict, pd.Series]]) -> list[str]:
    """The knobs that tell the analysed settings apart (plus solver and steps where those differ)."""
    keys = sorted({k for knobs, _ in settings for k in knobs})
    varying = [k for k in keys if len({str(knobs.get(k)) for knobs, _ in settings}) > 1]
    labels = []
    for knobs, row in settings:
        parts = [f"{k}={short_knob_value(knobs[k])}" for k in varying if k in knobs]
        for column in ("solver", "num_steps"):
            if len({r[column] for _, r in settings}) > 1:
                parts.append(f"{column}={row[column]}")
        labels.append(", ".join(parts) or "adadiff")
    return labels


def quality_table(view: ReportView) -> pd.DataFrame:
    """Every analysed setting's rows per seed (see `quality_rows`); empty when no cell asked for the analysis."""
    return pd.DataFrame([row for setting in analysed_settings(view) for seed, arrays in setting.seeds.items()
                         for row in quality_rows(arrays, setting.label, seed)])


def summary_markdown(table: pd.DataFrame) -> str:
    """Per setting, all exits and steps pooled: Spearman and AUROC per tolerance (with the share of samples
    within it); and the mean within-slice Spearman (per exit point and timestep bucket), which asks whether the
    estimator ranks *samples*. Each as the mean over seeds ± the std across them."""
    pooled = table[(table["exit_point"] == "all") & (table["timestep_bucket"] == "all")]
    slices = table[(table["exit_point"] != "all") & (table["timestep_bucket"] != "all")]
    within = slices.groupby(["setting", "seed"], sort=False)["spearman"].mean().rename("within").reset_index()
    per_seed = pooled.merge(within, on=["setting", "seed"])
    seeds = per_seed["seed"].nunique()
    header = ["setting", "Spearman (pooled)", "Spearman (mean within exit x timestep bucket)",
              *[f"AUROC tol {t:g} (share within)" for t in TOLERANCES]]
    lines = [f"Estimator quality on held-out evaluation seeds: mean over {seeds} seed(s) ± std across them.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, rows in per_seed.groupby("setting", sort=False):
        cells = [setting, _spread(rows["spearman"]), _spread(rows["within"])]
        cells += [f"{_spread(rows[f'auroc_tol{t:g}'])} ({rows[f'within_tol{t:g}'].mean():.2f})" for t in TOLERANCES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _spread(values: pd.Series) -> str:
    """Mean ± std over seeds ("n/a" where any seed has none: an AUROC with one class empty)."""
    if not np.isfinite(values).all():
        return "n/a"
    return f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else "")


def _every_seed(values: pd.Series) -> float:
    """The mean over seeds; NaN where any seed has none, as the table's n/a (a line skips no seed)."""
    return float(values.mean(skipna=False))


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
    fig, axes = new_figure(DOUBLE, 3.4, 1, 3, squeeze=False)
    by_exit, by_tolerance, calibration = axes[0]
    for i, setting in enumerate(settings):  # each line: the mean over seeds, a gap where the table says n/a
        rows = table[(table["setting"] == setting.label) & (table["timestep_bucket"] == "all")]
        per_exit = rows[rows["exit_point"] != "all"].groupby("exit_point", sort=False)["spearman"].agg(_every_seed)
        by_exit.plot(per_exit.index.astype(int), per_exit.to_numpy(), label=fit(setting.label, 45), **style(i))
        pooled = rows[rows["exit_point"] == "all"]
        by_tolerance.plot(TOLERANCES, [_every_seed(pooled[f"auroc_tol{t:g}"]) for t in TOLERANCES], **style(i))
        last = next(iter(setting.seeds.values()))["uncertainty"].shape[2] - 1
        predicted, observed = calibration_curve(
            np.concatenate([a["uncertainty"][..., :last].ravel() for a in setting.seeds.values()]),
            np.concatenate([a["tanh_error"][..., :last].ravel() for a in setting.seeds.values()]))
        calibration.plot(predicted, observed, **style(i))
    by_exit.axhline(0, color="0.5", linewidth=0.6)
    by_exit.set(xlabel="exit point (blocks run)", ylabel="Spearman(uncertainty, eps error)",
                title="rank correlation per exit (all steps)")
    by_tolerance.axhline(0.5, color="0.5", linewidth=0.6, linestyle="--")
    by_tolerance.set(xscale="log", xlabel="tolerance on mean |eps_exit - eps_full|", ylabel="AUROC",
                     title="AUROC of 'within tolerance' (pooled)")
    by_tolerance.set_xticks(TOLERANCES, labels=[f"{t:g}" for t in TOLERANCES])
    by_tolerance.minorticks_off()
    calibration.plot([0, 1], [0, 1], color="0.5", linewidth=0.6, linestyle="--")
    calibration.set(xlabel="predicted uncertainty u", ylabel="observed mean tanh|eps_exit - eps_full|",
                    title="calibration (exits before the last)")
    fig.legend(*by_exit.get_legend_handles_labels(), loc="outside lower center", ncol=min(3, len(settings)),
               frameon=False, fontsize=5.5)
    seeds = len({seed for setting in settings for seed in setting.seeds})
    fig.suptitle(f"AdaDiff estimator quality without thresholds, on held-out evaluation seeds (mean over {seeds})",
                 fontsize=7.5)
    return paths + save(fig, out, "estimator_quality")
