"""The results reader and the report package: a writer/reader round trip, one-line errors, reports that import
nothing heavy, family panels that keep every family, figures and metrics that register without report edits."""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adadiff_bench.cli import main
from adadiff_bench.errors import UserError
from adadiff_bench.metrics import specs
from adadiff_bench.report import figures, load_runs, register_figure, registry, write_report
from adadiff_bench.report.figures import panel_families
from adadiff_bench.report.style import new_figure, save, styled
from adadiff_bench.report.tables import leaderboard, to_markdown
from adadiff_bench.results import RunReader, RunStore, write_npz

NUM_BLOCKS, TIMESTEPS = 4, np.array([999.0, 500.0, 1.0])
HEAVY = ("torch", "torchvision", "diffusers", "fvcore", "torch_fidelity", "baselines")
OFFENDERS = ("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} "
             "or m.startswith(('adadiff_bench.methods', 'adadiff_bench.baselines'))))")


def cell_row(method, family, knobs, entry, gflops, fid, seed=0):
    cell_id = f"{method}-" + "-".join(f"{k}={v}" for k, v in knobs.items()) + f"-seed{seed}"
    return {"method": method, "family": family, "params": json.dumps(knobs), "solver": "ddim", "num_steps": 3,
            "num_samples": 4, "seed": seed, "valid": True, "ceiling": False, "entry": entry,
            "swept": json.dumps(sorted(knobs)), "fid_digits_cnn": fid, "gflops_per_image": gflops,
            "layer_ratio": gflops / 2.0, "time_per_image_s": 0.01 * gflops, "speedup": 2.0 / gflops, "cell_id": cell_id}


def step_log(layer_ratio: float, rng) -> dict[str, np.ndarray]:
    """Step-log summaries: samples exit at random blocks (every block when the layer ratio is 1)."""
    histogram = np.zeros((len(TIMESTEPS), NUM_BLOCKS + 1), dtype=np.int64)
    histogram[:, NUM_BLOCKS] = 4
    if layer_ratio < 1:
        histogram[:, 1:] = rng.multinomial(4, np.ones(NUM_BLOCKS) / NUM_BLOCKS, size=len(TIMESTEPS))
    fraction = np.full((len(TIMESTEPS), NUM_BLOCKS), layer_ratio)
    return {"timesteps": TIMESTEPS, "exit_histogram": histogram.sum(0), "timestep_exit_histogram": histogram,
            "timestep_block_fraction": fraction}


def run_info(name: str) -> dict:
    return {"config": {"name": name, "metrics": {}}, "data": {"name": "digits", "sha256": "a" * 64, "num_images": 50},
            "reference": {"solver": "ddim", "num_steps": 3}, "machine": {"torch_threads": 1, "device": "cpu"}}


def finished_run(results: Path, name: str = "small") -> Path:
    """A finished run written by the store's own writer, from plain arrays (no harness, no torch): the reference,
    an early-exit sweep, a caching method and a method of a family the report does not know."""
    rng = np.random.default_rng(0)
    rows = [cell_row("full", "reference", {}, 0, 2.0, 10.0),
            cell_row("static-exit", "early-exit", {"k": 2}, 1, 1.0, 20.0),
            cell_row("static-exit", "early-exit", {"k": 3}, 1, 1.5, 14.0),
            cell_row("deepcache", "caching", {"interval": 2}, 2, 1.2, 12.0),
            cell_row("my-sampler", "my-family", {"tau": 0.5}, 3, 1.1, 13.0)]
    store = RunStore(results, name)
    for row in rows:
        samples = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
        store.write_cell(row["cell_id"], row, samples, step_log(row["layer_ratio"], rng))
    return store.finish(rows, run_info(name), [row["cell_id"] for row in rows])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return finished_run(tmp_path / "results")


# ---- the reader ----------------------------------------------------------------------------------

