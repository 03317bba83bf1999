"""`adadiff-bench`: train models, run benchmark configs, render reports.

Bad input ends with one line on stderr naming the problem and the fix, and exit code 2
(`--debug` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
import textwrap

from .errors import UserError
from .offline import no_network

EPILOG = textwrap.dedent("""\
    examples:
      adadiff-bench train --config configs/train_digits.toml     # (re)make the demo's digits U-ViT
      adadiff-bench run --config configs/demo.toml --overwrite    # sample, measure, write results/demo/
      adadiff-bench run --config configs/demo.toml --dry-run      # the cells, files they load, estimated time
      adadiff-bench init --data my_images/                        # a starter run config for your images
      adadiff-bench example-data my_images/                       # (no images at hand? colour PNGs to try it on)
      adadiff-bench report results/demo --open                    # tables, figures, index.html in reports/demo/
      adadiff-bench leaderboard results/demo results/digits_full  # one table from several runs (same data, n)
      adadiff-bench methods                                       # list registered methods
      adadiff-bench methods adadiff                               # one method's knobs: type, default, range, meaning
      adadiff-bench flops checkpoints/uvit_digits.pt --steps 25   # MACs, params and share per block

    On a GPU (device = "auto" picks CUDA when there is one; bf16 autocasts the network):
      adadiff-bench run --config configs/demo.toml --device cuda --precision bf16

    Several processes (one writer; the same images as one process; on GPUs each rank takes cuda:LOCAL_RANK):
      torchrun --nproc_per_node=2 -m adadiff_bench run --config configs/demo.toml

    A killed run resumes when the same command is rerun. Bad inputs and their messages: docs/errors.md.
    Every config key and method knob: docs/config.md (or `adadiff-bench methods NAME`).
    Results load in pandas: pd.read_csv("results/demo/results.csv").
    """)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adadiff-bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Benchmark diffusion samplers that spend less compute per image: FID, IS, KID, FLOPs, "
                    "wall-clock time and per-timestep exit histograms, in one harness.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    parser.add_argument("--offline", action="store_true",
                        help="open no network connection (refuses [metrics] inception = \"download\")")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a U-ViT or a method's networks (resumes from the last checkpoint "
                                              "of the same config)",
                                description="Train a U-ViT on a data set with AdamW, warm-up and EMA. The final EMA "
                                            "weights are written to train.out_dir/ema.pt (and train.export); beside the "
                                            "exported file, a sample grid and the eps loss per timestep (CSV, PNG).",
                                epilog=_train_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", required=True, help="training TOML, e.g. configs/train_digits.toml")
    train.add_argument("--device", help="override train.device: auto, cpu, cuda or cuda:N")
    train.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="override train.precision (autocast)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--restart", action="store_true",
                       help="start from step 0, ignoring train.out_dir/last.pt (needed after the base checkpoint changed)")
    train.add_argument("--no-end-report", action="store_true",
                       help="skip the sample grid and loss-by-timestep table written beside the checkpoint at the end")

    run = commands.add_parser("run", help="run a benchmark config: methods x knobs x seeds -> results/<name>/",
                              description="Expand the config's [[methods]] into cells (every list-valued knob is "
                                          "swept), sample each, and write results.csv, run.json, exits.npz and "
                                          "per-cell samples.npz under results/<name>/. A killed run resumes.")
    run.add_argument("--config", required=True, help="run TOML, e.g. configs/demo.toml")
    run.add_argument("--name", help="override the run name (the results folder)")
    run.add_argument("--num-samples", type=int, help="override sampling.num_samples (FID's n)")
    run.add_argument("--results-dir", help="override results_dir (default: results)")
    run.add_argument("--inception-weights", metavar="PATH",
                     help="torch-fidelity Inception weights file; makes Inception metrics required")
    run.add_argument("--device", help="override `device`: auto (CUDA when available), cpu, cuda or cuda:N")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                     help="override `precision`: autocast of the network (the solver and metrics stay fp32)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config, list the cells and what each loads or trains, estimate the time from "
                          "a timed batch; write nothing")

    report = commands.add_parser(
        "report", help="render tables, figures and index.html from finished runs",
        description="Read results/<run>/ only (one run, or several on the same data and n) and write the "
                    "leaderboard (Markdown, CSV, LaTeX booktabs; Pareto-optimal rows marked), matched-FID tables, "
                    "figures as PNG and PDF (FID vs GFLOPs and vs time with the Pareto front, per-family panels, "
                    "speed-up bars, exit heatmaps and distributions, layer ratio by timestep, AdaDiff's "
                    "uncertainty maps, the estimator ablation, samples) and one self-contained index.html.")
    report.add_argument("run_dirs", nargs="+", metavar="RESULTS", help="finished run folders, e.g. results/demo")
    report.add_argument("--out", help="output folder (default: reports/<run name>, names joined by '+')")
    report.add_argument("--sort-by", metavar="COLUMN",
                        help="leaderboard column to sort by, best first (default: the primary FID), "
                             "e.g. gflops_per_image, speedup, is_digits_cnn_mean")
    report.add_argument("--open", action="store_true", help="open index.html in a browser when done")

    board = commands.add_parser(
        "leaderboard", help="merge runs into one leaderboard (Markdown, CSV, LaTeX)",
        description="Merge the results of several finished runs into one leaderboard: one row per method "
                    "setting (the run name in front when several), Pareto-optimal rows marked. Runs must share "
                    "the reference data and the number of samples per cell (FID's n); mixing is refused.")
    board.add_argument("run_dirs", nargs="+", metavar="RESULTS", help="finished run folders")
    board.add_argument("--out", help="output folder (default: reports/leaderboard-<run names>)")
    board.add_argument("--sort-by", metavar="COLUMN", help="column to sort by, best first (default: the primary FID)")

    classifier = commands.add_parser("train-classifier",
                                     help="retrain the digits feature extractor shipped with the package",
                                     description="Train the digits-cnn feature extractor and print its held-out "
                                                 "accuracy. It writes only where told: --out PATH, or "
                                                 "--replace-packaged-asset to overwrite the installed package's copy "
                                                 "(which every digits-cnn metric reads).")
    target = classifier.add_mutually_exclusive_group()
    target.add_argument("--out", help="where to write the weights")
    target.add_argument("--replace-packaged-asset", action="store_true",
                        help="overwrite the packaged asset adadiff_bench/assets/digits_cnn.pt")

    learned = commands.add_parser(
        "train-extractor", help="train a feature space (FID, KID, PRC) on a run's reference data",
        description="Train a small CNN on the reference images of a run config (or of --data): a classifier when "
                    "the data has labels, else a self-supervised rotation task. It is saved as "
                    "extractors/learned-<data hash>.pt (or --out), never into the installed package; set [metrics] "
                    "extractor to that file and the run computes FID, KID and precision/recall in its space. The "
                    "last line states the held-out accuracy and loss.")
    source = learned.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a run config: its [data] is the reference data")
    source.add_argument("--data", metavar="PATH", help="a folder of PNG/JPEG images or an .npz (uint8 NHWC, arr_0)")
    learned.add_argument("--out", help="where to write the weights (default: extractors/learned-<data hash>.pt)")
    learned.add_argument("--steps", type=int, default=400, help="optimiser steps of 64 images (default: 400)")
    learned.add_argument("--seed", type=int, default=0, help="seed of the split, the batches and the weights")
    learned.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    init = commands.add_parser(
        "init", help="write a starter run config (and its base model's training config) for your images",
        description="Inspect a folder of PNG/JPEG images or an .npz (uint8 NHWC) and write a run config with every "
                    "method that needs only the base model, each with a small sweep checked against it, and a "
                    "comment naming the feature space its quality metrics will use. Without --checkpoint, a U-ViT "
                    "training config sized to the data is written beside it (<out stem>_train.toml). Existing "
                    "files are kept unless --force.")
    init.add_argument("--data", required=True, metavar="PATH", help="a folder of images or an .npz file")
    init.add_argument("--out", metavar="FILE", help="the run config to write (default: configs/<data name>.toml)")
    init.add_argument("--checkpoint", metavar="PATH", help="an existing base model (no training config is written)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")

    example = commands.add_parser(
        "example-data", help="write a folder of colour PNGs (the built-in digits, enlarged and tinted) to try init on",
        description="Write the built-in digits as RGB PNGs into a new folder: each 8x8 digit enlarged to --size "
                    "pixels and its ink painted in a seeded colour per image. No labels, no packaged feature space "
                    "reads them: they stand in for your own images in the walkthrough of README's \"Running it on "
                    "your data\" (init, train, train-extractor, run, report). Made offline, in about a second.")
    example.add_argument("out", metavar="OUT", help="a folder to create (must not exist)")
    example.add_argument("--size", type=int, default=16, help="image side in pixels, 8 to 256 (default: 16)")
    example.add_argument("--count", type=int, default=1797, help="how many digits, 1 to 1,797 (default: all)")
    example.add_argument("--seed", type=int, default=0, help="seed of the colours (default: 0)")

    methods = commands.add_parser("methods", help="list the registered methods, or one method's knobs",
                                  description="Without NAME, list the registered methods. With NAME, print that "
                                              "method's family, paper and every knob (the keys of its [[methods]] "
                                              "table) with type, default, valid values and meaning, and its "
                                              "training table if it trains. All keys: docs/config.md.")
    methods.add_argument("name", nargs="?", metavar="NAME", help="a method, e.g. adadiff")

    flops = commands.add_parser(
        "flops", help="per-block MACs, params and share of a checkpoint (+ AdaDiff estimator/head overheads)",
        description="Print the cost per image of one network evaluation, part by part in execution order "
                    "(embed, every block, head) with parameters and each part's share of the total; for an AdaDiff "
                    "checkpoint also one estimator call, one exit-head call and the worst case (both after every "
                    "block). Same counting as the results' macs_per_image: MACs of matrix multiplications, "
                    "convolutions and attention (QK^T and AV); FLOPs = 2 x MACs; normalisations, activations "
                    "and additions are not counted.")
    flops.add_argument("checkpoint", metavar="CHECKPOINT",
                       help="a U-ViT or AdaDiff checkpoint, e.g. checkpoints/adadiff_digits_finetuned.pt")
    flops.add_argument("--csv", metavar="PATH",
                       help="also write the table as CSV (columns part, kind, macs, flops, params, share)")
    flops.add_argument("--steps", type=int, metavar="N",
                       help="also print the cost per image of N evaluations (N sampling steps)")
    return parser


def _run(args) -> int:
    from pathlib import Path

    from .config import load_run_config
    from .harness import run

    overrides = {}
    if args.name:
        overrides["name"] = args.name
    if args.results_dir:
        overrides["results_dir"] = args.results_dir
    if args.device:
        overrides["device"] = args.device
    if args.precision:
        overrides["precision"] = args.precision
    config = load_run_config(args.config)
    if args.num_samples is not None:
        if args.num_samples <= 0:
            raise UserError(f"--num-samples must be > 0 (got {args.num_samples})")
        config.sampling.num_samples = args.num_samples
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate(args.config)
    if args.inception_weights:
        if not Path(args.inception_weights).is_file():
            raise UserError(f"--inception-weights {args.inception_weights!r} does not exist; pass the path of "
                            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
        config.metrics.inception_weights = args.inception_weights
        config.metrics.inception = "require"
    if args.offline and config.metrics.inception == "download":
        raise UserError(f'{args.config}: [metrics] inception = "download" under --offline; drop --offline, or put '
                        "the Inception weights on disk and set inception = \"auto\" (or pass --inception-weights PATH)")
    if args.dry_run:
        from .dry_run import dry_run
        dry_run(config, args.config)
        return 0
    run(config, where=args.config, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _default_out(run_dirs: list[str], prefix: str = ""):
    """reports/<run name> (names joined by '+' for several runs)."""
    from pathlib import Path

    from .results import RunReader

    names = [RunReader(d).name for d in run_dirs]
    return Path("reports") / (prefix + "+".join(names))


def _report(args) -> int:
    from pathlib import Path

    from .report import open_in_browser, write_report

    out = Path(args.out) if args.out else _default_out(args.run_dirs)
    for path in write_report(args.run_dirs, out, args.sort_by):
        if path.parent == out:
            print(path)
    if args.open and not open_in_browser(out / "index.html"):
        print(f"no browser available; open {out / 'index.html'} yourself", file=sys.stderr)
    return 0


def _leaderboard(args) -> int:
    from pathlib import Path

    from .report import write_leaderboard
    from .report.tables import to_markdown

    out = Path(args.out) if args.out else _default_out(args.run_dirs, "leaderboard-")
    board, paths = write_leaderboard(args.run_dirs, out, args.sort_by)
    print(to_markdown(board))
    for path in paths:
        print(path)
    return 0


def _train(args) -> int:
    from .training import load_train_config, train

    config = load_train_config(args.config)
    if args.device:
        config.train.device = args.device
    if args.precision:
        config.train.precision = args.precision
    config.train.validate(args.config)
    ema_path = train(config, progress=not args.no_progress, restart=args.restart, end_report=not args.no_end_report)
    print(f"EMA weights written to {ema_path}")
    if config.train.export:
        print(f"exported to {config.train.export}{' (half precision)' if config.train.export_half else ''}")
    if not args.no_end_report:
        from .training_report import report_paths
        grid, table, plot = report_paths(config.train.export or ema_path)
        print(f"samples: {grid}; eps loss by timestep: {table} (plot {plot})")
    print(run_config_line(config.task, config.train.export or str(ema_path)))
    return 0


def run_config_line(task: str | None, checkpoint: str) -> str:
    """The last line of a training: the run-config setting that uses the checkpoint it exported."""
    if task is None:
        return f'a run config uses it as: checkpoint = "{checkpoint}"'
    from .methods import get_method
    if "checkpoint" in {field.name for field in dataclasses.fields(get_method(task).Params)}:
        return f'a run config uses it as: [[methods]] name = "{task}", checkpoint = "{checkpoint}"'
    return f"a run config uses {checkpoint} through a knob of [[methods]] name = \"{task}\" (adadiff-bench methods {task})"


def _train_classifier(args) -> int:
    from .metrics.classifier import ASSET_PATH, main_train_classifier

    if not args.out and not args.replace_packaged_asset:
        raise UserError(f"train-classifier needs --out PATH (where to write the weights); to overwrite the packaged "
                        f"asset {ASSET_PATH} that every digits-cnn metric reads, pass --replace-packaged-asset")
    main_train_classifier(args.out or ASSET_PATH)
    return 0


def _train_extractor(args) -> int:
    from pathlib import Path

    from .config import DataConfig, check_seed, load_run_config
    from .data import load_dataset
    from .metrics.extractor_training import main_train_extractor

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
    check_seed(args.seed, "--seed")
    if args.config:
        data_config = load_run_config(args.config).data
    else:
        data_config = DataConfig("folder" if Path(args.data).is_dir() else "npz", args.data)
    main_train_extractor(load_dataset(data_config), args.out, args.steps, args.seed, args.overwrite)
    return 0


def _train_epilog() -> str:
    """`train --help`'s tables: a training config trains a U-ViT, or a method from its own table."""
    return textwrap.dedent("""\
        tables of a training config (TOML):
          [data], [model], [train]   the data set, the U-ViT's architecture, the optimiser and schedule
          one method's table         trains that method from a base checkpoint instead: [adadiff] (estimators),
                                     [ase] (fine-tuning for block dropping), [berxit] (exit regressor),
                                     [l2c] (caching router); plugins may add their own
        Each table's keys: `adadiff-bench methods NAME` (e.g. `methods adadiff`) and docs/config.md.
        """)


