"""What the report's tables say beside their numbers: the speed-up's own reference time, and which quality
metrics a run skipped, why, and how to get them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adadiff_bench.metrics.extractors import INCEPTION, extractor_specs
from adadiff_bench.report import write_leaderboard, write_report
from adadiff_bench.report.tables import INCEPTION_SPACE, SPEEDUP_NOTE, leaderboard, skipped_metrics
from adadiff_bench.report.view import load_runs
from test_report_tables import fake_run

REPO = Path(__file__).resolve().parents[1]


def markdown_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The leaderboard's header and body cells, read back from its Markdown."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return split[0], split[1:]


def test_each_speedup_is_its_reference_time_over_its_time(tmp_path):
    """On the committed demo: every row's speed-up equals the reference time beside it over its time, to the
    rounding of the printed digits (3 decimals of ms and of the ratio)."""
    write_leaderboard([REPO / "results" / "demo"], tmp_path)
    text = (tmp_path / "leaderboard.md").read_text()
    header, rows = markdown_rows(text)
    time, reference, speedup = (header.index(h) for h in
                                ("time/image (ms) ↓", "reference time/image (ms)", "speed-up vs full ↑"))
    assert rows and time < reference < speedup  # the pair sits side by side, before the ratio
    for row in rows:
        t, r, s = float(row[time]), float(row[reference]), float(row[speedup])
        bound = 5e-4 * (1 / t + r / t ** 2) * 1.01 + 5e-4  # how far rounding of t and r can move r/t, plus s's own
        assert s == pytest.approx(r / t, abs=bound)
    assert SPEEDUP_NOTE in text


def rewrite_info(folder: Path, metrics: dict, extractors: list[str]) -> Path:
    """Set what a fake run's run.json says about its metrics config and the feature spaces it used."""
    info = json.loads((folder / "run.json").read_text())
    info["config"]["metrics"], info["feature_extractors"] = metrics, extractors
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def top_of(board_text: str) -> str:
    """What leaderboard.md says between its title and its table."""
    return board_text.split("\n| ", 1)[0]


def test_the_report_names_inception_as_the_extractors_do():
    assert INCEPTION_SPACE == INCEPTION


def test_demo_report_says_at_the_top_that_inception_was_skipped_and_how_to_get_it(tmp_path):
    info = json.loads((REPO / "results" / "demo" / "run.json").read_text())
    assert INCEPTION not in info["feature_extractors"]  # the premise: the demo ran without Inception weights
    write_report([REPO / "results" / "demo"], tmp_path)
    top = top_of((tmp_path / "leaderboard.md").read_text())
    assert "Inception metrics skipped: no Inception weights" in top and "--inception-weights PATH" in top
    page = (tmp_path / "index.html").read_text()
    notice = page.index('<div class="notice"')
    assert notice < page.index("<main>") and "--inception-weights PATH" in page[notice:page.index("</div>", notice)]


def test_a_run_without_any_quality_metric_says_what_is_missing_and_why(tmp_path):
    rows = [{"method": "full", "gflops_per_image": 2.0, "time_per_image_s": 0.02, "speedup": 1.0}]
    run = rewrite_info(fake_run(tmp_path / "r", "r", rows), {"inception": "off", "prc": False}, [])
    write_leaderboard([run], tmp_path / "out")
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    top = top_of(text)
    assert "No FID was computed" in top and "no Pareto marks" in top
    assert 'inception = "off"' in top and "prc = false" in top
    assert "No feature space read these images" in top
    assert "FID by" not in text  # the notes no longer claim a FID backend


