"""`adadiff-bench flops`: parts add up to the dispatch count and a hand count; AdaDiff overheads match its log."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench.cli import main
from adadiff_bench.flops import count_macs, dispatch_flops, unit_costs
from adadiff_bench.flops_table import COLUMNS, NETWORK, OVERHEAD, WORST_CASE, cost_table, flops_table, load_for_flops
from adadiff_bench.harness import Cell, generate
from adadiff_bench.methods.adadiff import AdaDiffConfig, build_adadiff, save_adadiff
from conftest import REPO, TINY

UVIT = REPO / "checkpoints" / "uvit_digits.pt"
ADADIFF = REPO / "checkpoints" / "adadiff_digits_finetuned.pt"


@pytest.fixture(scope="module")
def adadiff_table():
    return flops_table(ADADIFF)


@pytest.fixture(scope="module")
def digits():
    """(model, table) of the shipped U-ViT, computed once."""
    return load_for_flops(UVIT)[0], flops_table(UVIT)


def loaded(which: str, tiny_checkpoint, digits):
    """(model, table) of the tiny random U-ViT or of the shipped digits U-ViT."""
    return (load_for_flops(tiny_checkpoint)[0], flops_table(tiny_checkpoint)) if which == "tiny" else digits


def network(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["kind"] == NETWORK]


def block_macs(block, num_tokens: int) -> int:
    """MACs of one U-ViT block counted by hand from its shapes."""
    d, hidden = block.attn.proj.in_features, block.mlp.fc1.out_features
    qkv, proj = num_tokens * d * 3 * d, num_tokens * d * d
    scores, weighted_values = num_tokens * num_tokens * d, num_tokens * num_tokens * d  # QK^T and AV, all heads
    mlp = 2 * num_tokens * d * hidden
    skip = num_tokens * 2 * d * d if block.skip_linear is not None else 0
    return qkv + scores + weighted_values + proj + mlp + skip


@pytest.mark.parametrize("which", ["tiny", "digits"])
def test_parts_add_up_to_the_dispatch_count(which, tiny_checkpoint, digits):
    model, frame = loaded(which, tiny_checkpoint, digits)
    assert (frame["kind"] == NETWORK).all()  # a plain U-ViT gets no overhead rows
    assert list(frame["part"]) == ["embed", *[f"in_blocks.{i}" for i in range(len(model.in_blocks))], "mid_block",
                                   *[f"out_blocks.{i}" for i in range(len(model.out_blocks))], "head"]
    total = frame["macs"].sum()
    assert total == pytest.approx(unit_costs(model).full) and frame["share"].sum() == pytest.approx(1.0)
    assert (frame["flops"] == 2 * frame["macs"]).all()
    x, t = torch.randn(1, model.in_chans, model.img_size, model.img_size), torch.tensor([500.0])
    with torch.no_grad():
        assert total == pytest.approx(dispatch_flops(lambda: model(x, t)) / 2, rel=0.01)
    # every backbone parameter (position table in `embed`) belongs to exactly one row
    assert frame["params"].sum() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("which", ["tiny", "digits"])
def test_block_macs_match_a_hand_count(which, tiny_checkpoint, digits):
    model, frame = loaded(which, tiny_checkpoint, digits)
    macs = frame.set_index("part")["macs"]
    num_tokens = model.pos_embed.shape[1]
    for name, block in [("in_blocks.0", model.in_blocks[0]), ("mid_block", model.mid_block),
                        ("out_blocks.0", model.out_blocks[0])]:
        assert macs[name] == block_macs(block, num_tokens), name
    assert macs["out_blocks.0"] - macs["in_blocks.0"] == num_tokens * 2 * model.embed_dim ** 2  # the skip fusion


def test_adadiff_rows_cover_the_whole_network(adadiff_table):
    model, net = load_for_flops(ADADIFF)
    assert list(adadiff_table["kind"].unique()) == [NETWORK, OVERHEAD, WORST_CASE]
    assert network(adadiff_table)["macs"].sum() == pytest.approx(unit_costs(model).full)
    # backbone parameters in the network rows, everything AdaDiff adds in the worst-case row
    assert network(adadiff_table)["params"].sum() == sum(p.numel() for p in model.parameters())
    worst = adadiff_table[adadiff_table["kind"] == WORST_CASE].iloc[0]
    assert network(adadiff_table)["params"].sum() + worst["params"] == sum(p.numel() for p in net.parameters())
    estimator, head = adadiff_table[adadiff_table["kind"] == OVERHEAD].itertuples()
    n = net.num_exits
    assert worst["macs"] == n * estimator.macs + (n - 1) * head.macs
    assert head.params == 0 and estimator.params * n == sum(p.numel() for p in net.estimator.parameters())


def test_estimator_overhead_is_what_adadiff_logs_and_what_runs(adadiff_table):
    model, net = load_for_flops(ADADIFF)
    estimator = adadiff_table[adadiff_table["kind"] == OVERHEAD].iloc[0]
    # threshold 0: nothing exits early, so the estimator runs after blocks 1..N-1 of every sample
    cell = Cell("adadiff", (("checkpoint", str(ADADIFF)), ("threshold", 0.0)), "ddim", 1, 0)
    _, log = generate(cell, model, num_samples=2, batch_size=2)
    assert (log.exit_point == net.num_exits).all()
    assert np.allclose(log.extra_macs, (net.num_exits - 1) * estimator["macs"])
    tokens, t = torch.randn(1, model.pos_embed.shape[1], model.embed_dim), torch.tensor([500.0])
    with torch.no_grad():
        assert dispatch_flops(lambda: net.estimator.scalar(1, tokens, t)) / 2 == estimator["macs"]


def test_per_exit_heads_and_other_estimators(tmp_path):
    torch.manual_seed(0)
    net = build_adadiff(TINY, AdaDiffConfig(estimator="attention", heads="per-exit")).eval()
    path = tmp_path / "adadiff_tiny.pt"
    save_adadiff(path, net, TINY)
    frame = flops_table(path)
    estimator, head = frame[frame["kind"] == OVERHEAD].itertuples()
    tokens = torch.randn(1, net.backbone.pos_embed.shape[1], TINY.embed_dim)
    # the final 3x3 conv runs as elementwise products, which the tracer does not see: the backbone states its MACs
    conv_macs = net.backbone.cost_parts().untraced_head_macs
    assert conv_macs == TINY.in_chans ** 2 * 9 * TINY.img_size ** 2
    assert head.macs == count_macs(net.exit_heads[0], (tokens,)).total() + conv_macs
    assert head.params == sum(p.numel() for p in net.exit_heads[0].parameters()) > 0
    assert estimator.macs == net.estimator.macs_per_sample(tokens.shape[1])
    covered = frame[frame["kind"] != OVERHEAD]["params"].sum()  # network rows + worst case (all AdaDiff adds)
    assert covered == sum(p.numel() for p in net.parameters())
    assert cost_table(net.backbone, net).equals(frame)


def test_cli_prints_the_table_and_writes_the_csv(tmp_path, capsys, adadiff_table):
    csv = tmp_path / "out" / "flops.csv"
    assert main(["flops", str(ADADIFF), "--steps", "25", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    for part in ["embed", "in_blocks.0", "mid_block", "out_blocks.5", "head", "estimator official (per call)"]:
        assert f"\n{part} " in out
    assert "25 evaluations" in out and "GFLOPs" in out
    loaded = pd.read_csv(csv)
    assert list(loaded.columns) == COLUMNS and len(loaded) == len(adadiff_table)
    assert np.array_equal(loaded["macs"], adadiff_table["macs"])


def test_cli_plain_uvit_has_no_overheads(capsys):
    assert main(["flops", str(UVIT)]) == 0
    out = capsys.readouterr().out
    assert "out_blocks.5" in out and "estimator" not in out and "evaluations" not in out


@pytest.mark.parametrize("argv, expected", [
    (["flops", "no/such.pt"], "not found"),
    (["flops", str(UVIT), "--steps", "0"], "--steps must be > 0"),
    (["flops", str(REPO / "checkpoints" / "l2c_digits.pt")],
     "is a Learning-to-Cache router (beta per step, block and branch) (adadiff-bench/l2c-router), "
     "not a U-ViT or an AdaDiff network"),
    (["flops", str(REPO / "README.md")], "not a PyTorch file"),
])
def test_cli_bad_input_is_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_help_states_the_conventions(capsys):
    with pytest.raises(SystemExit):
        main(["flops", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "FLOPs = 2 x MACs" in text and "not counted" in text


@pytest.mark.parametrize("which", ["tiny", "digits"])
def test_branch_costs_add_up_to_each_block_and_are_measured_once(which, tiny_checkpoint, digits):
    model, _ = loaded(which, tiny_checkpoint, digits)
    costs = unit_costs(model)
    assert unit_costs(model) is costs  # cached per network: a method built in a timed pass traces nothing
    num_tokens, d = model.num_tokens, model.embed_dim
    assert costs.branches.shape == (model.num_blocks, 3)  # attn, mlp, skip fusion
    assert np.array_equal(costs.branches.sum(1), costs.blocks)  # norms and additions are not counted
    for index, (block, kind) in enumerate(zip(model.block_list(), model.block_kinds)):
        attn, mlp, fusion = costs.branches[index]
        hidden = block.mlp.fc1.out_features
        assert attn == num_tokens * d * 3 * d + 2 * num_tokens * num_tokens * d + num_tokens * d * d
        assert mlp == 2 * num_tokens * d * hidden
        assert fusion == (num_tokens * 2 * d * d if kind == "out" else 0)