def test_reader_reads_back_what_the_writer_wrote(tmp_path):
    store = RunStore(tmp_path, "trip")
    row = cell_row("adadiff", "early-exit", {"threshold": 0.2}, 1, 1.0, 9.0)
    samples = np.arange(2 * 8 * 8 * 1, dtype=np.uint8).reshape(2, 8, 8, 1)
    summaries = step_log(0.5, np.random.default_rng(1))
    maps = {"steps": np.array([0, 2]), "maps": np.random.default_rng(2).uniform(size=(2, 2, 3, 1, 8, 8))}
    store.write_cell(row["cell_id"], row, samples, summaries, {"uncertainty_maps": maps})
    reader = RunReader(store.finish([row], run_info("trip"), [row["cell_id"]]))
    assert reader.name == "trip" and reader.info == run_info("trip")
    assert reader.frame().to_dict("records") == [row] and reader.cell_ids == [row["cell_id"]]
    assert reader.samples(row["cell_id"]).dtype == np.uint8 and np.array_equal(reader.samples(row["cell_id"]), samples)
    exits = reader.exits(row["cell_id"])
    assert exits.keys() == summaries.keys() and all(np.array_equal(exits[k], summaries[k]) for k in summaries)
    assert reader.artifact_names(row["cell_id"]) == ["uncertainty_maps"]
    assert all(np.array_equal(reader.artifact(row["cell_id"], "uncertainty_maps")[k], maps[k]) for k in maps)


def test_a_missing_archive_reads_as_none(run_dir):
    reader = RunReader(run_dir)
    cell_id = reader.cell_ids[0]
    assert reader.artifact(cell_id, "uncertainty_maps") is None and reader.artifact_names(cell_id) == []
    assert reader.samples("no-such-cell") is None and reader.exits("no-such-cell") is None
    write_npz(reader.path / "cells" / cell_id / "exits.npz", exit_histogram=np.ones(5))  # no per-step summaries
    assert reader.exits(cell_id) is None


