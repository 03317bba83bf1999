"""Cell labels in progress bars and log lines: short, and still one per cell."""
from __future__ import annotations

import pytest

from adadiff_bench.cell_labels import short_labels
from adadiff_bench.config import load_run_config
from adadiff_bench.harness import plan_curves
from conftest import REPO, write_run_config


@pytest.mark.parametrize("name", ["demo", "digits_full", "ablation"])
def test_the_shipped_configs_get_one_short_label_per_cell(name, monkeypatch):
    monkeypatch.chdir(REPO)
    curves = plan_curves(load_run_config(REPO / "configs" / f"{name}.toml"))
    labels = short_labels(curves)
    assert len(set(labels.values())) == len(curves)  # one label per cell
    longest_id = max(len(cell.cell_id) for cell in curves)
    assert max(len(label) for label in labels.values()) <= 60 < longest_id


def test_a_label_names_the_swept_knobs_and_the_seed_when_there_are_several(tmp_path, tiny_checkpoint):
    methods = '[[methods]]\nname = "static-exit"\nk = [1, 2]\n'
    config = write_run_config(tmp_path, tiny_checkpoint, methods)
    text = config.read_text().replace("seeds = [0]", "seeds = [0, 1]")
    config.write_text(text)
    labels = set(short_labels(plan_curves(load_run_config(config))).values())
    assert {"full 2 steps seed 0", "static-exit k=1 seed 1"} <= labels


def test_cells_that_would_read_the_same_keep_a_hash_of_their_id(tmp_path, tiny_checkpoint):
    # two entries of one method differing only in a knob neither sweeps: the hash tells them apart
    methods = ('[[methods]]\nname = "static-exit"\nk = 1\n'
               '[[methods]]\nname = "static-exit"\nk = 2\n')
    labels = short_labels(plan_curves(load_run_config(write_run_config(tmp_path, tiny_checkpoint, methods))))
    static = sorted(label for cell, label in labels.items() if cell.method == "static-exit")
    assert len(static) == 2 and static[0] != static[1]
    assert all(label.startswith("static-exit #") and len(label) == len("static-exit #") + 6 for label in static)
