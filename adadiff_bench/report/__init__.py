"""Reports: read only the results store (one run or several) and write tables, figures and one HTML page.

    leaderboard.md / .csv / .tex   one row per method setting, Pareto-optimal rows marked (see `tables`)
    matched.md / .csv              FID of every curve at matched layer ratio and matched cost
    fid_vs_gflops, fid_vs_time     (+ _by_family) quality vs cost, Pareto front (see `figures`)
    speedup_bars                   measured vs ideal speed-up
    exit_heatmaps, exit_distributions, layer_ratio_by_timestep, uncertainty_maps_*, estimator_ablation
                                   from the step-log summaries and AdaDiff's artifacts (see `figures_exits`)
    samples_side_by_side, samples/<cell>.png
    index.html                     everything above in one self-contained page (see `html_report`)

Every figure is written as PNG (for looking) and PDF (for papers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .figures import fid_vs_cost, fid_vs_cost_by_family, sample_grid, samples_side_by_side, speedup_bars
from ..results import atomic_write_bytes, make_dir
from .tables import (frame_to_markdown, leaderboard, load_runs, matched_table, primary_fid_column, short_setting,
                     to_latex, to_markdown)


def leaderboard_notes(board: pd.DataFrame, infos: dict[str, dict]) -> str:
    """What the leaderboard's numbers are: data, n, seeds, intervals, timing and FLOPs conventions."""
    info = next(iter(infos.values()))
    metrics = info["config"].get("metrics", {})
    seeds = int(board["seeds"].max()) if len(board) else 0
    lines = [f"Data: {info['data']['name']} ({info['data']['num_images']} reference images); FID's n = samples "
             f"per cell; FID by {metrics.get('fid_backend', 'torch-fidelity')}. ★ = Pareto-optimal in FID and "
             "GFLOPs/image among the competitors (ceilings excluded)."]
    if len(infos) > 1:
        lines.append(f"Merged runs: {', '.join(infos)} (same data and n); speed-ups are each against its own run's "
                     "`full` reference.")
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


def write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode())
    return path