def test_an_unfinished_run_is_one_line_naming_the_fix(tmp_path, capsys):
    partial = tmp_path / ".half.partial"
    (partial / "cells").mkdir(parents=True)
    with pytest.raises(UserError) as raised:
        RunReader(partial)
    message = str(raised.value)
    assert "\n" not in message and "is not a finished run (no results.csv/run.json)" in message
    assert "run `adadiff-bench run --config ...` first" in message
    assert main(["report", str(partial), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a finished run" in error


def test_the_reader_never_unpickles_nor_leaves_the_run(run_dir):
    reader = RunReader(run_dir)
    cell_id = reader.cell_ids[0]
    np.savez(reader.path / "cells" / cell_id / "notes.npz", note=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="pickled"):
        reader.artifact(cell_id, "notes")
    with pytest.raises(UserError, match="not a plain folder or file name"):
        reader.samples("../../elsewhere")


# ---- the report imports nothing heavy --------------------------------------------------------------

def run_python(code: str) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_report_imports_no_torch_and_no_methods():
    assert run_python("import adadiff_bench.report; " + OFFENDERS.format(heavy=HEAVY)) == "[]"


def test_rendering_a_report_imports_no_torch_and_no_methods(run_dir, tmp_path):
    out = tmp_path / "report"
    code = f"from adadiff_bench.report import write_report; write_report({str(run_dir)!r}, {str(out)!r}); "
    assert run_python(code + OFFENDERS.format(heavy=HEAVY)) == "[]"
    for name in ("leaderboard.md", "index.html", "fid_vs_gflops.png", "fid_vs_gflops_by_family.pdf",
                 "exit_heatmaps.png", "samples_side_by_side.png"):
        assert (out / name).is_file(), name


# ---- families --------------------------------------------------------------------------------------

def test_a_family_the_report_does_not_know_gets_its_own_panel_after_the_known_ones(run_dir, tmp_path, monkeypatch):
    view = load_runs([run_dir])
    assert panel_families(view.frame) == ["early-exit", "caching", "my-family"]
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, out, stem: drawn.setdefault(stem, fig) and [])
    figures.fid_vs_cost_by_family(view, tmp_path)
    titles = [ax.get_title() for ax in drawn["fid_vs_gflops_by_family"].axes]
    assert titles == ["early-exit", "caching", "my-family"]


def test_rows_without_a_recorded_family_are_other(tmp_path):
    run = finished_run(tmp_path, "old")
    frame = RunReader(run).frame().drop(columns="family")
    frame.to_csv(run / "results.csv", index=False)
    assert set(load_runs([run]).frame["family"]) == {"other"}


# ---- registering a figure --------------------------------------------------------------------------

def section_html(page: str, title: str) -> str:
    """The markup of the index.html section with this title ('' when there is none)."""
    sections = re.findall(r"<section id=\"[^\"]+\">(.*?)</section>", page, flags=re.S)
    return next((s for s in sections if f"<h2>{html.escape(title)}</h2>" in s), "")


@pytest.mark.parametrize("section", ["Where compute is saved", "Cells at a glance"])
def test_a_registered_figure_appears_in_index_html_in_its_section(run_dir, tmp_path, monkeypatch, section):
    monkeypatch.setattr(registry, "_FIGURES", dict(registry._FIGURES))  # the registration ends with the test

    @styled
    def cells_per_family(view, out):
        counts = view.frame["family"].value_counts()
        fig, ax = new_figure()
        ax.bar(counts.index, counts.to_numpy())
        return save(fig, out, "cells_per_family")

    register_figure("cells_per_family", cells_per_family, caption="Cells per method family", section=section)
    written = write_report(run_dir, tmp_path / "out")
    assert tmp_path / "out" / "cells_per_family.pdf" in written
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<figcaption>Cells per method family (cells_per_family)</figcaption>" in section_html(page, section)
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles.index(html.escape(section)) > titles.index("Quality vs cost")


def test_a_taken_figure_name_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_FIGURES", dict(registry._FIGURES))
    with pytest.raises(ValueError, match="already registered"):
        register_figure("exit_heatmaps", lambda view, out: [], caption="another", section="Samples")


# ---- a newly registered metric reaches the leaderboard -------------------------------------------

def test_a_new_metric_gets_its_header_arrow_format_sort_and_seed_aggregation(monkeypatch):
    monkeypatch.setattr(specs, "_METRICS", dict(specs._METRICS))
    specs.register_metric(specs.MetricSpec("sharpness", (specs.Quantity("sharp", "Sharpness", True, decimals=1),),
                                           "fid", compute=None, seeds="median"))
    frame = pd.DataFrame({"method": ["full"] * 3 + ["fast"] * 3, "params": "{}", "solver": "ddim", "num_steps": 10,
                          "num_samples": 100, "seed": [0, 1, 2] * 2, "fid_digits_cnn": 10.0,
                          "sharp_digits_cnn": [1.0, 2.0, 10.0, 5.0, 6.0, 7.0], "gflops_per_image": 1.0,
                          "layer_ratio": 1.0})
    board = leaderboard(frame, sort_by="sharp_digits_cnn")
    assert list(board["sharp_digits_cnn"]) == [6.0, 2.0]  # medians, higher first
    assert board["sharp_digits_cnn_seed_std"].iloc[1] == pytest.approx(np.std([1, 2, 10], ddof=1))
    table = to_markdown(board)
    assert "Sharpness [digits_cnn] ↑" in table and "| 2.0 ± 4.9 |" in table


def test_a_rerun_report_removes_what_the_previous_one_wrote_and_no_longer_writes(run_dir, tmp_path):
    """Files an earlier report listed (`.report_files`) but this one did not write go; a user's own file, a
    listed path outside the folder and a listed symlink stay untouched."""
    from adadiff_bench.report import WRITTEN_LIST
    out = tmp_path / "report"
    first = write_report(run_dir, out)
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / "dropped_cell.png").write_bytes(b"stale")   # as a cell the rerun dropped left it
    (out / "notes.txt").write_text("mine")                         # never listed: a user's file
    (tmp_path / "outside.txt").write_text("outside")
    (out / "link.png").symlink_to(tmp_path / "outside.txt")
    listed = (out / WRITTEN_LIST).read_text().splitlines()
    assert sorted(listed) == sorted(p.resolve().relative_to(out.resolve()).as_posix() for p in first)
    (out / WRITTEN_LIST).write_text("\n".join(listed + ["samples/dropped_cell.png", "../outside.txt", "link.png"]))
    second = write_report(run_dir, out)
    assert not (out / "samples" / "dropped_cell.png").exists()
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside.txt").read_text() == "outside"
    assert (out / "link.png").is_symlink() and all(p.is_file() for p in second)
    (out / WRITTEN_LIST).write_bytes(b"\xff\xfe binary")  # an unreadable list prunes nothing, and is rewritten
    write_report(run_dir, out)
    assert (out / "notes.txt").is_file() and "index.html" in (out / WRITTEN_LIST).read_text().splitlines()
