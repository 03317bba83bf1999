"""One backbone per comparison: the backbone hash ignores estimators, sees every backbone weight, and the
leaderboard's dFID and Pareto marks stay inside a backbone's group."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from adadiff_bench.backbone_id import backbone_hash, method_backbone, weights_hash
from adadiff_bench.checkpoints import load_model
from adadiff_bench.methods import get_method, make_params
from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff, load_adadiff, save_adadiff
from adadiff_bench.report import figures, load_runs
from adadiff_bench.report.tables import group_notes, leaderboard
from conftest import REPO, TINY
from test_figures_fit import texts_outside_the_canvas
from test_report_tables import fake_run, skyline


def adadiff_on(backbone_state: dict, estimator_seed: int):
    """An AdaDiff network on the given backbone weights, its estimator drawn from `estimator_seed`."""
    net = build_adadiff(TINY, AdaDiffConfig())
    net.backbone.load_state_dict(backbone_state)
    torch.manual_seed(estimator_seed)
    with torch.no_grad():
        for p in net.estimator.parameters():
            p.normal_(0, 0.5)
    return net.eval()


def hash_through_method(tmp_path, net, name: str) -> str:
    """The hash the harness records: of the backbone the AdaDiff method runs after loading its checkpoint."""
    path = tmp_path / f"{name}.pt"
    save_adadiff(path, net, TINY)
    cls = get_method("adadiff")
    method = cls(net.backbone, make_params(cls, {"checkpoint": str(path)}, "test"))
    return backbone_hash(method_backbone(method))


def test_estimators_do_not_change_the_backbone_hash_but_a_backbone_weight_does(tmp_path):
    torch.manual_seed(0)
    base = build_adadiff(TINY, AdaDiffConfig()).backbone
    state = {k: v.clone() for k, v in base.state_dict().items()}
    first, second = adadiff_on(state, 1), adadiff_on(state, 2)
    assert not torch.equal(next(first.estimator.parameters()), next(second.estimator.parameters()))
    frozen = hash_through_method(tmp_path, first, "first")
    assert frozen == hash_through_method(tmp_path, second, "second") == backbone_hash(base)

    changed = {k: v.clone() for k, v in state.items()}
    name = sorted(changed)[len(changed) // 2]
    changed[name].view(-1)[0] += 1e-3  # one weight of one tensor
    assert hash_through_method(tmp_path, adadiff_on(changed, 1), "tuned") != frozen
    assert weights_hash(changed) != weights_hash(state)


def test_a_zero_of_either_sign_hashes_alike_and_the_shipped_frozen_adadiff_shares_the_base_models_group():
    """The shipped frozen AdaDiff's backbone equals the base model's weights but for the sign of one zero (its
    EMA over a frozen weight flipped it); the fine-tuned network is a backbone of its own."""
    state = {"w": torch.tensor([0.0, 1.5, -2.0])}
    assert weights_hash(state) == weights_hash({"w": torch.tensor([-0.0, 1.5, -2.0])})
    assert weights_hash(state) != weights_hash({"w": torch.tensor([0.0, 1.5, 2.0])})
    base = backbone_hash(load_model(REPO / "checkpoints" / "uvit_digits.pt"))
    frozen, tuned = (backbone_hash(load_adadiff(REPO / "checkpoints" / f"adadiff_digits_{kind}.pt").backbone)
                     for kind in ("frozen", "finetuned"))
    assert frozen == base != tuned


# ---- the leaderboard: groups, dFID, Pareto marks ---------------------------------------------------

def grouped_rows(rng, groups: dict[str, int]) -> list[dict]:
    """Random settings on several backbones, each group with one `full` row."""
    rows = []
    for backbone, count in groups.items():
        rows.append({"method": "full", "backbone_hash": backbone, "gflops_per_image": 10.0,
                     "fid_digits_cnn": float(rng.uniform(5, 10))})
        rows += [{"method": "m", "params": json.dumps({"k": i}), "entry": 1, "swept": '["k"]',
                  "backbone_hash": backbone, "gflops_per_image": float(rng.integers(1, 12)),
                  "fid_digits_cnn": float(rng.integers(4, 30))}
                 for i in range(count)]  # the same settings in every group: rows stay apart by backbone
    return rows


def test_pareto_marks_never_cross_groups_and_dfid_is_against_the_groups_full(tmp_path):
    rng = np.random.default_rng(3)
    groups = {"a" * 64: 12, "b" * 64: 9, "c" * 64: 5}
    frame = pd.read_csv(fake_run(tmp_path / "run", "r", grouped_rows(rng, groups)) / "results.csv")
    board = leaderboard(frame.assign(run="r"))
    assert len(board) == len(frame)
    for backbone in groups:
        group = board[board["backbone_hash"] == backbone]
        fid, cost = group["fid_digits_cnn"].to_numpy(), group["gflops_per_image"].to_numpy()
        duplicates = {i for i in range(len(group)) for j in range(i)
                      if fid[i] == fid[j] and cost[i] == cost[j]}  # a tie on both axes: the sweep keeps one
        assert set(np.flatnonzero(group["pareto"].to_numpy())) - duplicates == skyline(fid, cost)
        full_fid = frame.loc[(frame["backbone_hash"] == backbone) & (frame["method"] == "full"), "fid_digits_cnn"]
        assert np.allclose(group["dfid"], fid - full_fid.item())
    assert board["backbone"].str.contains("aaaaaaaa").sum() == groups["a" * 64] + 1


def test_rows_of_one_group_stay_together_and_a_group_without_full_is_named(tmp_path):
    rows = [{"method": "full", "params": '{"checkpoint": "ckpt/tuned.pt"}', "backbone_hash": "a" * 64,
             "gflops_per_image": 4.0, "fid_digits_cnn": 6.0},
            {"method": "m", "params": '{"k": 1}', "backbone_hash": "b" * 64, "gflops_per_image": 2.0,
             "fid_digits_cnn": 5.0},
            {"method": "m", "params": '{"k": 2}', "backbone_hash": "a" * 64, "gflops_per_image": 1.0,
             "fid_digits_cnn": 9.0}]
    frame = pd.read_csv(fake_run(tmp_path / "run", "r", rows) / "results.csv").assign(run="r")
    board = leaderboard(frame)
    assert list(board["backbone_hash"]) == ["a" * 64, "a" * 64, "b" * 64]  # grouped, best first inside a group
    assert board["pareto"].tolist() == [True, True, True]  # b's row beats a's on both axes, but in another group
    assert np.isnan(board["dfid"].iloc[2])
    assert board["backbone"].tolist() == ["tuned aaaaaaaa"] * 2 + ["bbbbbbbb"]  # named by its full row's checkpoint
    notes = group_notes(board)
    assert sum("no `full` row" in line for line in notes) == 1 and any("bbbbbbbb" in line for line in notes)


def test_a_checkpoint_named_for_its_role_is_labelled_with_its_folder(tmp_path):
    """An on-demand training's export is `<setting>-<hash>/weights.pt`: "weights" alone names nothing."""
    rows = [{"method": "full", "params": '{"checkpoint": "cache/fine-tuned-efad/weights.pt"}', "backbone_hash": "c" * 64,
             "gflops_per_image": 4.0, "fid_digits_cnn": 6.0}]
    frame = pd.read_csv(fake_run(tmp_path / "run", "r", rows) / "results.csv").assign(run="r")
    assert leaderboard(frame)["backbone"].tolist() == ["fine-tuned-efad/weights cccccccc"]


