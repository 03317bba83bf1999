"""Reports: read only the results store, write a leaderboard table, an FID-vs-GFLOPs plot and sample grids."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .metrics.quality import HIGHER_IS_BETTER  # noqa: E402
from .results import load_run, make_dir  # noqa: E402

# Okabe-Ito: a colour-blind-safe palette
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def primary_fid_column(frame: pd.DataFrame) -> str | None:
    """The FID column to rank by: the built-in classifier's when present, else the first one."""
    columns = [c for c in frame.columns if c.startswith("fid_")]
    return "fid_digits_cnn" if "fid_digits_cnn" in columns else (columns[0] if columns else None)


def setting_label(row: pd.Series) -> str:
    knobs = json.loads(row["params"]) if isinstance(row["params"], str) and row["params"] else {}
    shown = {k: (Path(v).stem if k == "checkpoint" else v) for k, v in knobs.items() if not k.startswith("map_")}
    parts = [f"{k}={v}" for k, v in shown.items()] + [f"{row['solver']} {row['num_steps']} steps"]
    return f"{row['method']} ({', '.join(parts)})" + (" [ceiling, not a method]" if is_ceiling(row) else "")


def is_ceiling(row: pd.Series) -> bool:
    """An oracle's row: a bound on what exits could do, not a competitor (older runs lack the column)."""
    return bool(row.get("ceiling", False)) if pd.notna(row.get("ceiling", False)) else False


QUALITY_PREFIXES = ("fid_", "is_", "kid_", "precision_", "recall_")
SEED_STD = "_seed_std"  # suffix of a column's standard deviation across seeds


def is_quality_column(column: str) -> bool:
    """A quality metric's value column (not its within-run std or its bootstrap bounds)."""
    return column.startswith(QUALITY_PREFIXES) and not column.endswith(("_std", "_ci_low", "_ci_high"))


def leaderboard(frame: pd.DataFrame, sort_by: str | None = None) -> pd.DataFrame:
    """One row per method setting: mean over seeds, and each quality metric's std across seeds."""
    fid = sort_by or primary_fid_column(frame)
    frame = frame.assign(setting=frame.apply(setting_label, axis=1))
    metric_columns = [c for c in frame.columns if is_quality_column(c)]
    numeric = metric_columns + ["gflops_per_image", "layer_ratio"] + [
        c for c in ("time_per_image_s", "speedup", "cache_bytes", "peak_mem_mb") if c in frame.columns]
    bounds = [c for c in frame.columns if c.endswith(("_ci_low", "_ci_high"))]
    grouped = frame.groupby("setting", sort=False)
    board = grouped.agg({**{c: "mean" for c in numeric}, **{c: "first" for c in bounds},
                         "num_samples": "first", "seed": "count"}).rename(columns={"seed": "seeds"})
    spread = grouped[metric_columns].std(ddof=1).add_suffix(SEED_STD)  # NaN with one seed
    board = board.join(spread)
    board.loc[board["seeds"] > 1, bounds] = np.nan  # a bootstrap interval belongs to one seed's samples
    if fid in board.columns:
        board = board.sort_values(fid)
    return board.reset_index()


METRIC_NAMES = {"fid": "FID", "is": "IS", "kid": "KID", "precision": "precision", "recall": "recall"}


def _header(column: str, num_samples: int) -> str:
    """A column's header: the metric, its feature space (and n for FID), an arrow for which way is better."""
    metric, _, space = column.partition("_")
    if metric in HIGHER_IS_BETTER and column.endswith("_ci"):
        return f"FID {space.removesuffix('_ci')} bootstrap CI"
    if metric in HIGHER_IS_BETTER:
        arrow = "↑" if HIGHER_IS_BETTER[metric] else "↓"
        n = f", n={num_samples}" if metric == "fid" else ""
        return f"{METRIC_NAMES[metric]} [{space.removesuffix('_mean')}{n}] {arrow}"
    return {"gflops_per_image": "GFLOPs/image ↓", "layer_ratio": "layer ratio ↓",
            "time_per_image_s": "time/image (ms) ↓", "speedup": "speed-up vs full ↑",
            "cache_bytes": "cache (KB/batch) ↓", "peak_mem_mb": "peak mem (MB) ↓"}.get(column, column)


def _number(column: str, value: float) -> str:
    """A table cell: ms for times, KB for caches, 4 decimals for KID, 3 otherwise."""
    if column == "time_per_image_s":
        value = value * 1e3
    if column == "cache_bytes":
        value = value / 1e3
    return f"{value:.4f}" if column.startswith("kid_") else (f"{value:.0f}" if column == "peak_mem_mb" else f"{value:.3f}")


