"""Figures any step log feeds: where and when samples exit, and how much of the network each step runs.

Each function takes a one-run `ReportView` (the report draws these once per run), reads the cells'
step-log summaries through it, returns the paths it wrote (PNG + PDF per figure) and returns [] when
the run holds nothing it could show.

    exit_heatmaps            sampling step x exit point, fraction of samples, one panel per method setting
    exit_distributions       fraction of samples vs blocks run at a few sampling steps
    layer_ratio_by_timestep  fraction of blocks run at each timestep t, one line per method setting

To keep figures readable, each [[methods]] entry contributes one setting: the one whose layer ratio
is closest to `TARGET_LAYER_RATIO`. Figures of AdaDiff's own artifacts are in `adadiff_figures`.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd

from .style import DOUBLE, SINGLE, hatch_background, masked_cmap, new_figure, save, style, styled, wrap
from .tables import knobs_of, swept_of
from .view import ReportView

TARGET_LAYER_RATIO = 0.7
HEATMAP_NORM = dict(gamma=0.5, vmin=0.0, vmax=1.0)  # square-root colour scale: small fractions stay visible


# ---- what the step log says ---------------------------------------------------------------------

def exits_by_prefix(exits: dict[str, np.ndarray]) -> bool:
    """Does any sample stop before the last block (exit points 1 .. num_blocks - 1)?"""
    histogram = exits["timestep_exit_histogram"]
    return bool(histogram[:, 1:-1].sum() > 0)


def exit_fractions(timestep_exit_histogram: np.ndarray) -> np.ndarray:
    """(num_steps, num_blocks): fraction of a step's samples at each exit point 1..num_blocks (NaN: step not run)."""
    histogram = np.asarray(timestep_exit_histogram, dtype=float)
    totals = histogram.sum(axis=1, keepdims=True)  # includes column 0, the samples that did not exit by prefix
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, histogram[:, 1:] / totals, np.nan)


def layer_ratio_per_step(timestep_block_fraction: np.ndarray) -> np.ndarray:
    """(num_steps,): fraction of the blocks run at each step, averaged over samples and blocks."""
    return np.asarray(timestep_block_fraction, dtype=float).mean(axis=1)


def _entries(frame: pd.DataFrame) -> pd.Series:
    """The [[methods]] entry of each row (older runs without the column: one entry per method)."""
    return frame["entry"] if "entry" in frame.columns else frame["method"]


def closest_per_entry(frame: pd.DataFrame, eligible: pd.Series, target: float = TARGET_LAYER_RATIO) -> pd.DataFrame:
    """One row per [[methods]] entry: among its eligible rows, the one with layer ratio closest to `target`."""
    rows = frame[eligible]
    if rows.empty:
        return rows
    distance = (rows["layer_ratio"] - target).abs()
    # stable sort: ties go to the earlier row (the first seed, the first point of the sweep)
    order = distance.sort_values(kind="stable").index
    picked = rows.loc[order].groupby(_entries(rows).loc[order], sort=True).head(1)
    return picked.sort_values(["entry"] if "entry" in picked.columns else ["method"], kind="stable")


def all_exits(view: ReportView) -> dict[str, dict]:
    """cell id -> step-log summaries, for every cell of a one-run view that has per-step ones."""
    found = {}
    for _, row in view.frame.iterrows():
        exits = view.exits(row)
        if exits is not None:
            found[row["cell_id"]] = exits
    return found


def early_exit_settings(view: ReportView) -> tuple[pd.DataFrame, dict[str, dict]]:
    """One early-exit setting per entry (closest to the target layer ratio) and the exits of every cell."""
    frame, exits = view.frame, all_exits(view)
    eligible = frame["cell_id"].map(lambda c: c in exits and exits_by_prefix(exits[c]))
    return closest_per_entry(frame, eligible.astype(bool)), exits


# ---- labels --------------------------------------------------------------------------------------

def short_knob_value(value) -> str:
    """Paths as their file stem (a results-cell path as its method), numbers as written."""
    if isinstance(value, str) and "/" in value:
        stem = Path(value).stem
        return stem if len(stem) <= 24 else stem.split("-")[0] + "…"
    return str(value)


