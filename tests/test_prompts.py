"""Text conditioning from a config (`[sampling] prompts`): precomputed CLIP token features in an .npz, sample i
takes prompt i mod N, guidance's unconditional pass takes the empty prompt's tokens; the MS-COCO preset end to
end at real widths (depth cut to 2); a missing or bad prompt file is one line, exit 2, nothing written."""
from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from adadiff_bench.checkpoints import build_model, save_checkpoint, sha256_file
from adadiff_bench.cli import main
from adadiff_bench.config import UViTT2IConfig
from adadiff_bench.diffusion import sample
from adadiff_bench.errors import UserError
from adadiff_bench.harness import Cell, generate
from adadiff_bench.models.presets import PRESETS
from adadiff_bench.prompts import PromptSet, attach_prompts, load_prompts, pack_feature_folder
from conftest import write_run_config
from test_presets import NARROW_SD, cut_depth, narrow_autoencoder_release, random_release, shallow_presets  # noqa: F401

# a small text-to-image U-ViT: 8x8 grey images, 4 context tokens of width 8
TINY_T2I = UViTT2IConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, clip_dim=8,
                         num_clip_token=4)


def write_prompts(path, num_prompts: int, tokens: int, width: int, empty: bool = True, seed: int = 0):
    """A prompt file of random features (float32), with or without the empty prompt's tokens."""
    rng = np.random.default_rng(seed)
    arrays = {"contexts": rng.standard_normal((num_prompts, tokens, width)).astype(np.float32)}
    if empty:
        arrays["empty_context"] = rng.standard_normal((tokens, width)).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def tiny_t2i():
    torch.manual_seed(0)
    return build_model(TINY_T2I).eval()


def test_sample_i_takes_prompt_i_mod_n():
    contexts = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)
    prompts = PromptSet(contexts, None)
    rows = [0, 1, 2, 3, 4, 7]
    expected = torch.stack([contexts[row % 3] for row in rows])
    assert torch.equal(prompts.for_rows(rows), expected)


def test_generate_feeds_each_sample_its_prompt_whatever_the_batch(tiny_t2i, tmp_path):
    arrays = write_prompts(tmp_path / "prompts.npz", 3, 4, 8)
    attach_prompts(tiny_t2i, str(tmp_path / "prompts.npz"), False, "test")
    cell = Cell("full", (), "ddim", 3, 0)
    images, _ = generate(cell, tiny_t2i, 5, 2)
    # the reference: the network itself, called with the prompt of each sample written out by hand
    contexts = torch.from_numpy(arrays["contexts"][[0, 1, 2, 0, 1]])
    expected = sample(lambda x, t, y, ctx: tiny_t2i(x, t, y), "ddim", 3, (1, 8, 8), range(5), 0, condition=contexts)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    again, _ = generate(cell, tiny_t2i, 5, 5)  # one batch: the same images
    torch.testing.assert_close(again, images, rtol=1e-5, atol=1e-5)
    tiny_t2i.prompts = PromptSet(tiny_t2i.prompts.contexts.flip(0), None)
    assert not torch.allclose(generate(cell, tiny_t2i, 5, 5)[0], images, atol=1e-3)  # the prompts matter


def test_guidance_on_text_equals_two_explicit_passes_with_the_empty_prompt(tiny_t2i, tmp_path):
    arrays = write_prompts(tmp_path / "prompts.npz", 2, 4, 8)
    attach_prompts(tiny_t2i, str(tmp_path / "prompts.npz"), True, "test")
    w = 2.0  # U-ViT's MS-COCO scale s = 1.0
    images, log = generate(Cell("full", (), "ddim", 3, 0, guidance=w), tiny_t2i, 3, 3)
    empty = torch.from_numpy(arrays["empty_context"])

    def uvit_cfg(x, t, context, ctx):  # U-ViT's eval_t2i_discrete: eps_c + s (eps_c - eps_u), s = w - 1
        eps_c = tiny_t2i(x, t, context)
        eps_u = tiny_t2i(x, t, empty.expand(len(x), *empty.shape))
        return eps_c + (w - 1) * (eps_c - eps_u)

    contexts = torch.from_numpy(arrays["contexts"][[0, 1, 0]])
    expected = sample(uvit_cfg, "ddim", 3, (1, 8, 8), range(3), 0, condition=contexts)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    assert log.unconditional is not None  # both passes logged
    unguided = sample(lambda x, t, y, ctx: tiny_t2i(x, t, y), "ddim", 3, (1, 8, 8), range(3), 0, condition=contexts)
    assert not torch.allclose(images, unguided, atol=1e-3)  # guidance changed something


