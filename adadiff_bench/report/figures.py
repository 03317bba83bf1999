"""Quality-vs-cost figures, speed-up bars and sample figures, from a `ReportView` (see `style` for the look).

FID against GFLOPs per image or measured time per image: one curve per [[methods]] entry (its knob sweep),
points labelled by the swept knob, and the Pareto front over every competitor's settings (ceilings
excluded) drawn as a dashed staircase. Comparisons stay within one backbone (`groups`): with rows on
several backbones, each backbone gets its own panel and its own front. With many curves the same data
is also drawn as small multiples, one panel per method family, each over the reference curves in grey
(one front per backbone).

Each figure function takes (view, out) and returns the paths it wrote ([] when the runs hold nothing
it could show); the report draws them through the figure registry (`adadiff_bench.report.registry`).
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib.ticker
import numpy as np
import pandas as pd

from ..metrics.specs import primary_column
from ..results import atomic_write_bytes, make_dir
from .style import DOUBLE, SINGLE, new_figure, save, style, styled, wrap
from .groups import group_keys, group_label
from .tables import axis_label, curves, is_ceiling, pareto_mask, short_setting
from .view import ReportView

COSTS = {
    "gflops_per_image": ("GFLOPs per image (2 x MACs)", 1.0, "fid_vs_gflops"),
    "interleaved_time_s": ("time per image (ms): the reference's median / measured speed-up", 1e3, "fid_vs_time"),
}


def with_interleaved_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds `interleaved_time_s` = the run's reference time / the cell's interleaved speed-up.

    Each cell's speed-up comes from repeats interleaved with the reference, so a drift of a shared machine
    cancels in it; a cell's own absolute median does not have that protection.
    """
    if "speedup" not in frame.columns or "reference_time_s" not in frame.columns:
        return frame.assign(interleaved_time_s=np.nan)
    return frame.assign(interleaved_time_s=frame["reference_time_s"] / frame["speedup"])


REFERENCE_FAMILIES = ("reference",)  # drawn in grey in every family panel, not a panel of their own
FAMILY_ORDER = ("early-exit", "layer-dropping", "step-skipping", "caching", "other")


def panel_families(frame: pd.DataFrame) -> list[str]:
    """The families that get a panel: those of `FAMILY_ORDER` present, in that order, then any other present
    family (a plugin's, say) in name order; never one dropped."""
    present = set(frame["family"].dropna()) - set(REFERENCE_FAMILIES)
    return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))


def curve_points(group: pd.DataFrame, labels: pd.Series, fid: str, cost: str) -> pd.DataFrame:
    """One point per setting along a curve (mean over seeds), in order of GFLOPs (the sweep's order)."""
    columns = list(dict.fromkeys([fid, cost, "gflops_per_image"]))
    points = group.assign(label=labels).groupby("label", sort=False)[columns].mean()
    return points.dropna().sort_values("gflops_per_image")


def pareto_front(frame: pd.DataFrame, fid: str, cost: str) -> pd.DataFrame:
    """The settings no competitor on the same backbone beats on both FID and cost, sorted by cost (ceilings
    excluded); column `group` names the backbone group of each."""
    rows = frame[~frame.apply(is_ceiling, axis=1)] if len(frame) else frame
    rows = rows.assign(group=group_keys(rows))
    keys = ["group"] + [c for c in ("run", "method", "params", "solver", "num_steps") if c in rows.columns]
    points = rows.groupby(keys)[[fid, cost]].mean().dropna().reset_index(level="group")
    on_front = np.zeros(len(points), dtype=bool)
    for group in points["group"].unique():  # each backbone's front of its own
        inside = (points["group"] == group).to_numpy()
        on_front[inside] = pareto_mask(points[inside], fid, np.ones(inside.sum(), dtype=bool), cost)
    return points[on_front].sort_values([cost, fid])


def backbone_labels(frame: pd.DataFrame) -> dict[str, str]:
    """Each backbone group's key -> its short label (checkpoint stem and the hash's first 8 hex digits)."""
    several = "run" in frame.columns and frame["run"].nunique() > 1
    return {key: group_label(key, rows, several) for key, rows in frame.groupby(group_keys(frame), sort=False)}


