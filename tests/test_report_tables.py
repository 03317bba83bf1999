"""Report tables: Pareto marks against a brute-force skyline, LaTeX output, merging runs, sorting, interleaved time."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from adadiff_bench.cli import main
from adadiff_bench.errors import UserError
from adadiff_bench.report import load_runs
from adadiff_bench.report.figures import pareto_front, with_interleaved_time
from adadiff_bench.report.tables import leaderboard, pareto_mask, to_latex


def fake_run(folder, name: str, rows: list[dict], num_samples: int = 100, data_sha: str = "a" * 64):
    """A finished run's results.csv and run.json with just what the report reads."""
    folder.mkdir(parents=True)
    base = {"params": "{}", "solver": "ddim", "num_steps": 10, "num_samples": num_samples, "seed": 0, "valid": True,
            "ceiling": False, "layer_ratio": 1.0, "entry": 0, "swept": "[]", "cell_id": "c"}
    frame = pd.DataFrame([{**base, **row} for row in rows])
    frame.to_csv(folder / "results.csv", index=False)
    info = {"config": {"name": name, "metrics": {}}, "data": {"name": "digits", "sha256": data_sha, "num_images": 50},
            "reference": {"solver": "ddim", "num_steps": 10}, "machine": {"torch_threads": 1, "device": "cpu"}}
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def skyline(fid: np.ndarray, cost: np.ndarray) -> set[int]:
    """The Pareto set by a different algorithm: sweep by cost, keep points better than every cheaper one."""
    order = np.lexsort((fid, cost))
    best, keep = np.inf, set()
    for i in order:
        if fid[i] < best:
            keep.add(int(i))
            best = fid[i]
    return keep


def test_pareto_marks_match_a_skyline_sweep():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 30
        board = pd.DataFrame({"fid": rng.integers(1, 15, n).astype(float), "gflops_per_image": rng.integers(1, 15, n) / 4})
        marked = set(np.flatnonzero(pareto_mask(board, "fid", np.ones(n, dtype=bool))))
        # ties: a point equal to a kept one on both axes is kept by the mask but not by the sweep; remove them
        duplicates = {i for i in marked for j in marked if j < i and board.iloc[i].equals(board.iloc[j])}
        assert marked - duplicates == skyline(board["fid"].to_numpy(), board["gflops_per_image"].to_numpy())


def test_ceilings_never_take_a_pareto_place():
    board = pd.DataFrame({"fid": [5.0, 10.0, 20.0], "gflops_per_image": [1.0, 1.0, 0.5]})
    assert list(pareto_mask(board, "fid", np.array([False, True, True]))) == [False, True, True]


def test_pareto_front_in_the_figure_is_the_boards_pareto_set(tmp_path):
    rows = [{"method": "a", "params": json.dumps({"k": k}), "gflops_per_image": g, "fid_digits_cnn": f}
            for k, (g, f) in enumerate([(1.0, 20.0), (2.0, 10.0), (3.0, 12.0), (4.0, 5.0), (0.5, 30.0)])]
    frame = load_runs([fake_run(tmp_path / "r", "r", rows)]).frame
    board = leaderboard(frame)
    front = pareto_front(frame, "fid_digits_cnn", "gflops_per_image")
    assert sorted(front["gflops_per_image"]) == sorted(board.loc[board["pareto"], "gflops_per_image"]) == [0.5, 1.0, 2.0, 4.0]


def test_latex_table_is_booktabs_with_escaped_cells(tmp_path):
    rows = [{"method": "full", "gflops_per_image": 2.0, "fid_digits_cnn": 9.5},
            {"method": "adadiff", "params": json.dumps({"checkpoint": "checkpoints/a_b.pt", "threshold": 0.3}),
             "gflops_per_image": 1.0, "fid_digits_cnn": 20.0}]
    frame = load_runs([fake_run(tmp_path / "r", "r", rows)]).frame
    latex = to_latex(leaderboard(frame), caption="50% of n_samples")
    assert latex.count(r"\toprule") == latex.count(r"\midrule") == latex.count(r"\bottomrule") == 1
    body = latex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    header = latex.split(r"\toprule")[1].split(r"\midrule")[0].strip()
    columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", latex).group(1))
    assert len(body) == 2 and all(line.count(" & ") == columns - 1 for line in body + [header])
    assert r"a\_b" in latex and r"50\% of n\_samples" in latex and r"$\downarrow$" in latex and r"$\star$" in latex
    assert "_" not in latex.replace(r"\_", "")  # every underscore escaped


def test_runs_with_another_n_or_other_data_are_refused(tmp_path, capsys):
    row = [{"method": "full", "gflops_per_image": 1.0, "fid_digits_cnn": 9.0}]
    first = fake_run(tmp_path / "a", "a", row)
    other_n = fake_run(tmp_path / "b", "b", row, num_samples=200)
    other_data = fake_run(tmp_path / "c", "c", row, data_sha="b" * 64)
    with pytest.raises(UserError, match="different number of samples"):
        load_runs([first, other_n])
    assert main(["leaderboard", str(first), str(other_data), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "different data" in error
    assert not (tmp_path / "out").exists()


def test_merged_leaderboard_names_each_run(tmp_path, capsys):
    rows = [{"method": "full", "gflops_per_image": 1.0, "fid_digits_cnn": 9.0},
            {"method": "static-exit", "params": '{"k": 4}', "gflops_per_image": 0.5, "fid_digits_cnn": 20.0}]
    runs = [fake_run(tmp_path / name, name, rows) for name in ("one", "two")]
    assert main(["leaderboard", *map(str, runs), "--out", str(tmp_path / "out"), "--sort-by", "gflops_per_image"]) == 0
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert len(board) == 4 and board["setting"].str.startswith(("[one] ", "[two] ")).all()
    assert list(board["gflops_per_image"]) == [0.5, 0.5, 1.0, 1.0]  # ascending: lower is better
    assert (tmp_path / "out" / "leaderboard.tex").is_file() and "[one] static-exit" in capsys.readouterr().out


def test_sort_by_an_unknown_column_suggests_one(tmp_path):
    frame = load_runs([fake_run(tmp_path / "r", "r", [{"method": "full", "gflops_per_image": 1.0,
                                                        "fid_digits_cnn": 9.0, "speedup": 1.0}])]).frame
    with pytest.raises(UserError, match="did you mean 'speedup'"):
        leaderboard(frame, sort_by="speedpu")


def test_higher_is_better_columns_sort_descending(tmp_path):
    rows = [{"method": "a", "params": json.dumps({"k": k}), "gflops_per_image": 1.0, "fid_digits_cnn": 9.0,
             "speedup": s} for k, s in enumerate([1.2, 3.0, 0.5])]
    frame = load_runs([fake_run(tmp_path / "r", "r", rows)]).frame
    assert list(leaderboard(frame, sort_by="speedup")["speedup"]) == [3.0, 1.2, 0.5]


def test_interleaved_time_is_the_reference_time_over_the_speedup(tmp_path):
    rows = [{"method": "full", "gflops_per_image": 2.0, "fid_digits_cnn": 9.0, "time_per_image_s": 0.02, "speedup": 1.0},
            {"method": "static-exit", "params": '{"k": 4}', "gflops_per_image": 1.0, "fid_digits_cnn": 20.0,
             "time_per_image_s": 0.5, "speedup": 2.0}]  # an absolute time hit by a contention spike
    frame = load_runs([fake_run(tmp_path / "r", "r", rows)]).frame
    assert list(with_interleaved_time(frame)["interleaved_time_s"]) == pytest.approx([0.02, 0.01])