def test_a_run_with_every_space_and_metric_has_no_notice(tmp_path):
    rows = [{"method": "full", "gflops_per_image": 2.0, "fid_digits_cnn": 9.0, "time_per_image_s": 0.02, "speedup": 1.0}]
    spaces = [spec.name for spec in extractor_specs()]
    run = rewrite_info(fake_run(tmp_path / "r", "r", rows), {"inception": "auto", "prc": True}, spaces)
    view = load_runs([run])
    assert skipped_metrics(leaderboard(view.frame), view.infos) == []
    write_leaderboard([run], tmp_path / "out")
    assert top_of((tmp_path / "out" / "leaderboard.md").read_text()).strip() == "# Leaderboard: r"


def test_settings_timed_beside_busy_processes_are_named_under_the_leaderboard(tmp_path):
    # two seeds of one setting, one of them timed beside 1.8 busy cores: the setting is named (its worst seed);
    # a quiet one, a value the file holds as text, and a run from before the column are not
    rows = [{"method": "full", "gflops_per_image": 2.0, "fid_digits_cnn": 9.0, "time_per_image_s": 0.02, "speedup": 1.0,
             "timing_other_cores": 0.1, "cell_id": "a"},
            {"method": "static-exit", "params": '{"k": 2}', "gflops_per_image": 1.0, "fid_digits_cnn": 12.0,
             "time_per_image_s": 0.01, "speedup": 2.0, "timing_other_cores": 0.0, "cell_id": "b"},
            {"method": "static-exit", "params": '{"k": 2}', "seed": 1, "gflops_per_image": 1.0, "fid_digits_cnn": 12.0,
             "time_per_image_s": 0.01, "speedup": 2.0, "timing_other_cores": 1.8, "cell_id": "c"},
            {"method": "static-exit", "params": '{"k": 3}', "gflops_per_image": 1.5, "fid_digits_cnn": 10.0,
             "time_per_image_s": 0.015, "speedup": 1.3, "timing_other_cores": "busy?", "cell_id": "d"}]
    write_leaderboard([fake_run(tmp_path / "r", "r", rows)], tmp_path / "out")
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    notes = [line for line in text.splitlines() if "other processes" in line]
    assert len(notes) == 1 and "at least 0.5 cores" in notes[0]
    assert notes[0].endswith("suspect: static-exit (k=2, ddim 10 steps).")
    assert "timing_other_cores" not in markdown_rows(text)[0]
    before = [{key: value for key, value in row.items() if key != "timing_other_cores"} for row in rows]
    write_leaderboard([fake_run(tmp_path / "old", "old", before)], tmp_path / "old_out")
    assert "other processes" not in (tmp_path / "old_out" / "leaderboard.md").read_text()


def test_a_busy_setting_is_named_with_its_run_and_checkpoint_when_the_board_has_two_backbones(tmp_path):
    # one setting on two backbones (two runs), timed beside busy cores on one of them: the note says which, by
    # the run and checkpoint that name the setting on a merged board
    def rows(digits: str, checkpoint: str, busy: float) -> list[dict]:
        knobs = '{"checkpoint": "%s"}' % checkpoint
        return [{"method": "full", "params": knobs, "gflops_per_image": 2.0, "fid_digits_cnn": 9.0,
                 "time_per_image_s": 0.02, "speedup": 1.0, "timing_other_cores": 0.0, "backbone_hash": digits * 64},
                {"method": "static-exit", "params": '{"checkpoint": "%s", "k": 2}' % checkpoint,
                 "gflops_per_image": 1.0, "fid_digits_cnn": 12.0, "time_per_image_s": 0.01, "speedup": 2.0,
                 "timing_other_cores": busy, "backbone_hash": digits * 64}]
    runs = [fake_run(tmp_path / "uvit", "uvit", rows("a", "uvit.pt", 0.0)),
            fake_run(tmp_path / "dit", "dit", rows("b", "dit.pt", 1.2))]
    write_leaderboard(runs, tmp_path / "out")
    notes = [line for line in (tmp_path / "out" / "leaderboard.md").read_text().splitlines() if "other processes" in line]
    assert len(notes) == 1 and notes[0].endswith("suspect: [dit] static-exit (checkpoint=dit, k=2, ddim 10 steps).")