def setting_labels(rows: pd.DataFrame) -> list[str]:
    """Compact labels: the method, its swept knobs and the knobs that tell it apart from other rows of that method."""
    knobs = [{k: v for k, v in knobs_of(row).items() if not k.startswith("map_")} for _, row in rows.iterrows()]
    labels = []
    for i, (_, row) in enumerate(rows.iterrows()):
        same_method = [knobs[j] for j in range(len(rows)) if rows["method"].iloc[j] == row["method"]]
        swept = swept_of(row)
        shown = [k for k, v in knobs[i].items()
                 if k in swept or any(other.get(k) != v for other in same_method)]
        parts = [f"{k}={short_knob_value(knobs[i][k])}" for k in shown]
        if rows["num_steps"].nunique() > 1 or rows["solver"].nunique() > 1:
            parts.append(f"{row['solver']} {row['num_steps']} steps")
        labels.append(row["method"] + (f" ({', '.join(parts)})" if parts else ""))
    return labels


def _timestep_ticks(timesteps: np.ndarray, count: int = 6) -> tuple[np.ndarray, list[str]]:
    positions = np.unique(np.linspace(0, len(timesteps) - 1, min(count, len(timesteps))).round().astype(int))
    return positions, [f"{timesteps[p]:.0f}" for p in positions]


def short_id(row: pd.Series) -> str:
    """A short, file-safe id of a cell: method, swept knob values and the cell id's tail."""
    knobs = knobs_of(row)
    parts = [f"{k}{short_knob_value(knobs[k])}" for k in swept_of(row) if k in knobs]
    tail = str(row["cell_id"]).rsplit("-", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "-".join([row["method"], *parts, tail]))


# ---- 1. exit heatmaps ----------------------------------------------------------------------------

def _draw_heatmap(ax, fractions: np.ndarray, timesteps: np.ndarray):
    """Rows = sampling steps (noisiest at the top), columns = exit points 1..num_blocks."""
    num_steps, num_blocks = fractions.shape
    hatch_background(ax)
    image = ax.imshow(np.ma.masked_invalid(fractions), aspect="auto", interpolation="nearest",
                      cmap=masked_cmap("viridis"), norm=mcolors.PowerNorm(**HEATMAP_NORM),
                      extent=(0.5, num_blocks + 0.5, num_steps - 0.5, -0.5), zorder=1)
    ax.grid(False)
    ax.set_xticks(range(1, num_blocks + 1, 2 if num_blocks > 8 else 1))
    positions, labels = _timestep_ticks(timesteps)
    ax.set_yticks(positions, labels)
    return image


def _heatmap_colorbar(fig, image, axes) -> None:
    bar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.02, aspect=30)
    bar.set_label("fraction of samples (√ scale)")
    bar.set_ticks([0, 0.05, 0.2, 0.5, 1.0])


@styled
def exit_heatmaps(view: ReportView, out: str | Path, per_cell: bool = True) -> list[Path]:
    """Sampling step x exit point heatmaps of the fraction of samples, one panel per early-exit setting
    (and, with `per_cell`, one figure per setting under exit_heatmaps/)."""
    out = Path(out)
    picked, exits = early_exit_settings(view)
    if picked.empty:
        return []
    labels = setting_labels(picked)
    ncols = min(3, len(picked))
    nrows = int(np.ceil(len(picked) / ncols))
    fig, axes = new_figure(DOUBLE, max(2.3, 0.4 + 1.75 * nrows), nrows, ncols, squeeze=False)
    for ax in axes.flat[len(picked):]:
        ax.set_visible(False)
    for i, (ax, (_, row), label) in enumerate(zip(axes.flat, picked.iterrows(), labels)):
        cell = exits[row["cell_id"]]
        image = _draw_heatmap(ax, exit_fractions(cell["timestep_exit_histogram"]), cell["timesteps"])
        ax.set_title(wrap(f"{label}, layer ratio {row['layer_ratio']:.2f}", 44), fontsize=6.5)
        if i % ncols == 0:
            ax.set_ylabel("timestep t (sampling step ↓)")
        if i + ncols >= len(picked):
            ax.set_xlabel("exit point (blocks run)")
    _heatmap_colorbar(fig, image, [ax for ax in axes.flat if ax.get_visible()])
    skipped = any(np.isnan(exit_fractions(exits[c]["timestep_exit_histogram"])).any() for c in picked["cell_id"])
    fig.suptitle("Where samples exit at each sampling step (one setting per method entry, layer ratio closest "
                 f"to {TARGET_LAYER_RATIO:g})" + ("; hatched: step not run" if skipped else ""), fontsize=7.5)
    written = save(fig, out, "exit_heatmaps")
    if per_cell:
        for (_, row), label in zip(picked.iterrows(), labels):
            written += _single_heatmap(exits[row["cell_id"]], row, label, out)
    return written


