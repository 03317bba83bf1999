"""Every config key and method knob, documented: the text of `adadiff-bench methods NAME` and docs/config.md.

Method knobs and training tables document themselves (`knobs.knob` beside each field); the run and
training configs' own tables (`config.py`) are described here, key by key. Regenerate the reference with

    python -m adadiff_bench.docs_config > docs/config.md

(tests/test_docs_config.py fails when the committed file is out of date).
"""
from __future__ import annotations

import re
import sys
import textwrap

from . import config as cfg
from .knobs import KnobInfo, KnobRow, describe, knob_rows
from .schedules import SCHEDULES

REGENERATE = "python -m adadiff_bench.docs_config > docs/config.md"
YEAR = re.compile(r"\b(19|20)\d\d\b")

_DATA = {
    "name": describe("the data set: the built-in 8x8 digits, a folder of PNG/JPEG images, or an .npz (uint8 NHWC "
                     "under arr_0, labels optional)", choices=("digits", "folder", "npz")),
    "path": describe("the image folder or .npz file", valid="needed by folder and npz"),
}

_RUN = {
    "name": describe("the run's name: its results folder is <results_dir>/<name>; rerunning the same name resumes",
                     valid=f"a plain folder name: no slashes, no leading '.', at most {cfg.MAX_NAME_BYTES} bytes"),
    "checkpoint": describe("the base model every method runs (a checkpoint of this suite; [model] preset replaces "
                           "it by a published network)", valid="a checkpoint file"),
    "seeds": describe("sampling seeds: every cell runs once per seed (sample i of a seed depends only on the seed "
                      "and i)", valid="a non-empty list of integers in [0, 2^63 - 1]"),
    "results_dir": describe("the folder that holds runs (and the training cache .adadiff_cache)"),
    "device": describe("where everything runs: auto picks CUDA when there is one", valid="auto | cpu | cuda | cuda:N"),
    "precision": describe("autocast of the network; the solver and metrics stay fp32", choices=cfg.PRECISIONS),
    "deterministic": describe("deterministic kernels (CUDA: cuBLAS workspace, no cuDNN autotuning, no TF32)"),
}

_MODEL = {
    "preset": describe("a published network by name (its architecture and schedule); \"\" = the run's `checkpoint` "
                       "carries its own config", valid="\"\" or a preset name of adadiff_bench.models.presets"),
    "checkpoint": describe("the release's weights file (U-ViT's or AdaDiff's nnet_ema.pth); replaces the run's "
                           "`checkpoint`", valid="needed with `preset`"),
    "autoencoder": describe("the SD autoencoder that decodes a latent preset's latents (U-ViT's autoencoder_kl.pth)",
                            valid="needed by latent presets only"),
}

_SAMPLING = {
    "solver": describe("the sampler (diffusers' schedulers; euler-maruyama and dpm-solver-fast on the continuous "
                       "VP SDE)", choices=cfg.SOLVERS),
    "num_steps": describe("sampling steps (network evaluations per image for one pass)", above=0),
    "num_samples": describe("images per cell (FID's n)", above=0),
    "batch_size": describe("images per batch (never changes an image)", above=0),
    "schedule": describe("the noise schedule and time-input convention the network was trained with",
                         choices=lambda: tuple(SCHEDULES),
                         valid="; ".join(f"{name} runs with {', '.join(s.solvers)}" for name, s in SCHEDULES.items())),
    "guidance": describe("classifier-free guidance weight w in eps_u + w (eps_c - eps_u); 1 = none (U-ViT's scale "
                         "s is w - 1)", at_least=1),
    "guidance_channels": describe("guide only the first this many channels; the rest take the conditional pass's "
                                  "eps (the DiT paper's `forward_with_cfg` guides 3 of 4 latent channels: 3); "
                                  "0 = every channel, as diffusers' DiTPipeline", at_least=0),
    "prompts": describe("a text-to-image network's prompts: CLIP token features (`contexts` N x 77 x 768, "
                        "`empty_context` 77 x 768 for guidance's unconditional pass); sample i takes prompt i mod N",
                        valid="\"\" or an .npz path (`python -m adadiff_bench.prompts` packs U-ViT's feature folder)"),
}