def test_text_to_image_preset_end_to_end_through_the_cli(shallow_presets, tmp_path, monkeypatch):  # noqa: F811
    name = "mscoco256_uvit_s2_t2i"
    preset = PRESETS[name]
    monkeypatch.setitem(PRESETS, name, dataclasses.replace(
        preset, latent=dataclasses.replace(preset.latent, ddconfig=NARROW_SD)))
    release, autoencoder, prompts = tmp_path / "nnet_ema.pth", tmp_path / "autoencoder_kl.pth", tmp_path / "p.npz"
    torch.save({k: v.half() for k, v in random_release(cut_depth(name), adadiff=True).items()},  # (half: a smaller
               release)                                                                           # file)
    narrow_autoencoder_release(autoencoder)
    write_prompts(prompts, 3, 77, 768)
    np.savez(tmp_path / "data.npz", np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))
    config = tmp_path / "run.toml"
    config.write_text(
        f'name = "coco"\nresults_dir = "{tmp_path / "results"}"\n'
        f'[model]\npreset = "{name}"\ncheckpoint = "{release}"\nautoencoder = "{autoencoder}"\n'
        f'[data]\nname = "npz"\npath = "{tmp_path / "data.npz"}"\n'
        '[sampling]\nschedule = "scaled-linear"\nsolver = "dpm-solver++-fast"\nnum_steps = 2\nnum_samples = 2\n'
        f'batch_size = 2\nguidance = 2.0\nprompts = "{prompts}"\n'
        '[metrics]\ninception = "off"\n[timing]\nenabled = false\n[[methods]]\nname = "full"\n'
        # the paper config's AdaDiff entry: the official rule on the release's estimators, under guidance
        f'[[methods]]\nname = "adadiff"\ncheckpoint = "{release}"\nthreshold = 0.5\n'
        'threshold_kind = "official-certainty"\nrule = "per-sample"\npatience = true\n')
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "results" / "coco"
    frame = pd.read_csv(run / "results.csv")
    assert list(frame["method"]) == ["full", "adadiff"] and frame["valid"].all()
    assert frame["macs_per_image"].iloc[1] <= frame["macs_per_image"].iloc[0]
    row = frame.iloc[0]
    assert row["guidance"] == 2.0 and row["schedule"] == "scaled-linear"
    with np.load(run / "cells" / row["cell_id"] / "samples.npz") as archive:
        assert archive["arr_0"].shape == (2, 256, 256, 3)
    info = json.loads((run / "run.json").read_text())
    assert info["prompts"] == {"path": str(prompts), "sha256": sha256_file(prompts)}


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------------

@pytest.fixture
def t2i_checkpoint(tmp_path, tiny_t2i):
    path = tmp_path / "t2i.pt"
    save_checkpoint(path, tiny_t2i, TINY_T2I)
    return path


def prompt_run(tmp_path, checkpoint, prompts: str | None, guidance: float = 2.0):
    line = "" if prompts is None else f'\nprompts = "{prompts}"'
    return write_run_config(tmp_path, checkpoint, sampling=f'solver = "ddim"\nnum_steps = 2\nnum_samples = 2\n'
                                                           f'batch_size = 2\nguidance = {guidance}{line}',
                            timing="enabled = false")


def refused(tmp_path, config, capsys) -> str:
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert not (tmp_path / "results").exists()
    return error


def test_a_missing_prompt_file_through_the_cli(tmp_path, t2i_checkpoint, capsys):
    error = refused(tmp_path, prompt_run(tmp_path, t2i_checkpoint, str(tmp_path / "nowhere.npz")), capsys)
    assert "[sampling] prompts" in error and "nowhere.npz' not found" in error
    assert "python -m adadiff_bench.prompts" in error


def corrupt(path, kind: str) -> None:
    """A prompt file broken in one way."""
    if kind == "truncated":
        write_prompts(path, 2, 4, 8)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        path.write_text("not an archive")
    elif kind == "pickled":
        np.savez(path, contexts=np.array([{"x": 1}], dtype=object), empty_context=np.zeros((4, 8), np.float32))


@pytest.mark.parametrize("kind", ["truncated", "text", "pickled"])
def test_a_damaged_prompt_file_through_the_cli(tmp_path, t2i_checkpoint, capsys, kind, monkeypatch):
    path = tmp_path / "p.npz"
    corrupt(path, kind)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    error = refused(tmp_path, prompt_run(tmp_path, t2i_checkpoint, str(path)), capsys)
    assert f"[sampling] prompts '{path}'" in error
    assert ("pickled objects" if kind == "pickled" else "not a readable .npz") in error