def test_results_without_a_backbone_column_are_one_unknown_group_against_the_runs_reference(tmp_path):
    """Old results: one group; its `full` is the one at the run's reference solver and steps (ddim 10 here),
    without knobs (the run's base model), whatever order the rows come in."""
    rows = [{"method": "full", "num_steps": 5, "gflops_per_image": 2.0, "fid_digits_cnn": 12.0},
            {"method": "full", "params": '{"checkpoint": "tuned.pt"}', "gflops_per_image": 4.0, "fid_digits_cnn": 5.0},
            {"method": "full", "gflops_per_image": 4.0, "fid_digits_cnn": 6.0},
            {"method": "m", "params": '{"k": 1}', "gflops_per_image": 2.0, "fid_digits_cnn": 7.5}]
    view = load_runs([fake_run(tmp_path / "run", "r", rows)])
    board = leaderboard(view.frame)
    assert board["backbone"].unique().tolist() == ["unknown backbone"]
    assert dict(zip(board["fid_digits_cnn"], board["dfid"])) == {5.0: -1.0, 6.0: 0.0, 7.5: 1.5, 12.0: 6.0}


def test_the_figures_front_is_the_boards_pareto_set_per_backbone_and_each_backbone_has_a_panel(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    rows = grouped_rows(rng, {"a" * 64: 6, "b" * 64: 6})
    view = load_runs([fake_run(tmp_path / "run", "r", rows)])
    board = leaderboard(view.frame)
    front = figures.pareto_front(view.frame, "fid_digits_cnn", "gflops_per_image")
    for backbone in ("a" * 64, "b" * 64):
        on_board = board[(board["backbone_hash"] == backbone) & board["pareto"]]
        on_front = front[front["group"] == backbone]
        assert sorted(on_front["gflops_per_image"]) == sorted(on_board["gflops_per_image"])
        assert sorted(on_front["fid_digits_cnn"]) == sorted(on_board["fid_digits_cnn"])

    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, out, stem: drawn.append(fig) or [out / f"{stem}.png"])
    assert figures.fid_vs_cost(view, tmp_path) == [tmp_path / "fid_vs_gflops.png"]
    assert not texts_outside_the_canvas(drawn[0])
    panels = [ax for ax in drawn[0].axes if ax.get_title()]
    assert [ax.get_title().split(":")[0] for ax in panels] == ["backbone aaaaaaaa", "backbone bbbbbbbb"]
    for ax, backbone in zip(panels, ("a" * 64, "b" * 64)):  # each panel's curves hold only its backbone's points
        plotted = {round(y, 6) for line in ax.get_lines() if line.get_label() != "Pareto front"
                   for y in line.get_ydata()}
        assert plotted <= {round(f, 6) for f in view.frame.loc[view.frame["backbone_hash"] == backbone,
                                                                "fid_digits_cnn"]}