def _axis_labels(ax, frame: pd.DataFrame, fid: str, cost: str) -> None:
    """Units on both axes: FID with its feature space and n; the cost with its unit (and threads for time)."""
    n = int(frame["num_samples"].iloc[0])
    label, _, _ = COSTS[cost]
    if cost == "interleaved_time_s" and "threads" in frame.columns and frame["threads"].notna().any():
        label += f", {int(frame['threads'].dropna().iloc[0])} threads, {frame.get('device', pd.Series(['cpu'])).iloc[0]}"
    ax.set_xlabel(wrap(label, 56))  # (the time axis's label is long: two lines in a single column)
    ax.set_ylabel(axis_label(fid, n))


def fit(legend: str, width: int = 60) -> str:
    """A legend entry in at most two lines of `width` characters, cut after that (the full setting is in the
    leaderboard)."""
    lines = textwrap.wrap(legend.replace("checkpoint=", ""), width, break_on_hyphens=False)
    if len(lines) > 2:
        lines = [lines[0], lines[1][: width - 1] + "…"]
    return "\n".join(lines)


def _draw_curve(ax, points: pd.DataFrame, fid: str, cost: str, legend: str, index: int, labelled: bool) -> None:
    scale = COSTS[cost][1]
    look = style(index)
    dashed = legend.endswith("[ceiling]")
    ax.plot(points[cost] * scale, points[fid], linestyle="--" if dashed else "-", label=fit(legend), **look)
    if labelled:
        for label, p in points.iterrows():
            if label:
                ax.annotate(str(label), (p[cost] * scale, p[fid]), textcoords="offset points", xytext=(3, 2),
                            fontsize=4.5, color=look["color"])


FRONT_STYLES = (":", "-.", "--", (0, (1, 3)))  # one line style per backbone's front


def _draw_front(ax, frame: pd.DataFrame, fid: str, cost: str) -> None:
    """The Pareto front of each backbone group in the frame (labelled by its backbone when there are several)."""
    front = pareto_front(frame, fid, cost)
    labels = backbone_labels(frame)
    for index, (group, points) in enumerate(front.groupby("group", sort=False)):
        if len(points) > 1:
            label = "Pareto front" + (f" ({labels.get(group, group)})" if len(labels) > 1 else "")
            ax.step(points[cost] * COSTS[cost][1], points[fid], where="post", color="0.25", marker=None,
                    linestyle=FRONT_STYLES[index % len(FRONT_STYLES)], linewidth=1.0, label=label, zorder=0)


def log_scales(ax, frame: pd.DataFrame, fid: str, cost: str) -> None:
    """Logarithmic axes where the values span more than a factor of 4 (x) or 3 (FID)."""
    def spread(column: str) -> float:
        values = frame[column].dropna()
        return values.max() / max(values.min(), 1e-12) if len(values) else 1.0
    for axis, column, limit in ((ax.xaxis, cost, 4), (ax.yaxis, fid, 3)):
        if spread(column) > limit:
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
            axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


@styled
def fid_vs_cost(view: ReportView, out: Path, cost: str = "gflops_per_image") -> list[Path]:
    """FID against a cost, one curve per entry (and solver), points labelled, the Pareto front drawn; one panel
    per backbone group when the rows ran on several."""
    frame = with_interleaved_time(view.valid)
    fid = primary_column(frame.columns)
    if fid is None or frame.empty or cost not in frame.columns or frame[cost].isna().all():
        return []
    if len(backbone_labels(frame)) > 1:
        return fid_vs_cost_by_backbone(frame, fid, cost, out)
    all_curves = list(curves(frame))
    wide = len(all_curves) > 8
    fig, ax = new_figure(DOUBLE if wide else SINGLE, 3.2 + 0.09 * len(all_curves) if wide else 3.3)
    _draw_panel(ax, frame, all_curves, fid, cost)
    ax.set_title(wrap("Quality vs " + ("compute" if cost == "gflops_per_image" else "measured time")
                      + "; points labelled by the swept knob", 56))
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, [fit(label, 48) for label in labels], loc="outside lower center", ncol=2 if wide else 1,
               frameon=False, fontsize=5)
    return save(fig, out, COSTS[cost][2])


