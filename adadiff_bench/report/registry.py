"""The figure registry: every report figure is one function plus one `register_figure` call.

A figure function takes a `ReportView` and a folder and returns the paths it wrote (PNG + PDF, as
`style.save` writes them; [] when the runs hold nothing it could show):

    def my_figure(view: ReportView, out: Path) -> list[Path]: ...
    register_figure("my_figure", my_figure, caption="What it shows", section="Where compute is saved")

The report draws the registered figures in registration order, and index.html shows, in the figure's
section, each PNG the function wrote directly into `out` (files it writes into subfolders, such as
one heatmap per cell, are written but not shown). A figure registered with `per_run=True` is drawn
once per run into `out/<run name>/` when several runs are merged, from a view of that run alone.
Plugin packages register figures on import through the entry-point group `adadiff_bench.figures`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .view import ReportView

# The sections of index.html, in page order; a figure may name another section, which is added after these.
LEADERBOARD, QUALITY_VS_COST, MATCHED = "Leaderboard", "Quality vs cost", "FID at matched layer ratio and cost"
SPEEDUP, COMPUTE_SAVED = "Speed-up: measured vs ideal", "Where compute is saved"
UNCERTAINTY, SAMPLES = "AdaDiff's uncertainty", "Samples"
SECTIONS = (LEADERBOARD, QUALITY_VS_COST, MATCHED, SPEEDUP, COMPUTE_SAVED, UNCERTAINTY, SAMPLES)

FigureFunction = Callable[[ReportView, Path], list[Path]]


@dataclass(frozen=True)
class Figure:
    """A registered report figure (see `register_figure`)."""
    name: str
    draw: FigureFunction
    caption: str
    section: str
    per_run: bool = False


@dataclass
class DrawnFigure:
    """What drawing one figure wrote: the paths, and the run it was drawn for (None: all runs at once)."""
    figure: Figure
    folder: Path
    paths: list[Path]
    run: str | None = None

    @property
    def shown(self) -> list[Path]:
        """The PNGs index.html shows: those written directly into the figure's folder."""
        return [p for p in self.paths if p.suffix == ".png" and p.parent == self.folder]


_FIGURES: dict[str, Figure] = {}


def register_figure(name: str, draw: FigureFunction, caption: str, section: str, per_run: bool = False) -> Figure:
    """Add a figure to every report.

    `name`: a short identifier (e.g. "exit_heatmaps"), unique among figures; by convention also the file
    stem the function saves under. `draw(view, out)`: writes the figure under `out`, returns the paths.
    `caption`: one sentence under the figure in index.html (the file name is added in brackets).
    `section`: the index.html section it appears in, one of `SECTIONS` or a new title (added at the end).
    `per_run`: draw it once per run when several runs are merged (figures of one run's cells).
    Registering the same figure again is a no-op; another figure under a taken name is refused.
    """
    if not name.isidentifier() or not callable(draw) or not caption.strip() or not section.strip():
        raise ValueError(f"figure {name!r}: a name like 'my_figure', a function, a caption and a section are needed")
    figure = Figure(name, draw, caption, section, per_run)
    if name in _FIGURES and _FIGURES[name] != figure:
        raise ValueError(f"figure {name!r} is already registered (caption {_FIGURES[name].caption!r}); "
                         "pick another name")
    _FIGURES[name] = figure
    return figure


def registered_figures() -> list[Figure]:
    """Every registered figure, in registration order (the order the report draws them in)."""
    return list(_FIGURES.values())


def draw_figures(view: ReportView, out: Path) -> list[DrawnFigure]:
    """Draw every registered figure of the view under `out` (per-run figures under out/<run> for several runs)."""
    drawn = []
    for figure in registered_figures():
        if figure.per_run and view.several_runs:
            for run in view.infos:
                drawn.append(DrawnFigure(figure, out / run, list(figure.draw(view.of_run(run), out / run) or []), run))
        else:
            drawn.append(DrawnFigure(figure, out, list(figure.draw(view, out) or [])))
    return drawn


def section_titles() -> list[str]:
    """The sections of index.html in page order: the built-in ones, then new ones in registration order."""
    extra = [f.section for f in registered_figures() if f.section not in SECTIONS]
    return list(SECTIONS) + list(dict.fromkeys(extra))