_METRICS = {
    "inception": describe("Inception metrics: \"auto\" when the weights are on disk, \"require\" (error if absent), "
                          "\"off\", \"download\" (fetch torch-fidelity's file into torch hub's cache when absent, "
                          "30 s socket timeout, checked with weights_only=True; refused under --offline)",
                          choices=("auto", "require", "off", "download")),
    "inception_weights": describe("torch-fidelity's Inception weights file (weights-inception-2015-12-05-6726825d.pth)",
                                  valid="a file path, or none: torch-fidelity's cache"),
    "fid_backend": describe("the FID engine: torch-fidelity, or clean-fid as the cross-check", choices=cfg.FID_BACKENDS),
    "cleanfid_model": describe("clean-fid's inception-2015-12-05.pt (clean-fid in the Inception space)",
                               valid="a file path, or none: where clean-fid looks"),
    "kid_subset_size": describe("KID subset size (clamped to n, with a warning)", above=0),
    "isc_splits": describe("Inception Score splits", above=0),
    "prc": describe("precision and recall (k-NN manifolds)"),
    "prc_neighborhood": describe("neighbours k of the precision/recall manifolds", above=0),
    "fid_bootstrap": describe("bootstrap resamples for FID's confidence interval (0 = none); cells keep them for the report's "
                              "paired comparisons (paired_samples.md)", at_least=0),
    "fid_ci": describe("confidence level of that interval", above=0, below=1),
    "reference_stats": describe("published FID statistics (.npz with mu and sigma in Inception pool3 space); FID "
                                "then needs no reference images", valid="\"\" or a file path"),
    "swd": describe("sliced Wasserstein distance over Laplacian-pyramid patches (no network; column swd_pixels): "
                    "\"auto\" only when no feature space reads the images, \"on\", \"off\"",
                    choices=("auto", "on", "off")),
    "swd_projections": describe("random unit directions per pyramid level of the SWD (the paper: 512, at four "
                                "times the cost)", above=0),
    "swd_seed": describe("seed of the SWD's directions and patch positions", valid="an integer in [0, 2^63 - 1]"),
    "extractor": describe("a feature space trained on this run's data by `adadiff-bench train-extractor`: FID, KID "
                          "(and IS when trained on labels) are computed in it too; refused when trained on other data",
                          valid="\"\" or the .pt file it wrote"),
}

_TIMING = {
    "enabled": describe("measure wall-clock time in a separate timed pass"),
    "num_samples": describe("images in each timed call; none = min(256, [sampling] num_samples), so a small run "
                            "times no more images than it samples; a number given is honoured", above=0),
    "repeats": describe("interleaved repeats of cell and reference (the median is reported)", at_least=3),
    "warmup_batches": describe("short warm-up runs (2 solver steps) of the cell and the reference", at_least=0),
    "threads": describe("torch threads while timing (fixed, so times compare)", at_least=1, at_most=cfg.MAX_THREADS),
}

_METHOD_ENTRY = {
    "name": describe("a registered method (`adadiff-bench methods`); every other key of the table is one of its "
                     "knobs (`adadiff-bench methods NAME`)", valid="a registered method name"),
    "solver": describe("this method's solver instead of [sampling] solver; a list sweeps",
                       valid="a solver name or a list of them"),
    "num_steps": describe("this method's step count instead of [sampling] num_steps; a list sweeps",
                          valid="an integer > 0 or a list of them"),
}

_UVIT = {
    "img_size": describe("image side in pixels (latents: latent side)", above=0, valid="a multiple of patch_size"),
    "patch_size": describe("patch side: tokens = (img_size / patch_size)^2", above=0),
    "in_chans": describe("image channels", above=0),
    "embed_dim": describe("token width", above=0, valid="a multiple of num_heads"),
    "depth": describe("transformer blocks besides the mid-block (in-blocks = out-blocks = depth / 2)", at_least=2,
                      valid="even"),
    "num_heads": describe("attention heads", above=0),
    "mlp_ratio": describe("MLP hidden width / embed_dim", above=0),
    "qkv_bias": describe("bias in the attention's qkv projection"),
    "qk_scale": describe("attention scale; none = head_dim^-0.5", above=0, valid="or none"),
    "mlp_time_embed": describe("an MLP on the timestep embedding"),
    "num_classes": describe("class labels (-1 = unconditional)"),
    "conv": describe("a 3x3 convolution after unpatchifying (the reference's final layer)"),
    "skip": describe("long skips between in- and out-blocks"),
}