def _draw_panel(ax, frame: pd.DataFrame, panel_curves: list, fid: str, cost: str) -> None:
    """Curves (labelled points), the Pareto front(s), axis labels and scales on one axes."""
    for index, (legend, labels, group) in enumerate(panel_curves):
        _draw_curve(ax, curve_points(group, labels, fid, cost), fid, cost, legend, index, labelled=True)
    _draw_front(ax, frame, fid, cost)
    _axis_labels(ax, frame, fid, cost)
    log_scales(ax, frame, fid, cost)


def fid_vs_cost_by_backbone(frame: pd.DataFrame, fid: str, cost: str, out: Path) -> list[Path]:
    """One panel per backbone group: its curves and its own Pareto front, each panel with its legend beside it."""
    keys, labels = group_keys(frame), backbone_labels(frame)
    fig, axes = new_figure(DOUBLE, 0.4 + 2.6 * len(labels), nrows=len(labels), ncols=1, squeeze=False)
    for ax, (key, label) in zip(axes.flat, labels.items()):
        rows = frame[keys == key]
        _draw_panel(ax, rows, list(curves(rows)), fid, cost)
        ax.set_title(wrap(f"backbone {label}: its own Pareto front", 80))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=5)
    what = "compute" if cost == "gflops_per_image" else "measured time"
    fig.suptitle(f"Quality vs {what}, one panel per backbone; points labelled by the swept knob", fontsize=7)
    return save(fig, out, COSTS[cost][2])


@styled
def fid_vs_cost_by_family(view: ReportView, out: Path, cost: str = "gflops_per_image") -> list[Path]:
    """Small multiples: one panel per method family, its curves over the reference curves (grey)."""
    frame = with_interleaved_time(view.valid)
    fid = primary_column(frame.columns)
    if fid is None or "family" not in frame.columns or cost not in frame.columns or frame[cost].isna().all():
        return []
    present = panel_families(frame)
    if len(present) < 2:
        return []
    reference = frame[frame["family"].isin(REFERENCE_FAMILIES + ("step-skipping",))
                      & frame["method"].isin(["full", "solver-steps"])]
    fig, axes = new_figure(DOUBLE, 0.4 + 2.0 * len(present), nrows=len(present), ncols=1, sharex=True, sharey=True,
                           squeeze=False)
    for ax, family in zip(axes.flat, present):
        for legend, labels, group in curves(reference):
            points = curve_points(group, labels, fid, cost)
            ax.plot(points[cost] * COSTS[cost][1], points[fid], color="0.7", marker=".", linewidth=0.8, zorder=0)
        for index, (legend, labels, group) in enumerate(curves(frame[frame["family"] == family])):
            _draw_curve(ax, curve_points(group, labels, fid, cost), fid, cost, legend, index, labelled=False)
        _draw_front(ax, frame, fid, cost)
        ax.set_title(family)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=5)
        _axis_labels(ax, frame, fid, cost)
        log_scales(ax, frame, fid, cost)
    fig.suptitle("One panel per method family; grey: full and solver-steps; dotted: the Pareto front of all methods "
                 "on each backbone", fontsize=7)
    return save(fig, out, COSTS[cost][2] + "_by_family")


