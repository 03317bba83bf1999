"""The recipe settings that let a training converge and say so (adadiff_bench/recipe.py): the EMA warm-up and the
share of the starting weights it leaves, the held-out split, and the stopping rule on the held-out loss."""
from __future__ import annotations

import math

import pytest
import torch

from adadiff_bench.checkpoints import read_checkpoint
from adadiff_bench.config import TrainConfig
from adadiff_bench.errors import UserError
from adadiff_bench.recipe import TrainingRecord, ema_decay_at, ema_start_share, split_holdout
from adadiff_bench.training import load_train_config, train, update_ema
from conftest import tiny_training_toml

def tiny_config(tmp_path, steps=6, lr=3e-4, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "train.toml"
    settings = {k: str(v).lower() if isinstance(v, bool) else v for k, v in extra.items()}
    path.write_text(tiny_training_toml(tmp_path / "run", steps=steps, batch_size=16, lr=lr, checkpoint_every=1000,
                                       **settings))
    return load_train_config(path)


@pytest.mark.parametrize("warmup", [False, True])
def test_start_share_is_what_an_ema_of_a_step_function_keeps(warmup):
    # brute force: a weight that is 1 at the start and 0 after every optimiser step; the EMA keeps the share
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(0.0)
    for step in range(300):
        update_ema(ema, model, ema_decay_at(step, 0.999, warmup))
    assert ema.weight.item() == pytest.approx(ema_start_share(300, 0.999, warmup), rel=1e-5)


def test_the_warm_up_washes_out_the_start_and_the_plain_decay_does_not():
    assert ema_start_share(1500, 0.999, False) == pytest.approx(0.999 ** 1500)  # the 22%
    assert ema_start_share(1500, 0.999, False) > 0.2
    assert ema_start_share(1500, 0.999, True) < 1e-6
    assert [ema_decay_at(t, 0.999, True) for t in (0, 1, 10_000)] == [pytest.approx(0.1), pytest.approx(2 / 11), 0.999]


def test_holdout_split_is_disjoint_seeded_and_covers_every_image():
    train_a, held_a = split_holdout(100, 0.1, seed=3)
    train_b, held_b = split_holdout(100, 0.1, seed=3)
    assert torch.equal(train_a, train_b) and torch.equal(held_a, held_b)
    assert len(held_a) == 10 and sorted(train_a.tolist() + held_a.tolist()) == list(range(100))
    assert not torch.equal(split_holdout(100, 0.1, seed=4)[1], held_a)
    everything, nothing = split_holdout(5, 0.0, seed=0)
    assert everything.tolist() == list(range(5)) and nothing.numel() == 0
    assert len(split_holdout(3, 0.99, seed=0)[0]) == 1  # at least one image left to train on


def test_monitor_stops_after_patience_evaluations_without_improvement():
    monitor = TrainingRecord(patience=2)
    for step, loss in [(1, 1.0), (2, 0.8), (3, 0.7999), (4, 0.81)]:  # 0.7999: within the tolerance, no better
        assert not monitor.should_stop() or step > 4
        monitor.record(step, loss)
    assert monitor.best == (2, 0.8) and monitor.should_stop()
    monitor = TrainingRecord(patience=2)
    for step, loss in [(1, 1.0), (2, 0.9), (3, 0.95), (4, 0.5)]:
        monitor.record(step, loss)
    assert monitor.best == (4, 0.5) and not monitor.should_stop()
    assert not TrainingRecord(patience=0, history=[(1, 1.0), (2, 2.0), (3, 3.0)]).should_stop()


def test_training_with_default_recipe_is_unchanged_by_the_split(tmp_path):
    # holdout = 0 keeps every image in the training order: the same weights as training without the settings
    a = train(tiny_config(tmp_path / "a"), progress=False)
    b = train(tiny_config(tmp_path / "b", holdout=0.0, eval_every=2, ema_warmup=False), progress=False)
    state_a, state_b = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    held = read_checkpoint(train(tiny_config(tmp_path / "c", holdout=0.2), progress=False))["state_dict"]
    assert not all(torch.equal(state_a[k], held[k]) for k in state_a)  # (a split changes the batches)


def test_a_training_that_cannot_improve_stops_and_records_why(tmp_path, capsys):
    # lr 1e-12: the held-out loss stays put, so after `patience` evaluations past the first the run stops
    path = train(tiny_config(tmp_path, steps=50, lr=1e-12, holdout=0.2, eval_every=2, patience=2,
                             ema_warmup=True), progress=False)
    meta = read_checkpoint(path)["meta"]
    assert meta["steps"] == 6 and meta["samples_seen"] == 6 * 16
    assert [step for step, _ in meta["held_out_loss"]] == [2, 4, 6]
    assert meta["ema_start_share"] == pytest.approx(math.prod(ema_decay_at(t, 0.999, True) for t in range(6)))
    assert "stopping at step 6 of 50" in capsys.readouterr().out
    rerun = read_checkpoint(train(tiny_config(tmp_path, steps=50, lr=1e-12, holdout=0.2, eval_every=2, patience=2,
                                              ema_warmup=True), progress=False))["meta"]
    assert rerun["steps"] == 6 and rerun["held_out_loss"] == meta["held_out_loss"]  # a rerun trains no further


def test_held_out_history_survives_a_resume(tmp_path):
    config = tiny_config(tmp_path, steps=4, holdout=0.2, eval_every=2)
    train(config, progress=False)
    config.train.steps = 8  # (extending a run resumes it)
    meta = read_checkpoint(train(config, progress=False))["meta"]
    assert [step for step, _ in meta["held_out_loss"]] == [2, 4, 6, 8]


@pytest.mark.parametrize("settings, message", [
    (dict(holdout=1.0), "holdout must be in [0, 1)"),
    (dict(patience=3), "needs holdout > 0"),
    (dict(holdout=0.1, eval_every=0), "eval_every"),
])
def test_bad_recipe_settings_are_one_line(settings, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig(**settings).validate("[train]")


# ---- the training budget a row shows -------------------------------------------------------------------------

def test_a_rows_budget_names_each_checkpoint_of_its_chain(tmp_path):
    from adadiff_bench.training_budget import NOT_RECORDED, row_budget
    from adadiff_bench.checkpoints import build_model, save_checkpoint
    from adadiff_bench.testing import TINY_UVIT

    exported = train(tiny_config(tmp_path, steps=3), progress=False)
    foreign = tmp_path / "release.pt"  # a checkpoint with no training meta, as an official release
    save_checkpoint(foreign, build_model(TINY_UVIT), TINY_UVIT)
    row = row_budget([exported, exported, foreign])  # (a repeated file counts once)
    assert row["training_budget"].startswith("ema: 3 steps x 16 = 48 images")
    assert " min on cpu; " in row["training_budget"]  # the device the training recorded
    assert row["training_budget"].endswith(f"release: {NOT_RECORDED}")
    assert row["train_images_seen"] != row["train_images_seen"]  # NaN: one budget is unknown
    assert row_budget([exported])["train_images_seen"] == 3 * 16


def test_the_shipped_checkpoints_report_their_budgets():
    from adadiff_bench.training_budget import checkpoint_budget
    from conftest import REPO

    base = checkpoint_budget(REPO / "checkpoints" / "uvit_digits.pt")
    assert base["steps"] == 5000 and base["samples_seen"] == 5000 * 128 and base["seconds"] > 0
    finetuned = checkpoint_budget(REPO / "checkpoints" / "adadiff_digits_finetuned.pt")
    assert finetuned["steps"] == 12000 and finetuned["device"] == "cpu"
    router = checkpoint_budget(REPO / "checkpoints" / "l2c_digits.pt")
    assert router["steps"] == 10000 and router["samples_seen"] == 10000 * 64


def test_the_leaderboard_shows_each_settings_training_budget():
    import pandas as pd

    from adadiff_bench.report.tables import display_table, leaderboard
    from test_figures_fit import cell_row

    budgets = {"full": "uvit_digits: 5,000 steps x 128 = 640k images, 41.5 min on cpu",
               "static-exit": "uvit_digits: 5,000 steps x 128 = 640k images, 41.5 min on cpu; exits: not recorded"}
    rows = [cell_row("full", "reference", {}, 0, 2.0, 10.0), cell_row("static-exit", "early-exit", {"k": 2}, 1, 1.0, 20.0)]
    frame = pd.DataFrame([{**row, "training_budget": budgets[row["method"]]} for row in rows])
    shown = display_table(leaderboard(frame))
    column = next(c for c in shown.columns if c.startswith("training budget"))
    assert dict(zip(shown["method setting"].str.split(" ").str[0], shown[column])) == budgets


def test_no_ema_with_a_warm_up_leaves_nothing_of_the_start():
    """ema_decay = 0 (the EMA is the model) with ema_warmup on: share 0, not a math domain error."""
    assert ema_start_share(5, 0.0, True) == 0.0 == ema_start_share(5, 0.0, False)
    assert ema_start_share(0, 0.0, True) == 1.0


@pytest.mark.parametrize("table, body", [("adadiff", 'estimator = "official"'), ("ase", ""), ("berxit", ""),
                                         ("l2c", 'solver = "ddim"\nnum_steps = 4')])
def test_every_method_that_trains_records_its_budget_in_its_export(tmp_path, tiny_checkpoint, table, body):
    """The leaderboard's training-budget column reads the exported file: each method's export keeps it."""
    from adadiff_bench.cli import main
    from adadiff_bench.training_budget import checkpoint_budget
    config = tmp_path / "train.toml"
    config.write_text(f'[data]\nname = "digits"\n\n[{table}]\nbase_checkpoint = "{tiny_checkpoint}"\n{body}\n\n'
                      f'[train]\nsteps = 2\nbatch_size = 8\nwarmup_steps = 1\nthreads = 1\n'
                      f'out_dir = "{tmp_path / "run"}"\nexport = "{tmp_path / "out.pt"}"\n')
    assert main(["train", "--config", str(config), "--no-progress", "--no-end-report"]) == 0
    budget = checkpoint_budget(tmp_path / "out.pt")
    assert (budget["steps"], budget["samples_seen"], budget["device"]) == (2, 16, "cpu") and "seconds" in budget


def test_every_knob_that_names_a_shipped_trained_file_shows_its_budget():
    """A method's knob whose default is a shipped checkpoint (DuoDiff's `shallow`, L2C's router, ...) is among the
    files whose budget its rows show (`Method.trained_files`), unless the method trains that file itself."""
    import dataclasses
    from adadiff_bench.methods import available_methods, get_method
    from conftest import REPO
    missing = []
    for name in available_methods():
        cls = get_method(name)
        for field in dataclasses.fields(cls.Params):
            default = field.default
            if isinstance(default, str) and default.endswith(".pt") and (REPO / default).is_file():
                if field.name not in cls.trained_files:
                    missing.append(f"{name}.{field.name}")
    assert missing == []


# ---- where each session of a training in stages ran ---------------------------------------------------------

def _edit_state(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_each_session_of_a_training_in_stages_records_where_it_ran(tmp_path):
    from adadiff_bench.training_budget import checkpoint_budget
    config = tiny_config(tmp_path, steps=4)
    first = train(config, progress=False)
    assert [(s["device"], s["steps"]) for s in read_checkpoint(first)["meta"]["sessions"]] == [("cpu", [0, 4])]
    config.train.steps = 6
    assert checkpoint_budget(train(config, progress=False))["device"] == "cpu"  # two sessions, one device
    # as if the first stage had run on a GPU (benchmarks/gpu_train.sh), then the CPU went on
    _edit_state(tmp_path / "run" / "last.pt", lambda state: state["sessions"][0].update(device="NVIDIA H200"))
    config.train.steps = 10
    path = train(config, progress=False)
    sessions = read_checkpoint(path)["meta"]["sessions"]
    assert [(s["device"], s["steps"]) for s in sessions] == [("NVIDIA H200", [0, 4]), ("cpu", [4, 6]), ("cpu", [6, 10])]
    assert all(s["seconds"] >= 0 for s in sessions)
    assert checkpoint_budget(path)["device"] == "NVIDIA H200 (4 steps) and cpu (6 steps)"
    rerun = read_checkpoint(train(config, progress=False))["meta"]["sessions"]  # trains no step: adds no session
    assert [s["steps"] for s in rerun] == [s["steps"] for s in sessions]


def test_a_state_saved_before_sessions_were_recorded_says_so(tmp_path):
    from adadiff_bench.training_budget import NOT_RECORDED, checkpoint_budget
    config = tiny_config(tmp_path, steps=4)
    train(config, progress=False)
    _edit_state(tmp_path / "run" / "last.pt", lambda state: state.pop("sessions"))
    config.train.steps = 6
    path = train(config, progress=False)
    assert checkpoint_budget(path)["device"] == f"{NOT_RECORDED} (4 steps) and cpu (2 steps)"


@pytest.mark.parametrize("sessions", [None, "cpu", [1, 2], [{"device": "cpu"}], [{"device": "x", "steps": [0, "4"]}],
                                      [{"device": "x", "steps": [0, 1, 2]}], [{"device": "x", "steps": [True, 4]}]])
def test_a_malformed_session_record_is_ignored(sessions):
    from adadiff_bench.training_budget import steps_per_device
    assert steps_per_device(sessions) == {}