_DIT = {
    "num_attention_heads": describe("attention heads", above=0),
    "attention_head_dim": describe("width of one head: the token width is heads x this", above=0),
    "in_channels": describe("image channels (latents: latent channels)", above=0),
    "out_channels": describe("output channels: none or in_channels = eps; 2 x in_channels = eps and a learned "
                             "variance (DiT-XL/2)", valid="none, in_channels or 2 x in_channels"),
    "num_layers": describe("transformer blocks (each an exit point)", above=0),
    "sample_size": describe("image side in pixels (latents: latent side); its positions are computed, so no "
                            "weight file bounds it", above=0, at_most=cfg.DIT_MAX_SAMPLE_SIZE,
                            valid="a multiple of patch_size"),
    "patch_size": describe("patch side: tokens = (sample_size / patch_size)^2", above=0),
    "num_embeds_ada_norm": describe("class labels; the embedding adds one null row for guidance", above=0),
    "activation_fn": describe("the MLP's activation", choices=cfg.DIT_ACTIVATIONS),
    "attention_bias": describe("bias in the attention's projections"),
    "dropout": describe("dropout in attention and MLP"),
    "norm_type": describe("the blocks' normalisation: adaLN-Zero only", choices=("ada_norm_zero",)),
    "norm_elementwise_affine": describe("learned affine parameters in the layer norms"),
    "norm_eps": describe("layer-norm epsilon", above=0),
    "norm_num_groups": describe("unused by a DiT (diffusers' config carries it)"),
    "upcast_attention": describe("attention in float32 under lower precision"),
}

_TRAIN = {
    "steps": describe("optimiser steps", above=0),
    "batch_size": describe("images per step", above=0),
    "lr": describe("AdamW's peak learning rate (after warm-up)", above=0),
    "weight_decay": describe("AdamW's weight decay", at_least=0),
    "beta1": describe("AdamW's beta1", at_least=0, below=1),
    "beta2": describe("AdamW's beta2", at_least=0, below=1),
    "warmup_steps": describe("linear learning-rate warm-up steps", at_least=0),
    "ema_decay": describe("decay of the exponential moving average of the weights (what is exported)",
                          at_least=0, below=1),
    "checkpoint_every": describe("steps between resumable checkpoints (out_dir/last.pt)", above=0),
    "seed": describe("seed of initialisation, batches and noise", at_least=0, at_most=cfg.MAX_SEED),
    "threads": describe("torch threads; none = torch's default", at_least=1, at_most=cfg.MAX_THREADS,
                        valid="or none"),
    "out_dir": describe("where checkpoints and the exported ema.pt go (a rerun resumes from its last.pt)"),
    "export": describe("also export the final EMA weights to this path (the file a run config names)",
                       valid="a file path, or none"),
    "export_half": describe("store `export` in half precision"),
    "device": describe("where training runs (as a run's `device`); noise is still drawn on the CPU",
                       valid="auto | cpu | cuda | cuda:N"),
    "precision": describe("autocast of the forward and loss; weights, optimiser and EMA stay fp32",
                          choices=cfg.PRECISIONS),
    "schedule": describe("the noise schedule and time input trained (a U-ViT from scratch; methods' tasks train on "
                         "linear); the checkpoint records it and a run sampling it with another is refused",
                         choices=lambda: tuple(SCHEDULES)),
    "ema_warmup": describe("warm the EMA decay up as min(ema_decay, (1 + t) / (10 + t)), so the starting weights' "
                           "share of the export (recorded as ema_start_share) is negligible"),
    "holdout": describe("fraction of the data held out (seeded split) for the held-out loss; 0 = none",
                        at_least=0, below=1),
    "eval_every": describe("steps between held-out loss evaluations of the EMA weights (with holdout > 0)",
                           above=0),
    "patience": describe("stop once this many held-out evaluations in a row have not improved; 0 = run every "
                         "step", at_least=0, valid="needs holdout > 0"),
}

# (TOML table, dataclass, its keys' documentation) of a run config and of a training config
RUN_TABLES = [("top level", cfg.RunConfig, _RUN), ("[data]", cfg.DataConfig, _DATA),
              ("[model]", cfg.ModelConfig, _MODEL), ("[sampling]", cfg.SamplingConfig, _SAMPLING),
              ("[metrics]", cfg.MetricsConfig, _METRICS), ("[timing]", cfg.TimingConfig, _TIMING),
              ("[[methods]]", cfg.MethodEntry, _METHOD_ENTRY)]
TRAIN_TABLES = [("[data]", cfg.DataConfig, _DATA), ("[model]", cfg.UViTConfig, _UVIT),
                ("[dit]: a DiT instead of [model]", cfg.DiTConfig, _DIT), ("[train]", cfg.TrainConfig, _TRAIN)]
# fields that are not keys of their table: set by the loader, or a table of their own ([[methods]])
NOT_KEYS = {cfg.TrainFile: ("task", "task_config"), cfg.MethodEntry: ("params",), cfg.RunConfig: ("methods",)}


# ---- one method, as `adadiff-bench methods NAME` prints it --------------------------------------

