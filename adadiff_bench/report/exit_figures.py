"""Figures from the step-log summaries and AdaDiff's artifacts: where, when and why samples exit.

Each function reads only the results store (`results.csv` and `cells/<cell_id>/*.npz`), returns the
paths it wrote (PNG + PDF per figure) and returns [] when the run holds nothing it could show.

    exit_heatmaps            sampling step x exit point, fraction of samples, one panel per method setting
    exit_distributions       fraction of samples vs blocks run at a few sampling steps
    layer_ratio_by_timestep  fraction of blocks run at each timestep t, one line per method setting
    uncertainty_maps         AdaDiff's per-pixel uncertainty at a few exit points and recorded steps
    estimator_ablation       FID vs layer ratio for each ablated AdaDiff knob (estimator, backbone, loss)
    exit_figures             all of the above

To keep figures readable, each [[methods]] entry contributes one setting: the one whose layer ratio
is closest to `TARGET_LAYER_RATIO`.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.patches as mpatches
import numpy as np
import pandas as pd

from .style import DOUBLE, SINGLE, new_figure, save, style, styled
from .tables import primary_fid_column

TARGET_LAYER_RATIO = 0.7
STEP_SUMMARIES = ("timesteps", "timestep_exit_histogram", "timestep_block_fraction")
ABLATED_KNOBS = ("estimator", "backbone", "loss")
HEATMAP_NORM = dict(gamma=0.5, vmin=0.0, vmax=1.0)  # square-root colour scale: small fractions stay visible
NO_DATA_HATCH = dict(facecolor="#e8e8e8", edgecolor="#9a9a9a", hatch="////", linewidth=0)


# ---- reading the store -------------------------------------------------------------------------

def load_exits(run_dir: Path, cell_id: str) -> dict[str, np.ndarray] | None:
    """A cell's step-log summaries (`exits.npz`), or None when the cell lacks the per-step ones."""
    path = Path(run_dir) / "cells" / str(cell_id) / "exits.npz"
    if not path.is_file():
        return None
    with np.load(path) as archive:
        if not all(key in archive.files for key in STEP_SUMMARIES):
            return None
        return {key: archive[key] for key in archive.files}


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


def _knobs(row: pd.Series) -> dict:
    params = row.get("params", "")
    return json.loads(params) if isinstance(params, str) and params else {}


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


def _all_exits(frame: pd.DataFrame, run_dir: Path) -> dict[str, dict]:
    found = {}
    for cell_id in frame["cell_id"]:
        exits = load_exits(run_dir, cell_id)
        if exits is not None:
            found[cell_id] = exits
    return found


def early_exit_settings(frame: pd.DataFrame, run_dir: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """One early-exit setting per entry (closest to the target layer ratio) and the exits of every cell."""
    exits = _all_exits(frame, run_dir)
    eligible = frame["cell_id"].map(lambda c: c in exits and exits_by_prefix(exits[c]))
    return closest_per_entry(frame, eligible.astype(bool)), exits


# ---- labels --------------------------------------------------------------------------------------

def _short_value(value) -> str:
    """Paths as their file stem (a results-cell path as its method), numbers as written."""
    if isinstance(value, str) and "/" in value:
        stem = Path(value).stem
        return stem if len(stem) <= 24 else stem.split("-")[0] + "…"
    return str(value)


def setting_labels(rows: pd.DataFrame) -> list[str]:
    """Compact labels: the method, its swept knobs and the knobs that tell it apart from other rows of that method."""
    knobs = [{k: v for k, v in _knobs(row).items() if not k.startswith("map_")} for _, row in rows.iterrows()]
    labels = []
    for i, (_, row) in enumerate(rows.iterrows()):
        same_method = [knobs[j] for j in range(len(rows)) if rows["method"].iloc[j] == row["method"]]
        swept = json.loads(row["swept"]) if isinstance(row.get("swept"), str) and row.get("swept") else []
        shown = [k for k, v in knobs[i].items()
                 if k in swept or any(other.get(k) != v for other in same_method)]
        parts = [f"{k}={_short_value(knobs[i][k])}" for k in shown]
        if rows["num_steps"].nunique() > 1 or rows["solver"].nunique() > 1:
            parts.append(f"{row['solver']} {row['num_steps']} steps")
        labels.append(row["method"] + (f" ({', '.join(parts)})" if parts else ""))
    return labels


def _wrap(text: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))


