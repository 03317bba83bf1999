"""`adadiff`: step-wise adaptive computation (Tang et al., ECCV 2024; arXiv 2309.17074).

At every sampling step and for every sample, an uncertainty estimator after each U-ViT block
decides whether to exit there; the exit's head gives that step's eps. Exits are real: the
exit-aware forward drops exiting samples from the batch.

Knobs: `threshold` (exit when uncertainty <= threshold; with `threshold_kind = "official-certainty"`
exit iff the mean certainty is strictly greater than it, as the official code does), `rule`
(`per-sample`, the default, or `per-batch`: the official code's rule, one decision from the mean over
the whole batch, which makes the method batch-dependent), `patience` (the official in-block rule:
exit only at the second in-block that passes, not necessarily consecutive).

Matched compute: `target_layer_ratio` (instead of `threshold`) finds, before sampling, the threshold
whose layer ratio on a calibration set (`calibration_samples` images drawn with `calibration_seed`, the
cell's solver and steps) is the target, by bisection on real sampling runs (see `calibration`); the
cell then samples at that threshold and its row records the target, the threshold found and the ratio
reached, with `target_reached = false` and the nearest achievable ratios where the estimator cannot
reach the target.

Ablations: with `train` (an AdaDiff training config) and overrides such as `estimator`, `loss` or
`backbone`, the checkpoint is trained on demand in the harness's prepare step, before any sampling,
the first time, and cached in the results folder's training cache (`<results_dir>/.adadiff_cache/`),
keyed by a hash of the training config.

Differs from the official code: it never runs a head or estimator it does not need (the official
forward evaluates the head after every block, even at inference), and its default rule is per sample.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...checkpoints import backbone_config_from, cached_checkpoint, load_body, open_checkpoint
from ...config import MAX_SEED, to_dict
from ...device import rows_on
from ...errors import UserError
from ...knobs import knob
from ...models.exit_forward import exit_aware_forward
from ...training import load_train_config, train
from ..prefix_exit import check_architecture
from ..registry import Method, PrepareContext, register_method
from .calibration import DEFAULT_CALIBRATION_SEED, ThresholdSearch, find_threshold
from .checkpoint import FORMAT, OFFICIAL_FORMAT, save_adadiff
from .quality import QUALITY_ARTIFACT, quality_pass
from .raw_threshold import nobody_passes_test
from .estimators import ESTIMATORS
from .training import AdaDiffTrainConfig, adadiff_task

OVERRIDES = ("estimator", "loss", "backbone", "heads", "timestep_weights", "target_space")
_QUALITY_PASSES: dict[tuple, dict[str, np.ndarray]] = {}  # estimator-quality passes of this process, by setting


@dataclass
class AdaDiffParams:
    checkpoint: str = knob("checkpoints/adadiff_digits_frozen.pt",
                           "the AdaDiff network (backbone, exit heads, estimators) to sample with",
                           valid="an existing AdaDiff checkpoint (ignored with `train`)")
    threshold: float = knob(0.1, "exit at the first block whose uncertainty is <= threshold (with threshold_kind "
                                 "\"official-certainty\": whose mean certainty 1 - u is > threshold)",
                            at_least=0, at_most=1)
    threshold_kind: str = knob("uncertainty", "what `threshold` is compared with: \"uncertainty\" (u <= threshold) "
                                              "or \"official-certainty\" (1 - u > threshold, strictly, as the "
                                              "official code)", choices=("uncertainty", "official-certainty"))
    rule: str = knob("per-sample", "\"per-sample\": each sample decides; \"per-batch\": one decision from the "
                                   "batch's mean uncertainty (the official rule; results depend on batch size)",
                     choices=("per-sample", "per-batch"))
    patience: bool = knob(False, "the official in-block rule: exit only at the second in-block that passes "
                                 "(not necessarily consecutive)")
    # matched compute: a target layer ratio instead of a threshold (found on calibration samples)
    target_layer_ratio: float | None = knob(None, "find the threshold whose layer ratio on calibration samples "
                                                  "is this target (instead of `threshold`; not both)",
                                            above=0, at_most=1)
    target_tolerance: float = knob(0.02, "a target counts as reached when the calibration ratio is within this "
                                         "of it (else the row says target_reached = false)", above=0, at_most=0.5)
    calibration_samples: int = knob(64, "how many calibration images each threshold tried samples", at_least=1)
    calibration_seed: int = knob(DEFAULT_CALIBRATION_SEED, "the run seed calibration images are drawn with "
                                                           "(a run whose `seeds` list it is refused)",
                                 at_least=0, at_most=MAX_SEED)
    # on-demand training (ablations): a training config, and overrides of its [adadiff] table
    train: str = knob("", "an AdaDiff training config: train the checkpoint on demand before sampling (cached "
                          "in <results_dir>/.adadiff_cache), with the overrides below",
                      valid="\"\" or an existing training config with an [adadiff] table")
    estimator: str = knob("", "override of [adadiff] estimator (the uncertainty estimator); \"\" = the config's",
                          choices=lambda: ("", *ESTIMATORS), needs=("train",))
    loss: str = knob("", "override of [adadiff] loss; \"\" = the config's", choices=("", "official", "paper"),
                     needs=("train",))
    backbone: str = knob("", "override of [adadiff] freeze_backbone: \"frozen\" or \"fine-tuned\"; \"\" = the "
                             "config's", choices=("", "frozen", "fine-tuned"), needs=("train",))
    heads: str = knob("", "override of [adadiff] heads; \"\" = the config's", choices=("", "shared", "per-exit"),
                      needs=("train",))
    timestep_weights: str = knob("", "override of [adadiff] timestep_weights; \"\" = the config's",
                                 choices=("", "shared", "bucketed"), needs=("train",))
    target_space: str = knob("", "override of [adadiff] target_space (the pseudo-label in \"eps\" or \"x0\" space); "
                                 "\"\" = the config's", choices=("", "eps", "x0"), needs=("train",))
    # per-pixel uncertainty maps saved with the cell: sampling-step indices ("0,12,24") and how many samples
    map_steps: str = knob("", "sampling-step indices whose per-pixel uncertainty maps are saved with the cell "
                              "(for the report's map figure); \"\" = none",
                          valid="comma-separated step indices >= 0, e.g. \"0,12,24\"")
    map_samples: int = knob(8, "how many samples (the first ones) get uncertainty maps", at_least=1)
    # estimator quality without thresholds: a separate analysis pass after sampling (see `quality`)
    quality_samples: int = knob(0, "after sampling, draw this many of the cell's samples again at full depth and "
                                   "record every exit's uncertainty and true eps error (the report's "
                                   "estimator_quality table and figure); 0 = no analysis", at_least=0)

    exclusive_keys = (("threshold", "target_layer_ratio"),)  # a target finds its own threshold

    def validate(self, where: str) -> None:
        if self.target_layer_ratio is not None and not 0.0 < self.target_layer_ratio <= 1.0:
            raise UserError(f"{where}: target_layer_ratio must be in (0, 1] (got {self.target_layer_ratio})")
        if not 0.0 < self.target_tolerance <= 0.5 or self.calibration_samples < 1:
            raise UserError(f"{where}: target_tolerance must be in (0, 0.5] and calibration_samples >= 1")
        if not 0 <= self.calibration_seed <= MAX_SEED:
            raise UserError(f"{where}: calibration_seed must be in [0, 2^63 - 1] (got {self.calibration_seed})")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"{where}: threshold must be in [0, 1] (got {self.threshold})")
        if self.threshold_kind not in ("uncertainty", "official-certainty"):
            raise UserError(f"{where}: threshold_kind must be 'uncertainty' or 'official-certainty' "
                            f"(got {self.threshold_kind!r})")
        if self.rule not in ("per-sample", "per-batch"):
            raise UserError(f"{where}: rule must be 'per-sample' or 'per-batch' (got {self.rule!r})")
        try:
            steps = parse_steps(self.map_steps)
        except ValueError:
            raise UserError(f"{where}: map_steps must list step indices like \"0,12,24\" (got {self.map_steps!r})") from None
        if self.quality_samples < 0:
            raise UserError(f"{where}: quality_samples must be >= 0 (got {self.quality_samples}); 0 turns it off")
        if any(step < 0 for step in steps) or self.map_samples < 1:
            raise UserError(f"{where}: map_steps must be >= 0 and map_samples >= 1")
        if self.backbone not in ("", "frozen", "fine-tuned"):
            raise UserError(f"{where}: backbone must be 'frozen' or 'fine-tuned' (got {self.backbone!r})")
        if any(getattr(self, knob) for knob in OVERRIDES) and not self.train:
            raise UserError(f"{where}: estimator/loss/backbone/heads overrides need `train` (a training config) "
                            "so the checkpoint can be trained on demand")
        if self.train:
            on_demand_config(self, where)  # validates the training config and the overrides now
        elif not Path(self.checkpoint).is_file():
            raise UserError(f"{where}: AdaDiff checkpoint {self.checkpoint!r} not found; train it with "
                            "`adadiff-bench train --config configs/adadiff_digits_frozen.toml` or fix the path")


@dataclass
class CalibratedParams(AdaDiffParams):
    """Knobs as calibrated for a `target_layer_ratio`: `threshold` is the one found, `search` how."""
    search: ThresholdSearch | None = None


def parse_steps(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def on_demand_config(params: AdaDiffParams, where: str = "adadiff"):
    """The training config `params.train` with the knob overrides applied (validated)."""
    config = load_train_config(params.train)
    if config.task != "adadiff":
        raise UserError(f"{where}: {params.train} has no [adadiff] table; point `train` at an AdaDiff training config")
    overrides = {"estimator": params.estimator, "loss": params.loss, "heads": params.heads,
                 "timestep_weights": params.timestep_weights, "target_space": params.target_space}
    for key, value in overrides.items():
        if value:
            setattr(config.task_config, key, value)
    if params.backbone:
        config.task_config.freeze_backbone = params.backbone == "frozen"
    config.task_config.validate(where)
    return config


ON_DEMAND_WEIGHTS = "weights.pt"  # a cached training's export: half precision, as the shipped checkpoints


def trained_on_demand(params: AdaDiffParams, cache_root: Path, progress: bool = True) -> str:
    """Train (once) the checkpoint an ablation cell asks for; cached by a hash of its training config. Cells
    sample with its half-precision export (under 10 MB, so a finished training can be committed)."""
    config = on_demand_config(params)
    config.train.export = None
    config.train.out_dir = ""
    key = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]
    cfg = config.task_config
    out_dir = cache_root / f"{cfg.estimator}-{cfg.loss}-{'frozen' if cfg.freeze_backbone else 'fine-tuned'}-{key}"
    config.train.out_dir, config.train.export = str(out_dir), str(out_dir / ON_DEMAND_WEIGHTS)
    config.train.export_half = True
    if (out_dir / ON_DEMAND_WEIGHTS).is_file():
        return config.train.export
    if (out_dir / "ema.pt").is_file():  # trained before exports were cached: the same export, from its EMA file
        half_precision_copy(out_dir / "ema.pt", out_dir / ON_DEMAND_WEIGHTS)
        return config.train.export
    print(f"training AdaDiff on demand ({config.train.steps} steps) into {out_dir}", flush=True)
    train(config, progress=progress)
    return config.train.export


def half_precision_copy(source: Path, target: Path) -> None:
    """An AdaDiff checkpoint rewritten in half precision with the same configs and meta (what `export` writes)."""
    fmt, payload = open_checkpoint(source)  # (read once: the payload gives the configs and meta, and the network)
    if fmt.name != FORMAT:
        raise UserError(f"{str(source)!r} is {fmt.what} ({fmt.name}), not an AdaDiff network; delete its cache folder "
                        "so that the setting trains again")
    net = load_body(fmt, payload, str(source))
    save_adadiff(target, net, backbone_config_from(payload, str(source)), payload.get("meta", {}), half=True)


@register_method
class AdaDiff(Method):
    name = "adadiff"
    family = "early-exit"
    Params = AdaDiffParams
    TrainConfig = AdaDiffTrainConfig
    reads = (FORMAT, OFFICIAL_FORMAT)
    writes = FORMAT

    @classmethod
    def check(cls, params, model, where):
        """The step log is sized and costed by the run's model: the checkpoint's backbone must match it.
        (A checkpoint trained on demand is checked once `prepare` has made it.)"""
        if not params.train:
            net = cached_checkpoint(params.checkpoint, cls.reads, where)
            check_architecture(net.backbone, model, where, f"the backbone of AdaDiff checkpoint {params.checkpoint!r}")

    @classmethod
    def prepare(cls, params, context: PrepareContext):
        """An ablation setting (`train` and overrides): train its checkpoint (once) and sample with it."""
        if not params.train:
            return params
        path = trained_on_demand(params, context.training_cache, context.progress)
        return dataclasses.replace(params, checkpoint=path, train="", **{knob: "" for knob in OVERRIDES})

    @classmethod
    def calibrate(cls, params, layer_ratio_of, evaluation_seeds, where: str = "adadiff"):
        """A `target_layer_ratio` setting: the threshold that reaches it on calibration samples.

        `layer_ratio_of(knobs, num_samples, seed)` samples that many images with `knobs` (the cell's solver,
        steps, schedule, guidance) and returns their layer ratio. Other settings come back unchanged."""
        if params.target_layer_ratio is None:
            return params
        if params.calibration_seed in evaluation_seeds:
            raise UserError(f"{where}: calibration_seed {params.calibration_seed} is also an evaluation seed; "
                            "pick a calibration_seed outside the run's `seeds`")

        def layer_ratio_at(threshold: float) -> float:
            knobs = dataclasses.replace(params, threshold=threshold, target_layer_ratio=None)
            return layer_ratio_of(knobs, params.calibration_samples, params.calibration_seed)

        search = find_threshold(layer_ratio_at, params.target_layer_ratio, params.target_tolerance,
                                exits_grow_with_threshold=params.threshold_kind == "uncertainty")
        print(f"{where}: target layer ratio {search.target}: threshold {search.threshold:.6g} reached "
              f"{search.layer_ratio:.3f} on {params.calibration_samples} calibration images "
              f"({len(search.evaluations)} runs){'' if search.reached else ' - TARGET NOT REACHED'}", flush=True)
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(AdaDiffParams)}
        return CalibratedParams(**{**fields, "threshold": search.threshold}, search=search)

    def row_fields(self) -> dict:
        """Extra columns of this cell's results row: the calibration of a `target_layer_ratio`."""
        search = getattr(self.params, "search", None)
        return search.row_fields() if search is not None else {}

    @classmethod
    def training_task(cls, config, alpha_bar):
        return adadiff_task(config, alpha_bar)

    def __init__(self, model, params=None):
        super().__init__(model, params)
        if self.params.train:
            raise UserError(f"adadiff: a setting with `train` = {self.params.train!r} must be prepared (trained) "
                            "first; run it through the harness (`adadiff-bench run`)")
        self.net = cached_checkpoint(self.params.checkpoint, self.reads, device=self.device)
        self.estimator_macs = self.net.estimator.macs_per_sample(self.net.backbone.num_tokens)
        self.batch_dependent = self.params.rule == "per-batch"
        self.map_steps = parse_steps(self.params.map_steps)
        self._maps: dict[int, np.ndarray] = {}
        self._inputs: dict[int, np.ndarray] = {}
        self._map_timesteps: dict[int, float] = {}
        self._quality: dict[str, np.ndarray] | None = None
        self._quick_tests: dict[tuple, Callable[[list[float]], bool] | None] = {}  # by (threshold, kind, rule)

    def exits(self, uncertainty: np.ndarray) -> np.ndarray:
        """Per active sample (host float32 uncertainties): does it pass the threshold at this exit point?

        On the host, in float32 as torch compares a float32 tensor with a Python number, so the decisions
        are those of the same comparisons on the device, without another op there."""
        p = self.params
        if p.rule == "per-batch":  # the batch mean as torch computes it, so batch-dependent runs reproduce
            uncertainty = np.full_like(uncertainty, torch.from_numpy(uncertainty).mean().item())
        threshold = np.float32(p.threshold)
        if p.threshold_kind == "official-certainty":
            return (np.float32(1.0) - uncertainty) > threshold
        return uncertainty <= threshold

    def nobody_passes(self) -> Callable[[list[float]], bool] | None:
        """A test of the estimator's raw values (`raw_on_host`) that is True only when `exits` would pass none
        of them, in a `max` of a list (see `raw_threshold`); None under the per-batch rule (the batch mean)."""
        p, estimator = self.params, self.net.estimator
        key = (p.threshold, p.threshold_kind, p.rule)
        if key not in self._quick_tests:
            self._quick_tests[key] = None if p.rule == "per-batch" else nobody_passes_test(
                lambda raw: bool(self.exits(estimator.uncertainty_of_raw([raw]))[0]))
        return self._quick_tests[key]

    def __call__(self, x, t, y, ctx):
        net = self.net
        kinds = net.backbone.block_kinds
        passes = np.zeros(len(x), dtype=np.int64) if self.params.patience else None  # host: in-blocks passed
        recorded = self._recorded_rows(x, ctx)
        nobody_passes = self.nobody_passes()

        def policy(exit_point, tokens, state, t_active, active):
            if recorded is not None:
                self._record_maps(exit_point, tokens, t_active, active, recorded, ctx)
            raw = net.estimator.raw_on_host(exit_point, tokens, t_active)
            if nobody_passes is not None and nobody_passes(raw):
                return None  # (nobody passes: no exit, and no in-block passed for the patience rule)
            passing = self.exits(net.estimator.uncertainty_of_raw(raw))
            if passes is not None and kinds[exit_point - 1] == "in":  # the official rule: the second passing in-block
                rows = active.numpy()
                passes[rows] += passing
                return passing & (passes[rows] >= 2)
            return passing

        return exit_aware_forward(net.backbone, x, t, y, policy, self.log, heads=net.sampling_heads(),
                                  policy_macs=self.estimator_macs)

    # ---- per-pixel uncertainty maps (only in the harness's sampling pass, never timed) ------------
    def _recorded_rows(self, x: torch.Tensor, ctx) -> np.ndarray | None:
        """Batch rows whose maps are recorded at this step (None when nothing is)."""
        step = ctx.step
        if not self.record_artifacts or step not in self.map_steps:
            return None
        self._map_timesteps[step] = float(ctx.timesteps[step])
        sample_ids = ctx.rows
        rows = np.flatnonzero(sample_ids < self.params.map_samples)
        if len(rows) == 0:
            return None
        if step not in self._maps:
            n, exits = self.params.map_samples, self.net.num_exits - 1
            self._maps[step] = np.full((n, exits, *x.shape[1:]), np.nan, dtype=np.float32)
            self._inputs[step] = np.full((n, *x.shape[1:]), np.nan, dtype=np.float32)
        self._inputs[step][sample_ids[rows]] = x[rows_on(rows, x.device)].float().cpu().numpy()
        return rows

    def _record_maps(self, exit_point, tokens, t_active, active, recorded_rows, ctx) -> None:
        """Store the uncertainty map at `exit_point` of every recorded sample still active."""
        keep = np.isin(active.numpy(), recorded_rows)
        if not keep.any():
            return
        index = rows_on(np.flatnonzero(keep), tokens.device)
        with torch.no_grad():
            u = self.net.estimator.uncertainty(exit_point, tokens[index], t_active[index])
        if u.dim() == 1:  # a per-sample estimator: broadcast its scalar over the image
            u = u.view(-1, 1, 1, 1).expand(-1, *self._inputs[ctx.step].shape[1:])
        sample_ids = ctx.rows[active.numpy()[keep]]
        self._maps[ctx.step][sample_ids, exit_point - 1] = u.float().cpu().numpy()

    def analyse(self, cell, batch_size: int, precision: str = "fp32") -> None:
        """The estimator-quality pass (`quality_samples` > 0): after sampling, never timed (see `quality`).
        It does not depend on the threshold, so cells that differ only in when to exit share one pass."""
        n = self.params.quality_samples
        if n > 0:
            key = (self.params.checkpoint, cell.solver, cell.num_steps, cell.schedule, cell.guidance, cell.seed, n,
                   precision)
            if key not in _QUALITY_PASSES:
                _QUALITY_PASSES[key] = quality_pass(self.net, cell, n, batch_size, precision)
            self._quality = _QUALITY_PASSES[key]

    def restore_artifacts(self, artifacts: dict[str, dict]) -> None:
        if QUALITY_ARTIFACT in artifacts:
            self._quality = {key: np.array(value) for key, value in artifacts[QUALITY_ARTIFACT].items()}
        maps = artifacts.get("uncertainty_maps")
        if maps is None:
            return
        for i, step in enumerate(np.asarray(maps["steps"]).tolist()):
            self._maps[step], self._inputs[step] = np.array(maps["maps"][i]), np.array(maps["inputs"][i])
            self._map_timesteps[step] = float(maps["timesteps"][i])

    def artifacts(self) -> dict[str, dict]:
        quality = {QUALITY_ARTIFACT: self._quality} if self._quality is not None else {}
        if not self._maps:
            return quality
        steps = sorted(self._maps)
        return {**quality, "uncertainty_maps": {
            "steps": np.array(steps), "timesteps": np.array([self._map_timesteps[s] for s in steps]),
            "maps": np.stack([self._maps[s] for s in steps]),       # step, sample, exit point, C, H, W
            "inputs": np.stack([self._inputs[s] for s in steps]),   # the noisy model input at that step
        }}