def builtin_methods() -> list[type]:
    """The registered methods that ship with the package (plugins vary by installation)."""
    from .methods import available_methods, get_method
    return [get_method(name) for name in available_methods()
            if get_method(name).__module__.startswith("adadiff_bench.")]


def docstring(cls) -> str:
    """The module's docstring when it is about this method (it starts with `name`), else the class's."""
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    if module_doc.startswith(f"`{cls.name}`"):
        return module_doc
    return cls.__doc__ or module_doc


def summary(cls) -> list[str]:
    """The docstring's first paragraph, and the paragraph citing the paper if that is another one."""
    paragraphs = [" ".join(p.split()) for p in textwrap.dedent(docstring(cls)).strip().split("\n\n")]
    lines = paragraphs[:1]
    citing = next((p for p in paragraphs[:3] if YEAR.search(p)), None)
    if citing is not None and citing not in lines:
        end = citing.find(". ", YEAR.search(citing).end())  # up to the end of the sentence naming the year
        lines.append(citing if end < 0 else citing[:end + 1])
    return lines


def method_text(cls, width: int = 100) -> str:
    """Name, family, summary, citation, then every knob and training key with type, default, range, meaning."""
    out = [f"{cls.name}  (family: {cls.family}{', a ceiling' if cls.ceiling else ''}"
           f"{', decides per batch' if cls.batch_dependent else ''})"]
    out += [textwrap.fill(line, width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
            for line in summary(cls)]
    rows = knob_rows(cls.Params)
    out.append("")
    out.append("knobs (keys of its [[methods]] table; a list sweeps):" if rows else "knobs: none")
    out += _rows_text(rows, width)
    if cls.TrainConfig is not None:
        out.append("")
        out.append(f"training table [{cls.name}] (adadiff-bench train --config FILE with a [{cls.name}] table):")
        out += _rows_text(knob_rows(cls.TrainConfig), width)
    return "\n".join(out)


def _rows_text(rows: list[KnobRow], width: int) -> list[str]:
    lines = []
    for row in rows:
        lines.append(f"  {row.name}: {row.type} = {row.default}" + (f"   valid: {row.valid}" if row.valid else ""))
        if row.meaning:
            lines.append(textwrap.fill(row.meaning, width, initial_indent="      ", subsequent_indent="      ",
                                       break_on_hyphens=False))
    return lines


# ---- docs/config.md ----------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def markdown_table(rows: list[KnobRow]) -> list[str]:
    lines = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{r.name}` | {_cell(r.type)} | `{r.default}` | {_cell(r.valid)} | {_cell(r.meaning)} |" for r in rows]
    return lines


def config_rows(cls: type, described: dict[str, KnobInfo]) -> list[KnobRow]:
    return [row for row in knob_rows(cls, described) if row.name not in NOT_KEYS.get(cls, ())]


def config_markdown() -> str:
    """docs/config.md: every key of run and training configs, and every method's knobs."""
    out = ["# Config reference", "",
           f"Generated from the dataclasses by `{REGENERATE}`; do not edit by hand.",
           "Types and defaults come from the code; the valid values are the ones the loader accepts (an unknown key, "
           "a wrong type or a value out of range is refused with one line naming the key and the fix).",
           "", "## Run configs (`adadiff-bench run --config FILE`)", ""]
    for title, cls, described in RUN_TABLES:
        out += [f"### {title}", ""] + markdown_table(config_rows(cls, described)) + [""]
    out += ["Every other key of a `[[methods]]` table is a knob of that method (below); a list sweeps.", "",
            "## Training configs (`adadiff-bench train --config FILE`)", "",
            "`[data]`, `[model]` and `[train]`, and at most one method's table: with it, that method's training runs "
            "(usually from a base checkpoint); without, a U-ViT is trained from scratch as `[model]` says.", ""]
    for title, cls, described in TRAIN_TABLES:
        out += [f"### {title}", ""] + markdown_table(config_rows(cls, described)) + [""]
    methods = builtin_methods()
    for method in (m for m in methods if m.TrainConfig is not None):
        out += [f"### [{method.name}]", ""] + markdown_table(knob_rows(method.TrainConfig)) + [""]
    out += ["## Method knobs (`adadiff-bench methods NAME`)", ""]
    for method in methods:
        out += [f"### {method.name}", "", f"Family: {method.family}. " + " ".join(summary(method)), ""]
        rows = knob_rows(method.Params)
        out += (markdown_table(rows) if rows else ["No knobs."]) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(config_markdown())


if __name__ == "__main__":
    main()
