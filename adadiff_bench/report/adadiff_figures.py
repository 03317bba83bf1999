"""Figures only AdaDiff's artifacts feed: its per-pixel uncertainty maps and the ablation of its estimator.

Each function takes a one-run `ReportView` (the report draws these once per run), returns the paths
it wrote (PNG + PDF per figure) and returns [] when the run holds nothing it could show.

    uncertainty_maps     AdaDiff's per-pixel uncertainty at a few exit points and recorded steps
                         (from the cells' `uncertainty_maps` artifact)
    estimator_ablation   FID vs layer ratio for each ablated AdaDiff knob (estimator, backbone, loss), along
                         a threshold sweep or at matched compute (`target_layer_ratio`, unreached targets ringed)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.specs import primary_column, ranking_label
from .exit_figures import TARGET_LAYER_RATIO, is_reference_full, setting_labels, short_id
from .style import (DOUBLE, escape_math, hatch_background, masked_cmap, new_figure, no_data_patch, save, style,
                    styled, wrap)
from .tables import axis_label, knobs_of
from .view import ReportView

UNCERTAINTY_MAPS = "uncertainty_maps"  # the artifact AdaDiff saves per cell
ABLATED_KNOBS = ("estimator", "backbone", "loss", "target_space")


# ---- per-pixel uncertainty maps ------------------------------------------------------------------

def map_cells(view: ReportView, limit: int = 2) -> list[tuple[pd.Series, dict]]:
    """Up to `limit` cells with uncertainty maps: most recorded steps first, then layer ratio closest to the target."""
    found = []
    for _, row in view.frame.iterrows():
        maps = view.artifact(row, UNCERTAINTY_MAPS)
        if maps is not None and len(maps["steps"]):
            found.append((-len(maps["steps"]), abs(row["layer_ratio"] - TARGET_LAYER_RATIO), len(found), row, maps))
    found.sort(key=lambda item: item[:3])
    return [(row, maps) for *_, row, maps in found[:limit]]


def shown_exit_points(num_exits: int, count: int = 4) -> list[int]:
    """Exit points 1..num_exits to show: the first, the last and evenly spaced ones between."""
    return sorted(set(np.linspace(1, num_exits, min(count, num_exits)).round().astype(int).tolist()))


def _grey_limits(image: np.ndarray) -> tuple[float, float]:
    low, high = np.nanpercentile(image, [1, 99]) if np.isfinite(image).any() else (0.0, 1.0)
    return float(low), float(max(high, low + 1e-6))


@styled
def uncertainty_maps(view: ReportView, out: str | Path, num_samples: int = 2) -> list[Path]:
    """Per recorded step (rows): the noisy input x_t and the per-pixel uncertainty at a few exit points."""
    written = []
    for row, maps in map_cells(view):
        written += _uncertainty_figure(row, maps, view.samples(row), Path(out), num_samples)
    return written


def _uncertainty_figure(row: pd.Series, maps: dict, images: np.ndarray | None, out: Path,
                        num_samples: int) -> list[Path]:
    u, inputs = maps["maps"], maps["inputs"]                  # (k, samples, exits, C, H, W), (k, samples, C, H, W)
    samples = [s for s in range(u.shape[1]) if np.isfinite(inputs[:, s]).any()][:num_samples]
    if not samples or u.shape[2] == 0:
        return []
    exit_points = shown_exit_points(u.shape[2])
    finals = _final_samples(images, samples)
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
    fig.legend(handles=[no_data_patch("no map: the sample had already exited")], loc="outside lower center",
               frameon=False, fontsize=6)
    threshold = knobs_of(row).get("threshold")
    rule = f"; a sample exits once its mean u ≤ {threshold}" if threshold is not None else ""
    label = setting_labels(pd.DataFrame([row]))[0]
    fig.suptitle(wrap(f"AdaDiff per-pixel uncertainty, {escape_math(label)}, layer ratio {row['layer_ratio']:.2f}"
                      f"{rule}; $x_t$ shown with per-panel contrast", 130), fontsize=7, parse_math=True)
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
        hatch_background(ax)
        pixels = u[exit_point - 1].mean(axis=0)
        image = ax.imshow(np.ma.masked_invalid(pixels), cmap=masked_cmap("cividis"), vmin=0.0, vmax=1.0,
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
            axes[-1].set_title("final $x_0$", fontsize=6, parse_math=True)
    if title_sample is not None:
        axes[0].set_title(f"sample {title_sample}\ninput $x_t$", fontsize=6, parse_math=True)
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


def _final_samples(images: np.ndarray | None, samples: list[int]) -> np.ndarray | None:
    """The generated images (H, W, uint8, channels averaged) of the chosen samples, if the cell kept them."""
    if images is None or len(images) <= max(samples):
        return None
    return images[samples].mean(axis=-1)


# ---- estimator ablation --------------------------------------------------------------------------

def ablated_knobs(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each AdaDiff ablation knob that takes two or more values in the run -> the adadiff rows that set it."""
    adadiff = frame[frame["method"] == "adadiff"]
    knobs = pd.DataFrame([knobs_of(row) for _, row in adadiff.iterrows()], index=adadiff.index)
    found = {}
    for knob in ABLATED_KNOBS:
        if knob in knobs.columns:
            values = knobs[knob].replace("", np.nan).dropna()
            if values.nunique() > 1:
                found[knob] = adadiff.loc[values.index].assign(**{knob: values})
    return found


