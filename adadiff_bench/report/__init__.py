"""Reports: read finished runs through the results store's reader and write tables, figures and one HTML page.

    leaderboard.md / .csv / .tex   one row per method setting, Pareto-optimal rows marked (see `tables`)
    matched.md / .csv              FID of every curve at matched layer ratio and matched cost
    matched_per_seed.csv           the same per seed, beside the seed's `full` (for paired comparisons)
    paired_samples.md / .csv       one-seed comparisons: FID differences paired over samples (`paired_samples`)
    fid_vs_gflops, fid_vs_time     (+ _by_family) quality vs cost, Pareto front (see `figures`)
    speedup_bars                   measured vs ideal speed-up
    exit_heatmaps, exit_distributions, layer_ratio_by_timestep
                                   from the step-log summaries (see `exit_figures`)
    uncertainty_maps_*, estimator_ablation
                                   from AdaDiff's artifacts (see `adadiff_figures`)
    samples_side_by_side, samples/<cell>.png
    index.html                     everything above in one self-contained page (see `html`)

Every figure is written as PNG (for looking) and PDF (for papers). Figures are registered in
`registry` (one function + one `register_figure` call each; plugins add theirs through the
entry-point group `adadiff_bench.figures`), and index.html is assembled from the registry.
Nothing here imports torch or the method registry: a report needs only the results store.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd

from ..plugins import load_plugins
from ..results import atomic_write_bytes, make_dir
from . import adadiff_figures, estimator_quality, exit_figures, figures
from .html import HtmlFigure, HtmlSection, HtmlTable, open_in_browser, write_html_report
from .paired_samples import caption as paired_caption, paired_sample_files
from .registry import (COMPUTE_SAVED, LEADERBOARD, MATCHED, QUALITY_VS_COST, SAMPLES, SECTIONS, SPEEDUP, UNCERTAINTY,
                       DrawnFigure, Figure, draw_figures, register_figure, registered_figures, section_titles)
from .tables import (display_table, leaderboard_files, leaderboard_notes, matched_files, matched_markdown,
                     skipped_metrics)
from .view import ReportView, load_runs

__all__ = ["write_report", "write_leaderboard", "load_runs", "ReportView", "register_figure", "registered_figures",
           "Figure", "SECTIONS", "open_in_browser"]

QUALITY_CAPTION = ("FID (SWD where no FID was computed) against cost, one curve per method sweep, Pareto front "
                   "dotted")
for _cost, _stem in (("gflops_per_image", "fid_vs_gflops"), ("interleaved_time_s", "fid_vs_time")):
    register_figure(_stem, partial(figures.fid_vs_cost, cost=_cost), QUALITY_CAPTION, QUALITY_VS_COST)
    register_figure(_stem + "_by_family", partial(figures.fid_vs_cost_by_family, cost=_cost), QUALITY_CAPTION,
                    QUALITY_VS_COST)
register_figure("speedup_bars", figures.speedup_bars,
                "Measured speed-up (median interleaved time) next to the ideal one from FLOPs", SPEEDUP)
register_figure("exit_heatmaps", exit_figures.exit_heatmaps, "Per-timestep exit histograms: fraction of samples by "
                "exit point at each sampling step", COMPUTE_SAVED, per_run=True)
register_figure("exit_distributions", exit_figures.exit_distributions,
                "Exit-point distribution at chosen sampling steps", COMPUTE_SAVED, per_run=True)
register_figure("layer_ratio_by_timestep", exit_figures.layer_ratio_by_timestep,
                "Layer ratio by timestep: where each method saves compute", COMPUTE_SAVED, per_run=True)
register_figure("uncertainty_maps", adadiff_figures.uncertainty_maps,
                "AdaDiff's per-pixel uncertainty at chosen steps", UNCERTAINTY, per_run=True)
register_figure("estimator_ablation", adadiff_figures.estimator_ablation,
                "Uncertainty-estimator ablation: FID (or SWD) against layer ratio", UNCERTAINTY, per_run=True)
register_figure("estimator_quality", estimator_quality.estimator_quality,
                "Estimator quality without thresholds (runs with quality_samples): rank correlation of uncertainty "
                "with each exit's eps error, AUROC of 'within tolerance of full depth', calibration; the table is "
                "estimator_quality.csv / .md", UNCERTAINTY, per_run=True)
register_figure("samples_side_by_side", figures.sample_figures,
                "The same samples (same seeds) under each setting", SAMPLES)


def write_leaderboard(run_dirs: str | Path | list, out: str | Path,
                      sort_by: str | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """leaderboard.md, .csv and .tex for one or several finished runs; returns (the board, the paths).

    Runs are read (and refused when they cannot be merged) before `out` is created.
    """
    view = _load_for_tables(run_dirs)
    make_dir(Path(out))
    return leaderboard_files(view, Path(out), sort_by)


def write_report(run_dirs: str | Path | list, out: str | Path, sort_by: str | None = None) -> list[Path]:
    """Tables, every registered figure and index.html for one or several finished runs; returns every path written."""
    view = _load_for_tables(run_dirs)
    for reader in view.readers.values():  # figures read the cells' archives: a damaged one stops us before writing
        reader.verify_archives()
    out = Path(out)
    make_dir(out)
    board, written = leaderboard_files(view, out, sort_by)
    matched, paths = matched_files(view.frame, out)
    paired, paired_paths = paired_sample_files(view, out)
    load_plugins("adadiff_bench.figures")  # plugin figures register themselves on import
    drawn = draw_figures(view, out)
    written += paths + paired_paths + [path for figure in drawn for path in figure.paths]
    written.append(write_index(out, view, board, matched, drawn, paired))
    prune_stale(out, written)
    return written


WRITTEN_LIST = ".report_files"  # the files the last report wrote in its folder, one relative path per line


def prune_stale(out: Path, written: list[Path]) -> list[Path]:
    """Remove the files the previous report in `out` wrote that this one did not (the sample figure of a cell a
    rerun dropped would otherwise stay beside the new ones), then record what this one wrote. Only files that
    list names are touched, and only regular files inside `out`: the list is a file like any other the suite
    reads. Returns what was removed."""
    listed, root = out / WRITTEN_LIST, out.resolve()
    keep = {path.resolve() for path in written}
    removed = []
    for name in previous_report_files(listed):
        path = out / name
        if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(root):
            continue
        if path.resolve() not in keep and path.resolve() != listed.resolve():
            path.unlink()
            removed.append(path)
    names = sorted({path.resolve().relative_to(root).as_posix() for path in written
                    if path.resolve().is_relative_to(root)})
    atomic_write_bytes(listed, ("\n".join(names) + "\n").encode())
    return removed


def previous_report_files(listed: Path, limit: int = 1 << 20) -> list[str]:
    """The relative paths an earlier report listed (none when the list is missing, too large or not text)."""
    try:
        if not listed.is_file() or listed.is_symlink() or listed.stat().st_size > limit:
            return []
        return [line for line in listed.read_text(encoding="utf-8").splitlines() if line and "\0" not in line]
    except (OSError, UnicodeDecodeError):
        return []


def write_index(out: Path, view: ReportView, board: pd.DataFrame, matched: pd.DataFrame,
                drawn: list[DrawnFigure], paired: pd.DataFrame | None = None) -> Path:
    """index.html: the tables and every shown figure, each in its registered section, in one self-contained page."""
    tables = {LEADERBOARD: [HtmlTable("One row per method setting; click a header to sort.", display_table(board),
                                      "leaderboard", leaderboard_notes(board, view.infos).strip())]
              + ([HtmlTable(paired_caption(), paired, "paired")] if paired is not None and not paired.empty else []),
              MATCHED: [HtmlTable("Interpolated along each seed's sweep, then mean ± std [seed interval]; blank where a "
                                  "seed's curve does not reach the target; ≈: the paired per-seed difference to the "
                                  "group's `full` is not resolved.", matched_markdown(matched))]
              if not matched.empty else []}
    shown = {title: [] for title in section_titles()}
    for figure in drawn:
        run = f", run {figure.run}" if figure.run else ""
        shown[figure.figure.section] += [HtmlFigure(f"{figure.figure.caption} ({path.stem}{run})", path)
                                         for path in figure.shown]
    sections = [HtmlSection(title, tables=tables.get(title, []), figures=shown[title]) for title in shown]
    n = int(view.frame["num_samples"].iloc[0])
    return write_html_report(out, f"adadiff-bench report: {', '.join(view.infos)}",
                             [s for s in sections if s.tables or s.figures],
                             subtitle=f"{len(board)} method settings, n = {n} samples per cell",
                             notices=skipped_metrics(board, view.infos))


def _load_for_tables(run_dirs: str | Path | list) -> ReportView:
    """The runs, refused (one line) before anything is written when a run.json lacks what the table notes read."""
    view = load_runs(_as_list(run_dirs))
    for reader in view.readers.values():
        reader.require("config", "data", "machine", "reference")
    return view


def _as_list(run_dirs: str | Path | list) -> list[Path]:
    return [Path(d) for d in (run_dirs if isinstance(run_dirs, (list, tuple)) else [run_dirs])]
