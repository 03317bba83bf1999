"""A run on the tiny model with AdaDiff settings that cannot exit, always exit, or adapt: one stderr line for each
degenerate cell, a note beside its leaderboard row, and every row's backbone hash (estimators excluded)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from adadiff_bench.backbone_id import backbone_hash
from adadiff_bench.cli import main
from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff, save_adadiff
from conftest import TINY, write_run_config


def adadiff_on_tiny(tmp_path, tiny_model):
    """An AdaDiff checkpoint on the tiny model's own backbone, with spread random estimators."""
    net = build_adadiff(TINY, AdaDiffConfig())
    net.backbone.load_state_dict(tiny_model.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.estimator.parameters():
            p.normal_(0, 2.0)
    path = tmp_path / "adadiff_tiny.pt"
    save_adadiff(path, net, TINY)
    return path


def test_degenerate_thresholds_warn_once_each_and_are_noted_in_the_report(tmp_path, tiny_checkpoint, tiny_model,
                                                                          capsys):
    adadiff = adadiff_on_tiny(tmp_path, tiny_model)
    # u = 1 - mean sigmoid lies strictly inside (0, 1): threshold 0 never passes, 1 always passes at block 1
    methods = f'\n[[methods]]\nname = "adadiff"\ncheckpoint = "{adadiff}"\nthreshold = [0.0, 0.5, 1.0]\n'
    config = write_run_config(tmp_path, tiny_checkpoint, methods, timing="enabled = false")
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    frame = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    by_threshold = {json.loads(p)["threshold"]: row for p, row in zip(frame["params"], frame.itertuples())
                    if "threshold" in p}
    never, adapts, always = by_threshold[0.0], by_threshold[0.5], by_threshold[1.0]
    assert never.layer_ratio == 1.0 and never.exit_warning.startswith("never exits")
    blocks = tiny_model.num_blocks
    assert always.layer_ratio == 1 / blocks and always.exit_warning.startswith(f"always exits at block 1 of {blocks}")
    assert 1 / blocks < adapts.layer_ratio < 1 and pd.isna(adapts.exit_warning)
    assert frame.loc[frame["method"] == "full", "exit_warning"].isna().all()  # no exits to judge
    # one line per degenerate cell, naming its setting
    assert len(warnings) == 2
    assert ["threshold=0.0" in w and "never exits" in w for w in warnings].count(True) == 1
    assert ["threshold=1.0" in w and f"always exits at block 1 of {blocks}" in w for w in warnings].count(True) == 1

    # every cell ran the tiny backbone: one hash, the estimators left out
    assert frame["backbone_hash"].nunique() == 1 and frame["backbone_hash"].iloc[0] == backbone_hash(tiny_model)

    assert main(["leaderboard", str(tmp_path / "results" / "tiny"), "--out", str(tmp_path / "board")]) == 0
    text = (tmp_path / "board" / "leaderboard.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| adadiff")]
    assert sum("[never exits]" in r for r in rows) == 1 and sum(f"[always exits at block 1 of {blocks}]" in r
                                                               for r in rows) == 1
    assert sum(r.count("[") for r in rows) == 2 and "never left" in text
    assert np.isclose(frame["layer_ratio"].min(), 1 / blocks)