def _cell(row: pd.Series, column: str) -> str:
    """A value, with ± its std across seeds when there are several, or its bootstrap interval."""
    if column.endswith("_ci"):
        low, high = row[column + "_low"], row[column + "_high"]
        return "" if pd.isna(low) else f"[{low:.2f}, {high:.2f}]"
    value = row[column]
    if pd.isna(value):
        return "n/a"
    spread = row.get(column + SEED_STD, np.nan)
    return _number(column, value) + ("" if pd.isna(spread) else f" ± {_number(column, spread)}")


def to_markdown(board: pd.DataFrame) -> str:
    """The leaderboard as Markdown: one column per metric, headers with units, n and arrows."""
    n = int(board["num_samples"].iloc[0]) if len(board) else 0
    hidden = ("setting", "num_samples", "seeds")
    columns = []
    for c in board.columns:
        if c.endswith("_ci_low") and board[c].notna().any():
            columns.append(c.removesuffix("_low"))
        elif c not in hidden and not c.endswith((SEED_STD, "_ci_low", "_ci_high")):
            columns.append(c)
    lines = ["| method setting | " + " | ".join(_header(c, n) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {row['setting']} | " + " | ".join(_cell(row, c) for c in columns) + " |" for _, row in board.iterrows()]
    return "\n".join(lines) + "\n"


def knob_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One column per setting of each row: its knobs (from the JSON `params`), solver and num_steps."""
    knobs = pd.DataFrame([json.loads(p) if isinstance(p, str) and p else {} for p in frame["params"]], index=frame.index)
    return knobs.assign(solver=frame["solver"], num_steps=frame["num_steps"])


def _plain(value):
    """A knob value as written: 2, not the 2.0 that a column shared with missing values turns it into."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def curves(frame: pd.DataFrame):
    """(legend, point labels, rows) per curve: one curve per [[methods]] entry, points along its swept knobs."""
    knobs = knob_table(frame)
    # one curve per entry and solver: a swept solver is a different sampler, not a point along the curve
    for _, group in frame.groupby(["entry", "solver"], sort=True):
        swept = [k for k in json.loads(group["swept"].iloc[0]) if k != "solver"]
        first = knobs.loc[group.index[0]]
        fixed = [f"{k}={Path(v).stem if k == 'checkpoint' else _plain(v)}" for k, v in first.items()
                 if k not in swept and k not in ("num_steps", "solver") and not k.startswith("map_") and pd.notna(v)]
        legend = f"{group['method'].iloc[0]} / {first['solver']}" + (f" ({', '.join(fixed)})" if fixed else "")
        legend += " [ceiling]" if is_ceiling(group.iloc[0]) else ""
        labels = knobs.loc[group.index, swept].map(_plain).astype(str).agg("/".join, axis=1) if swept \
            else pd.Series("", group.index)
        yield legend, labels, group


MATCHED_TARGETS = (0.5, 0.6, 0.7)


def cost_fraction(frame: pd.DataFrame, info: dict) -> pd.Series:
    """GFLOPs per image relative to the run's reference (`full` at the default solver and steps)."""
    ref = info["reference"]
    is_ref = (frame["method"] == "full") & (frame["params"] == "{}") & (frame["solver"] == ref["solver"]) \
        & (frame["num_steps"] == ref["num_steps"])
    if not is_ref.any():
        return pd.Series(np.nan, index=frame.index)
    return frame["gflops_per_image"] / frame.loc[is_ref, "gflops_per_image"].mean()


def interpolate_at(x: np.ndarray, y: np.ndarray, targets) -> list[float]:
    """y at each target by linear interpolation along the curve; NaN outside the measured range of x."""
    order = np.argsort(x)
    x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    return [float(np.interp(t, x, y)) if len(x) > 1 and x[0] <= t <= x[-1] else
            (float(y[0]) if len(x) == 1 and np.isclose(x[0], t) else np.nan) for t in targets]


def matched_table(frame: pd.DataFrame, info: dict, targets=MATCHED_TARGETS) -> pd.DataFrame:
    """FID of every curve at matched layer ratios and matched cost fractions (interpolated along its sweep)."""
    fid = primary_fid_column(frame)
    frame = frame[frame["valid"]].assign(cost_fraction=cost_fraction(frame[frame["valid"]], info))
    rows = []
    for legend, _, group in curves(frame):
        if fid is None:
            break
        points = group.groupby(["layer_ratio", "cost_fraction"], as_index=False)[fid].mean()
        row = {"curve": legend}
        for axis, name in (("layer_ratio", "layer ratio"), ("cost_fraction", "cost")):
            for target, value in zip(targets, interpolate_at(points[axis], points[fid], targets)):
                row[f"{fid} at {name} {target:g}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def frame_to_markdown(frame: pd.DataFrame) -> str:
    """A plain Markdown table; numbers to 2 decimals, NaN left blank."""
    def cell(value) -> str:
        return "" if isinstance(value, float) and np.isnan(value) else (f"{value:.2f}" if isinstance(value, float) else str(value))
    lines = ["| " + " | ".join(frame.columns) + " |", "|---|" + "---:|" * (len(frame.columns) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_fid_vs_gflops(frame: pd.DataFrame, out: Path) -> list[Path]:
    """FID against GFLOPs per image, one curve per [[methods]] entry (its knob sweep), points labelled."""
    fid = primary_fid_column(frame)
    if fid is None or frame.empty:
        return []
    fig, ax = plt.subplots(figsize=(3.5, 2.9), dpi=150, layout="constrained")
    for color, (legend, labels, group) in zip(PALETTE * 4, curves(frame)):
        points = group.assign(label=labels).groupby("label", sort=False)[[fid, "gflops_per_image"]].mean()
        points = points.sort_values("gflops_per_image")
        style = "x--" if legend.endswith("[ceiling]") else "o-"
        ax.plot(points["gflops_per_image"], points[fid], style, color=color, ms=3.5, lw=1.1, label=legend)
        for label, p in points.iterrows():
            ax.annotate(str(label), (p["gflops_per_image"], p[fid]), textcoords="offset points", xytext=(3, 2),
                        fontsize=5, color=color)
    n = int(frame["num_samples"].iloc[0])
    ax.set_xlabel("GFLOPs per image (2 x MACs)", fontsize=7)
    ax.set_ylabel(f"FID [{fid[4:]}, n={n}] (lower is better)", fontsize=7)
    ax.set_title("Quality vs compute; points labelled by the swept knob", fontsize=6.5)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=5, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    ax.tick_params(labelsize=6.5)
    paths = [out / "fid_vs_gflops.png", out / "fid_vs_gflops.pdf"]
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
    return paths


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
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)
    return path


def leaderboard_notes(board: pd.DataFrame, info: dict) -> str:
    """What the leaderboard's numbers are: data, n, seeds, intervals, timing and FLOPs conventions."""
    metrics = info["config"].get("metrics", {})
    seeds = int(board["seeds"].max()) if len(board) else 0
    lines = [f"Data: {info['data']['name']} ({info['data']['num_images']} reference images); FID's n = samples "
             f"per cell; FID by {metrics.get('fid_backend', 'torch-fidelity')}."]
    if seeds > 1:
        lines.append(f"Quality values are means over {seeds} seeds ± their standard deviation across seeds.")
    if metrics.get("fid_bootstrap"):
        lines.append(f"FID bootstrap CI: basic bootstrap interval at level {metrics['fid_ci']} over "
                     f"{metrics['fid_bootstrap']} resamples of the generated samples (reference fixed); one-seed rows only.")
    lines.append(f"Speed-up is the ratio of median times against `full` at {info['reference']['solver']} "
                 f"{info['reference']['num_steps']} steps, timed interleaved on {info['machine']['torch_threads']} "
                 f"threads ({info['machine'].get('device', 'cpu')}); FLOPs = 2 x MACs (fvcore); peak memory: "
                 "the process's peak resident set on the CPU, peak allocated on CUDA.")
    return "\n" + "\n\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out: str | Path, sort_by: str | None = None) -> list[Path]:
    """Leaderboard (Markdown + CSV), FID-vs-GFLOPs plot (PNG + PDF), one sample grid per cell."""
    run_dir, out = Path(run_dir), Path(out)
    frame, info = load_run(run_dir)
    make_dir(out)
    board = leaderboard(frame, sort_by)
    written = []
    title = f"# Leaderboard: {info['config']['name']}\n\n"
    (out / "leaderboard.md").write_text(title + to_markdown(board) + leaderboard_notes(board, info))
    board.to_csv(out / "leaderboard.csv", index=False)
    written += [out / "leaderboard.md", out / "leaderboard.csv"]
    matched = matched_table(frame, info)
    if not matched.empty:
        matched.to_csv(out / "matched.csv", index=False)
        header = (f"# FID at matched layer ratio and matched cost\n\n{primary_fid_column(frame)} with n = "
                  f"{int(frame['num_samples'].iloc[0])} samples per cell, interpolated linearly along each curve's "
                  "sweep; blank where the curve does not reach the target. Cost = GFLOPs/image over the reference "
                  "`full`'s.\n\n")
        (out / "matched.md").write_text(header + frame_to_markdown(matched))
        written += [out / "matched.csv", out / "matched.md"]
    written += plot_fid_vs_gflops(frame[frame["valid"]], out)
    grids = out / "samples"
    make_dir(grids)
    for cell_id in frame["cell_id"]:
        with np.load(run_dir / "cells" / cell_id / "samples.npz") as archive:
            written.append(sample_grid(archive["arr_0"], grids / f"{cell_id}.png"))
    return written