def _timestep_ticks(timesteps: np.ndarray, count: int = 6) -> tuple[np.ndarray, list[str]]:
    positions = np.unique(np.linspace(0, len(timesteps) - 1, min(count, len(timesteps))).round().astype(int))
    return positions, [f"{timesteps[p]:.0f}" for p in positions]


def _no_data_patch(label: str) -> mpatches.Patch:
    return mpatches.Patch(label=label, **NO_DATA_HATCH)


def _hatch_background(ax) -> None:
    """Hatched grey behind an image: its NaN pixels (drawn transparent) show it."""
    ax.add_patch(mpatches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, zorder=0, **NO_DATA_HATCH))


def _masked_cmap(name: str):
    return matplotlib.colormaps[name].with_extremes(bad=(0, 0, 0, 0))  # NaN transparent, over the hatched background


# ---- 1. exit heatmaps ----------------------------------------------------------------------------

def _draw_heatmap(ax, fractions: np.ndarray, timesteps: np.ndarray):
    """Rows = sampling steps (noisiest at the top), columns = exit points 1..num_blocks."""
    num_steps, num_blocks = fractions.shape
    _hatch_background(ax)
    image = ax.imshow(np.ma.masked_invalid(fractions), aspect="auto", interpolation="nearest",
                      cmap=_masked_cmap("viridis"), norm=mcolors.PowerNorm(**HEATMAP_NORM),
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
def exit_heatmaps(frame: pd.DataFrame, run_dir: str | Path, out: str | Path, per_cell: bool = True) -> list[Path]:
    """Sampling step x exit point heatmaps of the fraction of samples, one panel per early-exit setting."""
    run_dir, out = Path(run_dir), Path(out)
    picked, exits = early_exit_settings(frame, run_dir)
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
        ax.set_title(_wrap(f"{label}, layer ratio {row['layer_ratio']:.2f}", 44), fontsize=6.5)
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
    ax.set_title(_wrap(f"{label}, layer ratio {row['layer_ratio']:.2f}", 48))
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
def exit_distributions(frame: pd.DataFrame, run_dir: str | Path, out: str | Path,
                       steps: list[int] | None = None) -> list[Path]:
    """Fraction of samples vs blocks run at a few sampling steps, one line per early-exit setting."""
    run_dir, out = Path(run_dir), Path(out)
    picked, exits = early_exit_settings(frame, run_dir)
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
    fig.legend(handles, [f"{label}, layer ratio {lr:.2f}" for label, lr in
                         zip(setting_labels(picked), picked["layer_ratio"])],
               loc="outside lower center", ncol=2 if len(picked) > 3 else 1, frameon=False)
    fig.suptitle("Exit-point distribution at chosen sampling steps (one setting per method entry)", fontsize=7.5)
    return save(fig, out, "exit_distributions")


# ---- 3. layer ratio by timestep ------------------------------------------------------------------

def _is_reference_full(row: pd.Series) -> bool:
    return row["method"] == "full" and not _knobs(row)


def runs_every_block(exits: dict[str, np.ndarray]) -> bool:
    return bool(np.allclose(exits["timestep_block_fraction"], 1.0))


def layer_ratio_settings(frame: pd.DataFrame, run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict]]:
    """(settings that save compute: one per entry, closest to the target; the reference `full`; every cell's exits).

    The reference is one cell that runs every block, `full` without knobs where there is one, at the
    solver and step count that most of the settings use.
    """
    exits = _all_exits(frame, run_dir)
    has_exits = frame["cell_id"].map(lambda c: c in exits).astype(bool)
    picked = closest_per_entry(frame, has_exits)
    varying = picked[~picked["cell_id"].map(lambda c: runs_every_block(exits[c])).astype(bool)]
    full = frame[has_exits & (frame["method"] == "full")]
    full = full[full["cell_id"].map(lambda c: runs_every_block(exits[c])).astype(bool)]
    if full.empty or varying.empty:
        return varying, full, exits
    plain = full.apply(_is_reference_full, axis=1)
    usual = varying[["solver", "num_steps"]].value_counts().index[0]
    same_sampler = (full["solver"] == usual[0]) & (full["num_steps"] == usual[1])
    order = (-2 * plain.astype(int) - same_sampler.astype(int)).sort_values(kind="stable").index
    return varying, full.loc[order[:1]], exits