def speedup_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting: measured speed-up (timed) and ideal speed-up (reference GFLOPs / the setting's GFLOPs)."""
    if "speedup" not in frame.columns or "reference_gflops" not in frame.columns:
        return pd.DataFrame()
    rows = frame.dropna(subset=["speedup"])
    keys = [c for c in ("run", "entry", "method", "params", "solver", "num_steps") if c in rows.columns]
    table = rows.groupby(keys, sort=False).agg(measured=("speedup", "mean"), gflops=("gflops_per_image", "mean"),
                                               reference=("reference_gflops", "first"))
    table["ideal"] = table["reference"] / table["gflops"]
    return table.reset_index()


def one_per_entry(table: pd.DataFrame, target_ideal: float = 1.5) -> pd.DataFrame:
    """Each entry's setting whose ideal speed-up is closest to `target_ideal` (keeps bar charts readable)."""
    keys = [c for c in ("run", "entry") if c in table.columns]
    closest = table.assign(gap=(table["ideal"] - target_ideal).abs()).sort_values("gap")
    return closest.groupby(keys, sort=False).head(1).drop(columns="gap").sort_values("ideal")


def _bar_label(row: pd.Series) -> str:
    return fit(short_setting(row), 70)


@styled
def speedup_bars(view: ReportView, out: Path) -> list[Path]:
    """Measured speed-up next to the ideal one from FLOPs, per method setting (one per entry when many)."""
    table = speedup_table(view.valid)
    if table.empty:
        return []
    table = table if len(table) <= 16 else one_per_entry(table)
    table = table.sort_values("ideal")
    fig, ax = new_figure(DOUBLE if len(table) > 6 else SINGLE, 1.2 + 0.17 * len(table))
    y = np.arange(len(table))
    ax.barh(y - 0.2, table["ideal"], height=0.38, color=style(0)["color"], label="ideal (from FLOPs)")
    ax.barh(y + 0.2, table["measured"], height=0.38, color=style(1)["color"], label="measured (median time)")
    ax.axvline(1.0, color="0.3", linewidth=0.8)
    ax.set_yticks(y, [_bar_label(r) for _, r in table.iterrows()], fontsize=5)
    ax.set_xlabel("speed-up over full (x, higher is faster)")
    ax.legend(loc="lower right", frameon=False)
    ax.grid(axis="y", visible=False)
    return save(fig, out, "speedup_bars")


def sample_grid(samples_nhwc: np.ndarray, path: Path, count: int = 64, scale: int = 4) -> Path:
    """The first `count` samples as one PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image
    images = samples_nhwc[:count]
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = image
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buffer = io.BytesIO()
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return path


def sample_figures(view: ReportView, out: Path) -> list[Path]:
    """One grid per cell (under samples/, per run when several) and the side-by-side comparison."""
    written = []
    for _, row in view.frame.iterrows():
        images = view.samples(row)
        if images is not None:
            folder = out / "samples" / row["run"] if view.several_runs else out / "samples"
            make_dir(folder)
            written.append(sample_grid(images, folder / f"{row['cell_id']}.png"))
    chosen = [(short_setting(row).replace(" (", "\n("), view.samples(row))
              for _, row in side_by_side_rows(view.frame).iterrows()]
    return written + samples_side_by_side([(label, images) for label, images in chosen if images is not None], out)


def side_by_side_rows(frame: pd.DataFrame, limit: int = 10) -> pd.DataFrame:
    """The reference and, per entry, the setting closest to 60% of the reference's cost (first seed only)."""
    rows = frame[frame["valid"] & (frame["seed"] == frame["seed"].min())]
    rows = rows.assign(gap=(rows["gflops_per_image"] / rows["reference_gflops"] - 0.6).abs())
    reference = rows[(rows["method"] == "full") & (rows["gflops_per_image"] == rows["reference_gflops"])].head(1)
    others = rows.drop(reference.index).sort_values("gap").groupby(["run", "entry"], sort=False).head(1)
    return pd.concat([reference, others.sort_values(["run", "entry"])]).head(limit)


@styled
def samples_side_by_side(rows: list[tuple[str, np.ndarray]], out: Path, count: int = 12) -> list[Path]:
    """The same sample indices (same seeds, same initial noise) for several settings, one row each."""
    if not rows:
        return []
    fig, axes = new_figure(DOUBLE, 0.4 + 0.42 * len(rows), nrows=len(rows), ncols=1, squeeze=False)
    for ax, (label, samples) in zip(axes[:, 0], rows):
        strip = np.concatenate([np.pad(s, ((0, 0), (0, 1), (0, 0)), constant_values=255) for s in samples[:count]],
                               axis=1)
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=5)
    axes[0, 0].set_title(f"samples 0-{count - 1} of each setting (same seeds, so images line up)")
    return save(fig, out, "samples_side_by_side")
