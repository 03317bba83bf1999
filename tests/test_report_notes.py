"""What the report's tables say beside their numbers: the speed-up's own reference time, and which quality
metrics a run skipped, why, and how to get them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from adadiff_bench.report import write_leaderboard
from adadiff_bench.report.tables import SPEEDUP_NOTE

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
