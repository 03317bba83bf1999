"""The `device` and `precision` settings on a CPU-only machine: what is checked before anything is written,
what is recorded, and that reduced precision really autocasts the network while the solver stays fp32.

(CUDA itself is tested in tests/test_cuda.py, which skips without a GPU.)"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench.cli import main
from adadiff_bench.config import RunConfig, from_dict
from adadiff_bench.device import autocast, resolve_device
from adadiff_bench.diffusion import initial_noise, sample, sample_generators
from adadiff_bench.errors import UserError
from adadiff_bench.testing import tiny_backbone
from conftest import REPO

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def write_config(tmp_path, **top) -> str:
    lines = [f'name = "dev"', f'checkpoint = "{REPO / "checkpoints" / "uvit_digits.pt"}"',
             f'results_dir = "{tmp_path / "results"}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in top.items()]
    lines += ["[sampling]", 'solver = "ddim"', "num_steps = 2", "num_samples = 4", "batch_size = 4",
              "[metrics]", 'inception = "off"', "[timing]", "enabled = false",
              "[[methods]]", 'name = "full"', "[[methods]]", 'name = "static-exit"', "k = 7"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "cuda0"])
def test_a_malformed_device_is_refused_by_the_config(spec):
    with pytest.raises(UserError, match="device must be auto, cpu, cuda or cuda:N"):
        from_dict(RunConfig, {"device": spec}, "run.toml")


def test_an_unknown_precision_is_refused_by_the_config():
    with pytest.raises(UserError, match="precision must be one of fp32, bf16, fp16"):
        from_dict(RunConfig, {"precision": "fp8"}, "run.toml")


@needs_no_cuda
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_and_absent_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, spec):
    assert main(["run", "--config", write_config(tmp_path), "--device", spec, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err and 'set device = "cpu"' in err
    assert not (tmp_path / "results").exists()


def test_rows_and_run_json_record_device_and_precision(tmp_path):
    assert main(["run", "--config", write_config(tmp_path, precision="bf16"), "--device", "cpu", "--no-progress"]) == 0
    rows = pd.read_csv(tmp_path / "results" / "dev" / "results.csv")
    assert set(rows["device"]) == {"cpu"} and set(rows["precision"]) == {"bf16"}
    assert rows["device_name"].notna().all()
    machine = json.loads((tmp_path / "results" / "dev" / "run.json").read_text())["machine"]
    assert machine["device"] == "cpu" and machine["precision"] == "bf16"
    assert machine["determinism"]["deterministic"] is False


def test_bf16_autocasts_the_network_and_keeps_the_solver_in_fp32():
    model = tiny_backbone()
    seen, inner = [], []
    model.decoder_pred.register_forward_hook(lambda module, args, out: inner.append(out.dtype))

    def denoiser(x, t, y, ctx):
        seen.append(x.dtype)
        return model(x, t, y)

    shape = (1, 8, 8)
    exact = sample(lambda x, t, y, ctx: model(x, t, y), "ddim", 3, shape, range(2), 0)
    assert set(inner) == {torch.float32}
    inner.clear()
    reduced = sample(denoiser, "ddim", 3, shape, range(2), 0, precision="bf16")
    assert set(seen) == {torch.float32} and set(inner) == {torch.bfloat16}  # the solver's state fp32, the network bf16
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    difference = (reduced - exact).abs().max().item()
    assert 0 < difference < 0.2, difference  # rounded, not broken


def test_noise_is_drawn_on_the_cpu_whatever_the_device():
    """The first draw of a sample is the same tensor the CPU generator gives, whatever sample() is asked to use."""
    model = tiny_backbone()
    first = []

    def denoiser(x, t, y, ctx):
        if ctx.step == 0:
            first.append(x.clone())
        return model(x, t, y)

    sample(denoiser, "ddim", 2, (1, 8, 8), [3, 5], seed=7, device="cpu")
    expected = initial_noise(sample_generators(7, [3, 5]), (1, 8, 8))
    assert torch.equal(first[0], expected)


def test_autocast_is_a_no_op_in_fp32():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_a_checkpoint_object_moves_whole_to_the_device():
    """What a checkpoint format returns (modules, tensors, in dicts, named tuples and dataclasses) lands on the
    device `cached_checkpoint` is asked for, and the CPU original stays where it was."""
    import collections
    import dataclasses

    from adadiff_bench.checkpoints import moved_to

    @dataclasses.dataclass
    class Payload:
        weights: torch.Tensor
        layer: torch.nn.Module
        name: str = "x"

    Pair = collections.namedtuple("Pair", "a b")
    original = {"p": Payload(torch.ones(2), torch.nn.Linear(2, 2)), "t": Pair(torch.zeros(1), [torch.ones(1)])}
    moved = moved_to(original, torch.device("meta"))
    assert moved["p"].weights.is_meta and moved["p"].layer.weight.is_meta and moved["p"].name == "x"
    assert isinstance(moved["t"], Pair) and moved["t"].a.is_meta and moved["t"].b[0].is_meta
    assert not original["p"].layer.weight.is_meta and not original["p"].weights.is_meta