def _reference_fid(frame: pd.DataFrame, fid: str, like: pd.DataFrame) -> float | None:
    """Mean FID of the plain `full` row, at the ablation's solver and steps when it was run there."""
    full = frame[frame.apply(is_reference_full, axis=1)]
    same = full[full["solver"].isin(like["solver"]) & full["num_steps"].isin(like["num_steps"])]
    values = (same if not same.empty else full)[fid].dropna()
    return float(values.mean()) if len(values) else None


def sweep_knob(group: pd.DataFrame) -> str:
    """What a curve's points are set by: `target_layer_ratio` (matched compute) or `threshold`."""
    return "target_layer_ratio" if any("target_layer_ratio" in knobs_of(row) for _, row in group.iterrows()) \
        else "threshold"


def _sweep_points(group: pd.DataFrame, fid: str) -> pd.DataFrame:
    """Mean layer ratio and FID per threshold or target (over seeds), ordered by layer ratio; with targets,
    `reached` says whether calibration reached each one (see AdaDiff's `target_layer_ratio`)."""
    knob = sweep_knob(group)
    setting = [knobs_of(row).get(knob, np.nan) for _, row in group.iterrows()]
    reached = group["target_reached"].astype(bool) if "target_reached" in group.columns else True
    grouped = group.assign(setting=setting, reached=reached).groupby("setting", dropna=False)
    points = grouped[["layer_ratio", fid]].mean().join(grouped["reached"].all())
    return points.sort_values("layer_ratio")


def _label_thresholds(ax, points: pd.DataFrame, fid: str, index: int) -> None:
    """Write each point's threshold beside it; points that would overlap on the axes share one label."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    near = lambda a, b: abs(a[0] - b[0]) < 0.04 * (x1 - x0) and abs(a[1] - b[1]) < 0.05 * (y1 - y0)  # noqa: E731
    clusters: list[tuple[tuple[float, float], list]] = []
    for threshold, p in points.iterrows():  # (or target layer ratio)
        xy = (p["layer_ratio"], p[fid])
        if clusters and near(clusters[-1][0], xy):
            clusters[-1][1].append(threshold)
        else:
            clusters.append((xy, [threshold]))
    for xy, thresholds in clusters:
        ax.annotate(",".join(f"{t:g}" for t in sorted(thresholds)), xy, textcoords="offset points",
                    xytext=(4, 2 + 4 * index), fontsize=4.5, color=style(index)["color"])


@styled
def estimator_ablation(view: ReportView, out: str | Path) -> list[Path]:
    """FID vs layer ratio, one panel per ablated AdaDiff knob, one curve per value along the threshold sweep."""
    out, frame, valid = Path(out), view.frame, view.valid
    fid = primary_column(frame.columns)
    if fid is None:
        return []
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
            missed = int((~points["reached"]).sum())
            missed_note = f" ({missed} target{'s' if missed > 1 else ''} not reached)" if missed else ""
            # earlier curves drawn with bigger markers, so that coinciding curves stay visible
            size = 3.0 + 1.0 * (len(curves) - 1 - i)
            ax.plot(points["layer_ratio"], points[fid], label=f"{knob} = {value}{never}{missed_note}",
                    **{**style(i), "markersize": size})
            if missed:  # a target the estimator could not reach: a hollow ring around the point it got instead
                off = points[~points["reached"]]
                ax.plot(off["layer_ratio"], off[fid], linestyle="none", marker="o", markersize=size + 4,
                        markerfacecolor="none", markeredgecolor=style(i)["color"], markeredgewidth=0.8)
        if reference is not None:
            ax.axhline(reference, color="0.3", linestyle="--", linewidth=0.9, label=f"full ({reference:.2f})")
        low = min(0.9, float(rows["layer_ratio"].min()) - 0.05)
        ax.set_xlim(low, 1.0 + 0.04 * (1.0 - low))
        for i, (_, points) in enumerate(curves):
            _label_thresholds(ax, points, fid, i)
        ax.set_title(f"ablated: {knob}")
        ax.set_xlabel("layer ratio (fraction of blocks run)")
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    axes[0, 0].set_ylabel(axis_label(fid, n))
    if sweep_knob(pd.concat(knobs.values())) == "target_layer_ratio":
        title = (f"AdaDiff ablation at matched compute: {ranking_label(fid)} vs layer ratio reached, points labelled "
                 "by target layer ratio (ringed: target not reached on calibration)")
    else:
        title = (f"AdaDiff ablation: {ranking_label(fid)} vs layer ratio along the threshold sweep (points labelled "
                 "by threshold)")
    fig.suptitle(title, fontsize=7.5)
    return save(fig, out, "estimator_ablation")
