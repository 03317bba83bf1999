"""Every figure of a report fits its canvas: no title, label, tick or legend entry is cut off, even with the
long method names and knob values that plugin methods and sweeps bring.

The report is drawn from a synthetic finished run (the store's own writer, no torch), with `style.save`
wrapped so that each figure is checked just before it is written: every visible text artist's box, as the
renderer lays it out, lies inside the figure's canvas.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text

from adadiff_bench.report import style, write_report
from adadiff_bench.results import RunStore

NUM_BLOCKS, TIMESTEPS = 6, np.array([999.0, 750.0, 500.0, 250.0, 1.0])
LONG = "a-plugin-sampler-with-a-rather-long-registered-name"
TOLERANCE_PX = 1.0  # anti-aliasing may put a glyph's box a fraction of a pixel over the edge


def cell_row(method: str, family: str, knobs: dict, entry: int, gflops: float, fid: float, seed: int = 0) -> dict:
    cell_id = f"{method}-" + "-".join(f"{k}={v}" for k, v in knobs.items()) + f"-seed{seed}"
    return {"method": method, "family": family, "params": json.dumps(knobs), "solver": "ddim", "num_steps": 5,
            "num_samples": 4, "seed": seed, "valid": True, "ceiling": False, "entry": entry,
            "swept": json.dumps(sorted(knobs)), "fid_digits_cnn": fid, "is_digits_cnn_mean": 2.0 + fid / 100,
            "gflops_per_image": gflops, "layer_ratio": gflops / 2.0, "time_per_image_s": 0.01 * gflops,
            "reference_time_per_image_s": 0.02, "speedup": 2.0 / gflops, "cell_id": cell_id}


def step_log(layer_ratio: float, rng) -> dict[str, np.ndarray]:
    """Step-log summaries: samples exit at random blocks (every block when the layer ratio is 1)."""
    histogram = np.zeros((len(TIMESTEPS), NUM_BLOCKS + 1), dtype=np.int64)
    histogram[:, NUM_BLOCKS] = 4
    if layer_ratio < 1:
        histogram[:, 1:] = rng.multinomial(4, np.ones(NUM_BLOCKS) / NUM_BLOCKS, size=len(TIMESTEPS))
    fraction = np.full((len(TIMESTEPS), NUM_BLOCKS), layer_ratio)
    return {"timesteps": TIMESTEPS, "exit_histogram": histogram.sum(0), "timestep_exit_histogram": histogram,
            "timestep_block_fraction": fraction}


def long_named_run(results: Path) -> Path:
    """Seven method settings, two of them with long names and long knob values, one a family of its own."""
    rows = [cell_row("full", "reference", {}, 0, 2.0, 10.0),
            cell_row("static-exit", "early-exit", {"exit_layer": 2}, 1, 1.0, 20.0),
            cell_row("static-exit", "early-exit", {"exit_layer": 4}, 1, 1.5, 14.0),
            cell_row("first-block-cache", "caching", {"residual_threshold": 0.125}, 2, 1.2, 12.0),
            cell_row("adaptive-diffusion", "step-skipping", {"skip_threshold": 0.0125}, 3, 1.3, 12.5),
            cell_row(LONG, "a-family-of-its-own", {"an_unusually_long_knob_name": "a-long-string-value"}, 4, 1.1, 13.0),
            cell_row(LONG, "a-family-of-its-own", {"an_unusually_long_knob_name": "another-long-value"}, 4, 0.9, 16.0)]
    rng = np.random.default_rng(0)
    store = RunStore(results, "long-names")
    for row in rows:
        samples = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
        store.write_cell(row["cell_id"], row, samples, step_log(row["layer_ratio"], rng))
    info = {"config": {"name": "long-names", "metrics": {}},
            "data": {"name": "digits", "sha256": "a" * 64, "num_images": 50},
            "reference": {"solver": "ddim", "num_steps": 5}, "machine": {"torch_threads": 1, "device": "cpu"}}
    return store.finish(rows, info, [row["cell_id"] for row in rows])


def texts_outside_the_canvas(fig) -> list[str]:
    """The visible, non-empty texts of `fig` whose laid-out box leaves the canvas, with where they stick out."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    outside = []
    for text in drawn_texts(fig):
        box = text.get_window_extent(renderer)
        if (box.x0 < -TOLERANCE_PX or box.y0 < -TOLERANCE_PX
                or box.x1 > width + TOLERANCE_PX or box.y1 > height + TOLERANCE_PX):
            outside.append(f"{text.get_text()!r} at x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f} "
                           f"(canvas {width:.0f} x {height:.0f})")
    return outside


def drawn_texts(fig) -> list[Text]:
    """The visible, non-empty texts that drawing `fig` shows. An axis keeps labelled ticks just beyond its view
    limits (the locator's last tick), which are never drawn: those are left out."""
    undrawn = set()
    for axis in (axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)):
        low, high = sorted(axis.get_view_interval())
        slack = 1e-9 * (high - low)
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if not low - slack <= tick.get_loc() <= high + slack:
                undrawn |= {tick.label1, tick.label2}
    return [text for text in fig.findobj(Text)
            if text.get_visible() and text.get_text().strip() and text not in undrawn]


@pytest.fixture(scope="module")
def checked_figures(tmp_path_factory):
    """Draw the whole report once, checking each figure as it is saved: {figure stem: texts outside}."""
    tmp = tmp_path_factory.mktemp("fit")
    run = long_named_run(tmp / "results")
    checked, original_save = {}, style.save

    def checking_save(fig, out, stem):
        checked[stem] = texts_outside_the_canvas(fig)
        return original_save(fig, out, stem)

    with pytest.MonkeyPatch.context() as patch:
        for module in _modules_that_save():
            patch.setattr(module, "save", checking_save)
        write_report(run, tmp / "report")
    return checked


def _modules_that_save():
    """The report modules that imported `save` from the style module (they call their own name for it)."""
    import sys
    return [module for name, module in sys.modules.items()
            if name.startswith("adadiff_bench.report") and getattr(module, "save", None) is style.save]


def test_the_report_draws_the_figures_that_long_names_stress(checked_figures):
    # (the check below would pass vacuously if these were not drawn)
    assert {"speedup_bars", "fid_vs_gflops"} <= set(checked_figures), sorted(checked_figures)


def test_no_text_of_any_figure_falls_outside_its_canvas(checked_figures):
    offenders = {stem: texts for stem, texts in checked_figures.items() if texts}
    assert not offenders, "\n".join(f"{stem}: {'; '.join(texts)}" for stem, texts in offenders.items())


def test_the_check_catches_a_label_outside_the_canvas():
    with __import__("matplotlib").pyplot.rc_context(style.RC):
        fig, ax = style.new_figure()
        ax.text(1.5, 0.5, "far to the right", transform=ax.transAxes)
        assert texts_outside_the_canvas(fig) and not texts_outside_the_canvas(style.new_figure()[0])