@styled
def layer_ratio_by_timestep(frame: pd.DataFrame, run_dir: str | Path, out: str | Path) -> list[Path]:
    """Fraction of blocks run vs timestep t: lines for early exits, a raster for caching/dropping/skipping."""
    run_dir, out = Path(run_dir), Path(out)
    varying, reference, exits = layer_ratio_settings(frame, run_dir)
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


# ---- 4. AdaDiff's per-pixel uncertainty maps -----------------------------------------------------

def load_maps(run_dir: Path, cell_id: str) -> dict[str, np.ndarray] | None:
    path = Path(run_dir) / "cells" / str(cell_id) / "uncertainty_maps.npz"
    if not path.is_file():
        return None
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def map_cells(frame: pd.DataFrame, run_dir: Path, limit: int = 2) -> list[tuple[pd.Series, dict]]:
    """Up to `limit` cells with uncertainty maps: most recorded steps first, then layer ratio closest to the target."""
    found = []
    for _, row in frame.iterrows():
        maps = load_maps(run_dir, row["cell_id"])
        if maps is not None and len(maps["steps"]):
            found.append((-len(maps["steps"]), abs(row["layer_ratio"] - TARGET_LAYER_RATIO), len(found), row, maps))
    found.sort(key=lambda item: item[:3])
    return [(row, maps) for *_, row, maps in found[:limit]]


def shown_exit_points(num_exits: int, count: int = 4) -> list[int]:
    """Exit points 1..num_exits to show: the first, the last and evenly spaced ones between."""
    return sorted(set(np.linspace(1, num_exits, min(count, num_exits)).round().astype(int).tolist()))


def short_id(row: pd.Series) -> str:
    """A short, file-safe id of a cell: method, swept knob values and the cell id's tail."""
    knobs = _knobs(row)
    swept = json.loads(row["swept"]) if isinstance(row.get("swept"), str) and row.get("swept") else []
    parts = [f"{k}{_short_value(knobs[k])}" for k in swept if k in knobs]
    tail = str(row["cell_id"]).rsplit("-", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "-".join([row["method"], *parts, tail]))


def _grey_limits(image: np.ndarray) -> tuple[float, float]:
    low, high = np.nanpercentile(image, [1, 99]) if np.isfinite(image).any() else (0.0, 1.0)
    return float(low), float(max(high, low + 1e-6))


@styled
def uncertainty_maps(frame: pd.DataFrame, run_dir: str | Path, out: str | Path, num_samples: int = 2) -> list[Path]:
    """Per recorded step (rows): the noisy input x_t and the per-pixel uncertainty at a few exit points."""
    run_dir, out = Path(run_dir), Path(out)
    written = []
    for row, maps in map_cells(frame, run_dir):
        written += _uncertainty_figure(row, maps, run_dir, out, num_samples)
    return written


def _uncertainty_figure(row: pd.Series, maps: dict, run_dir: Path, out: Path, num_samples: int) -> list[Path]:
    u, inputs = maps["maps"], maps["inputs"]                  # (k, samples, exits, C, H, W), (k, samples, C, H, W)
    samples = [s for s in range(u.shape[1]) if np.isfinite(inputs[:, s]).any()][:num_samples]
    if not samples or u.shape[2] == 0:
        return []
    exit_points = shown_exit_points(u.shape[2])
    finals = _final_samples(run_dir, row["cell_id"], samples)
    per_sample = 1 + len(exit_points) + (1 if finals is not None else 0)
    nrows = len(maps["steps"])
    fig, axes = new_figure(DOUBLE, 0.75 + 0.72 * nrows, nrows, per_sample * len(samples), squeeze=False)
    for r, (step, t) in enumerate(zip(maps["steps"], maps["timesteps"])):
        for g, s in enumerate(samples):
            final = finals[g] if finals is not None else None
            image = _draw_sample(axes[r, g * per_sample:(g + 1) * per_sample], u[r, s], inputs[r, s], exit_points,
                                 final if r == 0 else None, s if r == 0 else None)
        axes[r, 0].set_ylabel(f"step {step + 1}\nt = {t:.0f}", fontsize=6.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.spines[:].set_visible(True)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01, aspect=25)
    bar.set_label("uncertainty u (estimated tanh|ε̂ − ε|, 0 to 1)", fontsize=6)
    fig.legend(handles=[_no_data_patch("no map: the sample had already exited")], loc="outside lower center",
               frameon=False, fontsize=6)
    threshold = _knobs(row).get("threshold")
    rule = f"; a sample exits once its mean u ≤ {threshold}" if threshold is not None else ""
    label = setting_labels(pd.DataFrame([row]))[0]
    fig.suptitle(_wrap(f"AdaDiff per-pixel uncertainty, {label}, layer ratio {row['layer_ratio']:.2f}{rule}; "
                       "$x_t$ shown with per-panel contrast", 130), fontsize=7)
    return save(fig, out, f"uncertainty_maps_{short_id(row)}")