def _single_heatmap(cell: dict, row: pd.Series, label: str, out: Path) -> list[Path]:
    fig, ax = new_figure(SINGLE, 2.6)
    image = _draw_heatmap(ax, exit_fractions(cell["timestep_exit_histogram"]), cell["timesteps"])
    ax.set_title(wrap(f"{label}, layer ratio {row['layer_ratio']:.2f}", 48))
    ax.set_ylabel("timestep t (sampling step ↓)")
    ax.set_xlabel("exit point (blocks run)")
    _heatmap_colorbar(fig, image, ax)
    name = str(row["cell_id"]) if len(str(row["cell_id"])) <= 200 else short_id(row)  # file names stop at 255 bytes
    return save(fig, out / "exit_heatmaps", name)  # one file per cell, in a subfolder


# ---- 2. exit distributions at chosen steps -------------------------------------------------------

def spread_steps(num_steps: int, count: int = 4) -> list[int]:
    """`count` sampling-step indices spread evenly from the first step to the last."""
    return sorted(set(np.linspace(0, num_steps - 1, min(count, num_steps)).round().astype(int).tolist()))


@styled
def exit_distributions(view: ReportView, out: str | Path, steps: list[int] | None = None) -> list[Path]:
    """Fraction of samples vs blocks run at a few sampling steps, one line per early-exit setting."""
    out = Path(out)
    picked, exits = early_exit_settings(view)
    if picked.empty:
        return []
    cells = [exits[c] for c in picked["cell_id"]]
    longest = max(cells, key=lambda c: len(c["timesteps"]))
    steps = spread_steps(len(longest["timesteps"])) if steps is None else sorted(set(int(s) for s in steps))
    steps = [s for s in steps if 0 <= s < len(longest["timesteps"])]
    if not steps:
        return []
    same_grid = all(np.array_equal(c["timesteps"], longest["timesteps"]) for c in cells)
    fig, axes = new_figure(DOUBLE, 2.5 + 0.12 * len(picked), 1, len(steps), sharey=True, squeeze=False)
    for ax, step in zip(axes[0], steps):
        for i, cell in enumerate(cells):
            if step >= len(cell["timesteps"]):
                continue
            fractions = exit_fractions(cell["timestep_exit_histogram"])[step]
            blocks = np.arange(1, len(fractions) + 1)
            ax.plot(blocks, fractions, alpha=0.85, **style(i))
        t = f", t = {longest['timesteps'][step]:.0f}" if same_grid else ""
        ax.set_title(f"step {step + 1} of {len(longest['timesteps'])}{t}")
        ax.set_xlabel("exit point (blocks run)")
        ax.set_xticks(range(1, longest["timestep_exit_histogram"].shape[1], 2))
        ax.set_ylim(-0.02, 1.02)
    axes[0, 0].set_ylabel("fraction of the step's samples")
    handles = [axes[0, 0].plot([], [], **style(i))[0] for i in range(len(picked))]
    fig.legend(handles, [wrap(f"{label}, layer ratio {lr:.2f}", 72) for label, lr in
                         zip(setting_labels(picked), picked["layer_ratio"])],
               loc="outside lower center", ncol=2 if len(picked) > 3 else 1, frameon=False)
    fig.suptitle("Exit-point distribution at chosen sampling steps (one setting per method entry)", fontsize=7.5)
    return save(fig, out, "exit_distributions")


# ---- 3. layer ratio by timestep ------------------------------------------------------------------

def is_reference_full(row: pd.Series) -> bool:
    """The plain `full` sampler: every block at every step, no knobs."""
    return row["method"] == "full" and not knobs_of(row)


def runs_every_block(exits: dict[str, np.ndarray]) -> bool:
    return bool(np.allclose(exits["timestep_block_fraction"], 1.0))


