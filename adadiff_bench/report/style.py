"""One figure style for every report plot: paper column widths, a colour-blind-safe palette, PNG + PDF.

Widths follow the common two-column paper layouts: `SINGLE` (3.5 in) fits one column, `DOUBLE` (7.1 in)
the full page width. Fonts are sized to stay legible at 100% in print (7-8 pt). Colours are the
Okabe-Ito palette, safe for the common forms of colour blindness; markers vary too, so curves stay
apart in greyscale.
"""
from __future__ import annotations

import functools
import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from ..results import atomic_write_bytes  # noqa: E402

SINGLE, DOUBLE = 3.5, 7.1  # inches
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # 7 against 8 colours: 56 distinct pairs
DPI = 200
RC = {
    "font.size": 7, "axes.titlesize": 7.5, "axes.labelsize": 7, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5,
    "legend.fontsize": 6, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.1,
    "lines.markersize": 3.5, "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42,
    "savefig.dpi": DPI, "figure.dpi": DPI,
    "text.parse_math": False,  # names, paths and knob values are shown as typed: a '$' in them is no math
}
NO_DATA_HATCH = dict(facecolor="#e8e8e8", edgecolor="#9a9a9a", hatch="////", linewidth=0)  # where nothing was measured


def styled(plot):
    """Decorator: run a whole plotting function inside the report style (labels and ticks made later too)."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with plt.rc_context(RC):
            return plot(*args, **kwargs)
    return wrapper


def style(index: int) -> dict:
    """Colour and marker of the `index`-th series (cycling)."""
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)]}


def new_figure(width: float = SINGLE, height: float | None = None, nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) of the given width in inches; height defaults to 0.75 x width. Call inside `styled`."""
    return plt.subplots(nrows, ncols, figsize=(width, height or 0.75 * width), layout="constrained", **kwargs)


def save(fig, out: Path, stem: str) -> list[Path]:
    """Write `stem`.png (for looking) and `stem`.pdf (for papers) under `out`, close the figure, return the paths."""
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]  # (the writes make `out`, or say in one line why not)
    for path in paths:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:])
        atomic_write_bytes(path, buffer.getvalue())  # (a killed report leaves no half-written figure)
    plt.close(fig)
    return paths


def escape_math(text: str) -> str:
    """A user string inside a text drawn with `parse_math=True` (titles with intended math): its '$' kept literal."""
    return str(text).replace("$", r"\$")


def wrap(text: str, width: int = 40) -> str:
    """A title broken into lines of at most `width` characters (never inside a hyphenated name)."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))


def no_data_patch(label: str) -> mpatches.Patch:
    """A legend entry for the hatched "no data" background."""
    return mpatches.Patch(label=label, **NO_DATA_HATCH)


def hatch_background(ax) -> None:
    """Hatched grey behind an image: its NaN pixels (drawn transparent) show it."""
    ax.add_patch(mpatches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, zorder=0, **NO_DATA_HATCH))


def masked_cmap(name: str):
    """A colour map that draws NaN transparent, over the hatched background."""
    return matplotlib.colormaps[name].with_extremes(bad=(0, 0, 0, 0))