def write_leaderboard(frame: pd.DataFrame, infos: dict[str, dict], out: Path,
                      sort_by: str | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """leaderboard.md, .csv and .tex; returns (the board, the paths)."""
    board = leaderboard(frame, sort_by)
    title = f"Leaderboard: {', '.join(infos)}"
    notes = leaderboard_notes(board, infos)
    paths = [write_text(out / "leaderboard.md", f"# {title}\n\n" + to_markdown(board) + notes),
             write_text(out / "leaderboard.csv", board.to_csv(index=False)),
             write_text(out / "leaderboard.tex", to_latex(board, caption=title + ". " + " ".join(notes.split())))]
    return board, paths


def write_matched(frame: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """matched.md and .csv: FID of every curve at matched layer ratios and cost fractions."""
    matched = matched_table(frame[frame["valid"]])
    if matched.empty:
        return matched, []
    header = (f"# FID at matched layer ratio and matched cost\n\n{primary_fid_column(frame)} with n = "
              f"{int(frame['num_samples'].iloc[0])} samples per cell, interpolated linearly along each curve's "
              "sweep; blank where the curve does not reach the target. Cost = GFLOPs/image over the reference "
              "`full`'s.\n\n")
    return matched, [write_text(out / "matched.csv", matched.to_csv(index=False)),
                     write_text(out / "matched.md", header + frame_to_markdown(matched))]


def cell_samples(run_dir: Path, cell_id: str) -> np.ndarray:
    with np.load(run_dir / "cells" / cell_id / "samples.npz") as archive:
        return archive["arr_0"]


def sample_figures(frame: pd.DataFrame, run_dirs: dict[str, Path], out: Path) -> list[Path]:
    """One grid per cell (under samples/, per run when several) and the side-by-side comparison."""
    written = []
    several = len(run_dirs) > 1
    for _, row in frame.iterrows():
        folder = out / "samples" / row["run"] if several else out / "samples"
        make_dir(folder)
        written.append(sample_grid(cell_samples(run_dirs[row["run"]], row["cell_id"]), folder / f"{row['cell_id']}.png"))
    chosen = side_by_side_rows(frame)
    rows = [(short_setting(r).replace(" (", "\n("), cell_samples(run_dirs[r["run"]], r["cell_id"]))
            for _, r in chosen.iterrows()]
    return written + samples_side_by_side(rows, out)


def side_by_side_rows(frame: pd.DataFrame, limit: int = 10) -> pd.DataFrame:
    """The reference and, per entry, the setting closest to 60% of the reference's cost (first seed only)."""
    rows = frame[frame["valid"] & (frame["seed"] == frame["seed"].min())]
    rows = rows.assign(gap=(rows["gflops_per_image"] / rows["reference_gflops"] - 0.6).abs())
    reference = rows[(rows["method"] == "full") & (rows["gflops_per_image"] == rows["reference_gflops"])].head(1)
    others = rows.drop(reference.index).sort_values("gap").groupby(["run", "entry"], sort=False).head(1)
    return pd.concat([reference, others.sort_values(["run", "entry"])]).head(limit)


def exit_figure_paths(frame: pd.DataFrame, run_dirs: dict[str, Path], out: Path) -> list[Path]:
    """The step-log and artifact figures of each run (in a subfolder per run when several)."""
    from .exit_figures import exit_figures
    written = []
    for run, run_dir in run_dirs.items():
        written += exit_figures(frame[frame["run"] == run], run_dir, out / run if len(run_dirs) > 1 else out)
    return written


def write_report(run_dirs: str | Path | list, out: str | Path, sort_by: str | None = None) -> list[Path]:
    """Tables, figures and index.html for one or several finished runs; returns every path written."""
    run_dirs = [Path(d) for d in (run_dirs if isinstance(run_dirs, (list, tuple)) else [run_dirs])]
    frame, infos = load_runs(run_dirs)
    by_name = dict(zip(infos, run_dirs))
    out = Path(out)
    make_dir(out)
    board, written = write_leaderboard(frame, infos, out, sort_by)
    matched, paths = write_matched(frame, out)
    written += paths
    valid = frame[frame["valid"]]
    for cost in ("gflops_per_image", "interleaved_time_s"):
        written += fid_vs_cost(valid, out, cost) + fid_vs_cost_by_family(valid, out, cost)
    written += speedup_bars(valid, out)
    written += exit_figure_paths(frame, by_name, out)
    written += sample_figures(frame, by_name, out)
    written.append(write_html(out, frame, infos, board, matched, written))
    return written


def write_html(out: Path, frame: pd.DataFrame, infos: dict[str, dict], board: pd.DataFrame, matched: pd.DataFrame,
               written: list[Path]) -> Path:
    """index.html: the tables and every PNG figure written above, in one self-contained page."""
    from .html import HtmlFigure, HtmlSection, HtmlTable, write_html_report
    from .tables import display_table

    figures = {p.stem: p for p in written if p.suffix == ".png" and p.parent.name not in ("samples", "exit_heatmaps")}

    def pick(*prefixes: str) -> list[HtmlFigure]:
        return [HtmlFigure(caption_of(stem), path) for stem, path in figures.items() if stem.startswith(prefixes)]

    notes = leaderboard_notes(board, infos).strip()
    sections = [
        HtmlSection("Leaderboard", tables=[HtmlTable("One row per method setting; click a header to sort.",
                                                     display_table(board), "leaderboard", notes)]),
        HtmlSection("Quality vs cost", figures=pick("fid_vs_gflops", "fid_vs_time")),
        HtmlSection("FID at matched layer ratio and cost",
                    tables=[HtmlTable("Interpolated along each curve's sweep; blank outside it.", matched)]
                    if not matched.empty else []),
        HtmlSection("Speed-up: measured vs ideal", figures=pick("speedup")),
        HtmlSection("Where compute is saved", figures=pick("exit_heatmaps", "exit_distributions", "layer_ratio")),
        HtmlSection("AdaDiff's uncertainty", figures=pick("uncertainty_maps", "estimator_ablation")),
        HtmlSection("Samples", figures=pick("samples_side_by_side")),
    ]
    sections = [s for s in sections if s.tables or s.figures]
    n = int(frame["num_samples"].iloc[0])
    return write_html_report(out, f"adadiff-bench report: {', '.join(infos)}", sections,
                             subtitle=f"{len(board)} method settings, n = {n} samples per cell")


def caption_of(stem: str) -> str:
    """A figure's caption from its file name."""
    return next((text for prefix, text in FIGURE_CAPTIONS.items() if stem.startswith(prefix)), stem) + f" ({stem})"


FIGURE_CAPTIONS = {
    "fid_vs": "FID against cost, one curve per method sweep, Pareto front dotted",
    "speedup_bars": "Measured speed-up (median interleaved time) next to the ideal one from FLOPs",
    "exit_heatmaps": "Per-timestep exit histograms: fraction of samples by exit point at each sampling step",
    "exit_distributions": "Exit-point distribution at chosen sampling steps",
    "layer_ratio": "Layer ratio by timestep: where each method saves compute",
    "uncertainty_maps": "AdaDiff's per-pixel uncertainty at chosen steps",
    "estimator_ablation": "Uncertainty-estimator ablation: FID against layer ratio",
    "samples_side": "The same samples (same seeds) under each setting",
}