def layer_ratio_settings(view: ReportView) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict]]:
    """(settings that save compute: one per entry, closest to the target; the reference `full`; every cell's exits).

    The reference is one cell that runs every block, `full` without knobs where there is one, at the
    solver and step count that most of the settings use.
    """
    frame, exits = view.frame, all_exits(view)
    has_exits = frame["cell_id"].map(lambda c: c in exits).astype(bool)
    picked = closest_per_entry(frame, has_exits)
    varying = picked[~picked["cell_id"].map(lambda c: runs_every_block(exits[c])).astype(bool)]
    full = frame[has_exits & (frame["method"] == "full")]
    full = full[full["cell_id"].map(lambda c: runs_every_block(exits[c])).astype(bool)]
    if full.empty or varying.empty:
        return varying, full, exits
    plain = full.apply(is_reference_full, axis=1)
    usual = varying[["solver", "num_steps"]].value_counts().index[0]
    same_sampler = (full["solver"] == usual[0]) & (full["num_steps"] == usual[1])
    order = (-2 * plain.astype(int) - same_sampler.astype(int)).sort_values(kind="stable").index
    return varying, full.loc[order[:1]], exits


@styled
def layer_ratio_by_timestep(view: ReportView, out: str | Path) -> list[Path]:
    """Fraction of blocks run vs timestep t: lines for early exits, a raster for caching/dropping/skipping."""
    out = Path(out)
    varying, reference, exits = layer_ratio_settings(view)
    if varying.empty:
        return []
    by_prefix = varying["cell_id"].map(lambda c: exits_by_prefix(exits[c])).astype(bool)
    early, others = varying[by_prefix], varying[~by_prefix]
    heights = ([2.3] if not early.empty else []) + ([0.75 + 0.17 * len(others)] if not others.empty else [])
    fig, placeholder = new_figure(DOUBLE, sum(heights) + 0.3)
    placeholder.remove()  # one sub-figure per panel, so each lays out its own labels and legend
    panels = iter(np.atleast_1d(fig.subfigures(len(heights), 1, height_ratios=heights)))
    if not early.empty:
        _layer_ratio_lines(next(panels).subplots(), pd.concat([reference, early]), len(reference), exits)
    if not others.empty:
        panel = next(panels)
        _layer_ratio_raster(panel, panel.subplots(), others, exits)
    fig.suptitle("Compute per timestep (one setting per method entry, layer ratio closest to "
                 f"{TARGET_LAYER_RATIO:g})", fontsize=7.5)
    return save(fig, out, "layer_ratio_by_timestep")


def _layer_ratio_lines(ax, rows: pd.DataFrame, num_reference: int, exits: dict) -> None:
    """Settings that exit by prefix: one line each; the reference `full` dashed grey."""
    for i, ((_, row), label) in enumerate(zip(rows.iterrows(), setting_labels(rows))):
        cell = exits[row["cell_id"]]
        kw = dict(color="0.3", linestyle="--", marker=None) if i < num_reference else style(i - num_reference)
        ax.plot(cell["timesteps"], layer_ratio_per_step(cell["timestep_block_fraction"]), markersize=2.5,
                label=f"{label}, layer ratio {row['layer_ratio']:.2f}", **kw)
    ax.set_xlim(1000, -10)  # sampling runs from t = 999 (left) to t = 0 (right)
    ax.set_ylim(-0.03, 1.05)
    ax.set_title("Methods that exit early (per sample, by prefix)")
    ax.set_xlabel("timestep t (sampling runs left to right)")
    ax.set_ylabel("layer ratio at that step\n(fraction of blocks run)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=5.5)


def _layer_ratio_raster(fig, ax, rows: pd.DataFrame, exits: dict) -> None:
    """Settings that cache, drop layers or skip steps: one raster row each (their per-step compute alternates)."""
    for i, (_, row) in enumerate(rows.iterrows()):
        cell = exits[row["cell_id"]]
        t = np.asarray(cell["timesteps"], dtype=float)
        edges = np.concatenate([[t[0] + (t[0] - t[1]) / 2 if len(t) > 1 else t[0] + 0.5],
                                (t[1:] + t[:-1]) / 2, [t[-1] - (t[-2] - t[-1]) / 2 if len(t) > 1 else t[-1] - 0.5]])
        image = ax.pcolormesh(edges, [i - 0.45, i + 0.45], layer_ratio_per_step(cell["timestep_block_fraction"])[None],
                              cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    labels = [f"{label}, layer ratio {lr:.2f}" for label, lr in zip(setting_labels(rows), rows["layer_ratio"])]
    ax.set_yticks(range(len(rows)), labels, fontsize=5.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(1000, -10)
    ax.grid(False)
    ax.set_title("Methods that cache, drop layers or skip steps")
    ax.set_xlabel("timestep t (sampling runs left to right)")
    bar = fig.colorbar(image, ax=ax, pad=0.01, aspect=12)
    bar.set_label("layer ratio at that step", fontsize=6)