@pytest.mark.parametrize("arrays, message", [
    ({"contexts": np.zeros((2, 5, 8), np.float32), "empty_context": np.zeros((4, 8), np.float32)},
     "contexts has shape 2x5x8, but this network reads Nx4x8"),
    ({"contexts": np.zeros((2, 4, 8), np.float32), "empty_context": np.zeros((4, 7), np.float32)},
     "empty_context has shape 4x7, but this network reads 4x8"),
    ({"contexts": np.zeros((4, 8), np.float32), "empty_context": np.zeros((4, 8), np.float32)},
     "contexts has shape 4x8, but this network reads Nx4x8"),
    ({"contexts": np.zeros((2, 4, 8), np.int64), "empty_context": np.zeros((4, 8), np.float32)},
     "contexts holds int64; expected float features"),
    ({"contexts": np.full((2, 4, 8), np.nan, np.float32), "empty_context": np.zeros((4, 8), np.float32)},
     "contexts is empty or holds NaN or Inf"),
    ({"contexts": np.zeros((2, 4, 8), np.float32)}, r"has no empty_context array \(guidance's unconditional pass\)"),
    ({"tokens": np.zeros((2, 4, 8), np.float32)}, r"has no contexts array .*found tokens"),
])
def test_a_prompt_file_of_the_wrong_shape_or_dtype_is_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "p.npz", **arrays)
    with pytest.raises(UserError, match=message) as error:
        load_prompts(tmp_path / "p.npz", 4, 8, need_empty=True)
    assert len(str(error.value).splitlines()) == 1


def test_a_bad_prompt_file_stops_the_run_before_anything_is_written(tmp_path, t2i_checkpoint, capsys):
    np.savez(tmp_path / "p.npz", contexts=np.zeros((2, 4, 9), np.float32), empty_context=np.zeros((4, 9), np.float32))
    error = refused(tmp_path, prompt_run(tmp_path, t2i_checkpoint, str(tmp_path / "p.npz")), capsys)
    assert "contexts has shape 2x4x9, but this network reads Nx4x8" in error


def test_a_text_to_image_network_without_prompts_through_the_cli(tmp_path, t2i_checkpoint, capsys):
    error = refused(tmp_path, prompt_run(tmp_path, t2i_checkpoint, None), capsys)
    assert "this is a text-to-image network; set prompts = " in error


def test_prompts_for_a_network_that_reads_none_through_the_cli(tmp_path, tiny_checkpoint, capsys):
    write_prompts(tmp_path / "p.npz", 2, 4, 8)
    error = refused(tmp_path, prompt_run(tmp_path, tiny_checkpoint, str(tmp_path / "p.npz"), guidance=1.0), capsys)
    assert "prompts are for a text-to-image network" in error and "remove prompts" in error


def test_without_guidance_the_empty_prompt_is_not_needed(tiny_t2i, tmp_path):
    write_prompts(tmp_path / "p.npz", 2, 4, 8, empty=False)
    attach_prompts(tiny_t2i, str(tmp_path / "p.npz"), False, "test")
    assert tiny_t2i.null_context is None and len(tiny_t2i.prompts.contexts) == 2


def test_float16_prompts_are_kept_half_and_fed_as_float32(tmp_path):
    contexts = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float16)
    np.savez(tmp_path / "p.npz", contexts=contexts)
    prompts = load_prompts(tmp_path / "p.npz", 4, 8, need_empty=False)
    assert prompts.contexts.dtype == torch.float16
    fed = prompts.for_rows([1])
    assert fed.dtype == torch.float32 and torch.equal(fed[0], torch.from_numpy(contexts[1].astype(np.float32)))


def test_packing_u_vits_feature_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "coco256_features" / "val"
    folder.mkdir(parents=True)
    captions = {}
    for image in (0, 1, 10, 2):  # numeric order, not the file system's (10 after 2)
        for caption in range(2):
            captions[image, caption] = rng.standard_normal((4, 8)).astype(np.float32)
            np.save(folder / f"{image}_{caption}.npy", captions[image, caption])
        np.save(folder / f"{image}.npy", rng.standard_normal((8, 4, 4)).astype(np.float32))  # image moments: ignored
    empty = rng.standard_normal((4, 8)).astype(np.float32)
    np.save(folder.parent / "empty_context.npy", empty)
    assert pack_feature_folder(folder, tmp_path / "prompts.npz") == 4
    prompts = load_prompts(tmp_path / "prompts.npz", 4, 8, need_empty=True)
    expected = np.stack([captions[i, 0] for i in (0, 1, 2, 10)])
    assert np.array_equal(prompts.contexts.numpy(), expected)
    assert np.array_equal(prompts.empty_context.numpy(), empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco256_features", "prompts.npz"]  # no partial file left
    with pytest.raises(UserError, match="name it OUT.npz"):
        pack_feature_folder(folder, tmp_path / "prompts.bin")