def _draw_sample(axes, u, x_t, exit_points, final, title_sample):
    """One sample at one step: input x_t, its uncertainty at each shown exit point, then (top row) its final image.

    `u`: (exits, C, H, W), NaN after the sample exited; `final`/`title_sample` are None below the top row.
    """
    x_t = x_t.mean(axis=0)  # channels averaged for display
    low, high = _grey_limits(x_t)
    axes[0].imshow(x_t, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    axes[0].set_xlabel(_exit_note(u), fontsize=5.5, labelpad=1)
    for ax, exit_point in zip(axes[1:], exit_points):
        _hatch_background(ax)
        pixels = u[exit_point - 1].mean(axis=0)
        image = ax.imshow(np.ma.masked_invalid(pixels), cmap=_masked_cmap("cividis"), vmin=0.0, vmax=1.0,
                          interpolation="nearest", zorder=1)
        ax.set_xlabel(f"mean u {np.nanmean(pixels):.2f}" if np.isfinite(pixels).any() else "exited",
                      fontsize=5.5, labelpad=1)
        if title_sample is not None:
            ax.set_title(f"u, block {exit_point}", fontsize=6)
    if len(axes) > len(exit_points) + 1:  # the final-image column
        if final is None:
            axes[-1].set_visible(False)
        else:
            axes[-1].imshow(final, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes[-1].set_title("final $x_0$", fontsize=6)
    if title_sample is not None:
        axes[0].set_title(f"sample {title_sample}\ninput $x_t$", fontsize=6)
    return image


def recorded_exit(sample_maps: np.ndarray) -> int | None:
    """Exit point of one sample at one step from its maps (exits, C, H, W): the last exit point with a map,
    or None when it had a map at every exit point (it ran to the last exit point or beyond)."""
    recorded = np.flatnonzero(np.isfinite(sample_maps.reshape(len(sample_maps), -1)).any(axis=1))
    if len(recorded) == 0 or recorded[-1] == len(sample_maps) - 1:
        return None
    return int(recorded[-1]) + 1


def _exit_note(sample_maps: np.ndarray) -> str:
    exit_point = recorded_exit(sample_maps)
    return f"exit: block {exit_point}" if exit_point else f"exit: ≥ {len(sample_maps)}"


def _final_samples(run_dir: Path, cell_id: str, samples: list[int]) -> np.ndarray | None:
    """The generated images (H, W, uint8, channels averaged) of the chosen samples, if the cell kept them."""
    path = run_dir / "cells" / str(cell_id) / "samples.npz"
    if not path.is_file():
        return None
    with np.load(path) as archive:
        images = archive["arr_0"]
    if len(images) <= max(samples):
        return None
    return images[samples].mean(axis=-1)


# ---- 5. estimator ablation -----------------------------------------------------------------------

def ablated_knobs(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each AdaDiff ablation knob that takes two or more values in the run -> the adadiff rows that set it."""
    adadiff = frame[frame["method"] == "adadiff"]
    knobs = pd.DataFrame([_knobs(row) for _, row in adadiff.iterrows()], index=adadiff.index)
    found = {}
    for knob in ABLATED_KNOBS:
        if knob in knobs.columns:
            values = knobs[knob].replace("", np.nan).dropna()
            if values.nunique() > 1:
                found[knob] = adadiff.loc[values.index].assign(**{knob: values})
    return found


def _reference_fid(frame: pd.DataFrame, fid: str, like: pd.DataFrame) -> float | None:
    """Mean FID of the plain `full` row, at the ablation's solver and steps when it was run there."""
    full = frame[frame.apply(_is_reference_full, axis=1)]
    same = full[full["solver"].isin(like["solver"]) & full["num_steps"].isin(like["num_steps"])]
    values = (same if not same.empty else full)[fid].dropna()
    return float(values.mean()) if len(values) else None


def _sweep_points(group: pd.DataFrame, fid: str) -> pd.DataFrame:
    """Mean layer ratio and FID per threshold (over seeds), ordered by layer ratio."""
    thresholds = [_knobs(row).get("threshold", np.nan) for _, row in group.iterrows()]
    points = group.assign(threshold=thresholds).groupby("threshold", dropna=False)[["layer_ratio", fid]].mean()
    return points.sort_values("layer_ratio")


def _label_thresholds(ax, points: pd.DataFrame, fid: str, index: int) -> None:
    """Write each point's threshold beside it; points that would overlap on the axes share one label."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    near = lambda a, b: abs(a[0] - b[0]) < 0.04 * (x1 - x0) and abs(a[1] - b[1]) < 0.05 * (y1 - y0)  # noqa: E731
    clusters: list[tuple[tuple[float, float], list]] = []
    for threshold, p in points.iterrows():
        xy = (p["layer_ratio"], p[fid])
        if clusters and near(clusters[-1][0], xy):
            clusters[-1][1].append(threshold)
        else:
            clusters.append((xy, [threshold]))
    for xy, thresholds in clusters:
        ax.annotate(",".join(f"{t:g}" for t in sorted(thresholds)), xy, textcoords="offset points",
                    xytext=(4, 2 + 4 * index), fontsize=4.5, color=style(index)["color"])


@styled
def estimator_ablation(frame: pd.DataFrame, out: str | Path) -> list[Path]:
    """FID vs layer ratio, one panel per ablated AdaDiff knob, one curve per value along the threshold sweep."""
    out = Path(out)
    fid = primary_fid_column(frame)
    if fid is None:
        return []
    valid = frame[frame["valid"].astype(bool)] if "valid" in frame.columns else frame
    knobs = ablated_knobs(valid)
    if not knobs:
        return []
    fig, axes = new_figure(DOUBLE, 3.1, 1, len(knobs), squeeze=False)
    n = int(frame["num_samples"].iloc[0]) if "num_samples" in frame.columns else None
    reference = _reference_fid(valid, fid, pd.concat(knobs.values()))
    for ax, (knob, rows) in zip(axes[0], knobs.items()):
        curves = [(value, _sweep_points(group, fid)) for value, group in rows.groupby(knob, sort=False)]
        for i, (value, points) in enumerate(curves):
            never = " (never exits)" if np.allclose(points["layer_ratio"], 1.0) else ""
            # earlier curves drawn with bigger markers, so that coinciding curves stay visible
            ax.plot(points["layer_ratio"], points[fid], label=f"{knob} = {value}{never}",
                    **{**style(i), "markersize": 3.0 + 1.0 * (len(curves) - 1 - i)})
        if reference is not None:
            ax.axhline(reference, color="0.3", linestyle="--", linewidth=0.9, label=f"full ({reference:.2f})")
        low = min(0.9, float(rows["layer_ratio"].min()) - 0.05)
        ax.set_xlim(low, 1.0 + 0.04 * (1.0 - low))
        for i, (_, points) in enumerate(curves):
            _label_thresholds(ax, points, fid, i)
        ax.set_title(f"ablated: {knob}")
        ax.set_xlabel("layer ratio (fraction of blocks run)")
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    space = fid.removeprefix("fid_")
    axes[0, 0].set_ylabel(f"FID [{space}" + (f", n={n}" if n else "") + "] (lower is better)")
    fig.suptitle("AdaDiff ablation: FID vs layer ratio along the threshold sweep (points labelled by threshold)",
                 fontsize=7.5)
    return save(fig, out, "estimator_ablation")


# ---- 6. all of them ------------------------------------------------------------------------------

def exit_figures(frame: pd.DataFrame, run_dir: str | Path, out: str | Path) -> list[Path]:
    """Every figure of this module that the run has data for."""
    return (exit_heatmaps(frame, run_dir, out) + exit_distributions(frame, run_dir, out)
            + layer_ratio_by_timestep(frame, run_dir, out) + uncertainty_maps(frame, run_dir, out)
            + estimator_ablation(frame, out))