def _init(args) -> int:
    from .init_config import init

    for path in init(args.data, args.out, args.checkpoint, args.force):
        print(f"wrote {path}")
    return 0


def _example_data(args) -> int:
    from .example_data import write_example_data

    out = write_example_data(args.out, args.size, args.count, args.seed)
    print(f"wrote {args.count} {args.size}x{args.size} RGB PNGs to {out}")
    print(f"next: adadiff-bench init --data {out}")
    return 0


def _methods(args) -> int:
    from .methods import available_methods, get_method

    if args.name:
        from .docs_config import method_text
        print(method_text(get_method(args.name)))
        return 0
    for name in available_methods():
        cls = get_method(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:24s} {doc}")
    return 0


def _flops(args) -> int:
    from pathlib import Path

    from .flops_table import flops_table, format_table
    from .results import write_csv

    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps must be > 0 (got {args.steps})")
    frame = flops_table(args.checkpoint)
    print(format_table(frame, args.steps))
    if args.csv:
        try:
            write_csv(Path(args.csv), frame)
        except OSError as exc:
            raise UserError(f"cannot write --csv {args.csv!r} ({exc.strerror or exc}); choose another path") from None
        print(f"table written to {args.csv}")
    return 0


COMMANDS = {"run": _run, "report": _report, "train": _train, "train-classifier": _train_classifier,
            "train-extractor": _train_extractor,
            "init": _init, "example-data": _example_data, "methods": _methods, "flops": _flops, "leaderboard": _leaderboard}


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings (a clamped KID subset, say) as one line, like the errors."""
    return f"adadiff-bench: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = one_line_warning
    try:
        with no_network() if args.offline else contextlib.nullcontext():
            return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"adadiff-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adadiff-bench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
