"""Configs: dataclasses with one source of defaults, loaded from small TOML files and validated on entry.

Every table of a TOML file maps onto a dataclass below. An unknown key, a value of the wrong type or
out of range raises `UserError` naming the file, the key and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean
from .schedules import check_schedule_and_solver, check_schedule_name

SOLVERS = ("ddpm", "ddpm-learned", "ddim", "dpm-solver++", "euler", "dpm-solver++-fast", "euler-maruyama",
           "dpm-solver-fast")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MAX_THREADS = 1024   # far above any machine's cores; OpenMP crashes on absurd counts (100,000)
MAX_SEED = 2**63 - 1  # seeds are 64-bit (torch.manual_seed)
MAX_NAME_BYTES = 200  # a run name is a folder name (most file systems allow 255 bytes, with room for suffixes)


@dataclass
class UViTConfig:
    """Constructor arguments of the U-ViT backbone (names as in the reference implementation)."""
    img_size: int = 8
    patch_size: int = 2
    in_chans: int = 1
    embed_dim: int = 128
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    mlp_time_embed: bool = False
    num_classes: int = -1
    conv: bool = True
    skip: bool = True

    def validate(self, where: str) -> None:
        _positive(where, img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                  embed_dim=self.embed_dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
        if self.depth < 2 or self.depth % 2:
            raise UserError(f"{where}: depth must be an even number >= 2 (got {self.depth})")
        if self.img_size % self.patch_size:
            raise UserError(f"{where}: img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"{where}: embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}")
        if self.qk_scale is not None:
            _positive(where, qk_scale=self.qk_scale)


@dataclass
class UViTT2IConfig(UViTConfig):
    """The text-to-image U-ViT (reference `libs/uvit_t2i.py`): CLIP context tokens instead of a label."""
    clip_dim: int = 768
    num_clip_token: int = 77


DIT_ACTIVATIONS = ("gelu-approximate", "gelu")
DIT_MAX_SAMPLE_SIZE = 1024  # latents of 8,192 px images under SD's 8x autoencoder


@dataclass
class DiTConfig:
    """Constructor arguments of diffusers' DiTTransformer2DModel (its names, as in a `config.json`). The defaults
    of the last group are DiT's own; other values of them are refused, since the suite's DiT runs only those."""
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    in_channels: int = 1
    out_channels: int | None = None    # 2 x in_channels: learned sigma (DiT-XL/2)
    num_layers: int = 12
    sample_size: int = 8
    patch_size: int = 2
    num_embeds_ada_norm: int = 10      # class labels; the embedding adds a null row for guidance
    activation_fn: str = "gelu-approximate"
    attention_bias: bool = True
    dropout: float = 0.0
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    norm_num_groups: int = 32
    upcast_attention: bool = False

    @property
    def img_size(self) -> int:
        return self.sample_size

    @property
    def in_chans(self) -> int:
        return self.in_channels

    @property
    def num_classes(self) -> int:
        """Rows of the label embedding, as U-ViT counts them: the classes and the null row diffusers adds."""
        return self.num_embeds_ada_norm + 1

    @property
    def data_classes(self) -> int:
        """Labels a training set may hold (0 .. num_embeds_ada_norm - 1)."""
        return self.num_embeds_ada_norm

    def validate(self, where: str) -> None:
        _positive(where, num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
                  in_channels=self.in_channels, num_layers=self.num_layers, sample_size=self.sample_size,
                  patch_size=self.patch_size, num_embeds_ada_norm=self.num_embeds_ada_norm, norm_eps=self.norm_eps)
        if self.sample_size % self.patch_size or self.sample_size > DIT_MAX_SAMPLE_SIZE:
            raise UserError(f"{where}: sample_size {self.sample_size} must be a multiple of patch_size "
                            f"{self.patch_size} and at most {DIT_MAX_SAMPLE_SIZE} (its positions are computed, "
                            "not stored, so no weight file bounds it)")
        if self.out_channels not in (None, self.in_channels, 2 * self.in_channels):
            raise UserError(f"{where}: out_channels must be in_channels (eps) or 2 x in_channels (eps and a "
                            f"learned variance), got {self.out_channels}")
        if self.norm_type != "ada_norm_zero" or self.activation_fn not in DIT_ACTIVATIONS:
            raise UserError(f"{where}: a DiT here has norm_type 'ada_norm_zero' and activation_fn in "
                            f"{', '.join(DIT_ACTIVATIONS)} (got {self.norm_type!r}, {self.activation_fn!r})")


@dataclass
class ModelConfig:
    """`[model]`: a published network by preset name (`models.presets`) and its files; empty: the run's
    `checkpoint` carries its own config (this suite's format)."""
    preset: str = ""
    checkpoint: str = ""      # the release's weights (U-ViT's or AdaDiff's nnet_ema.pth); replaces the run's
    autoencoder: str = ""     # a latent preset's SD autoencoder (U-ViT's autoencoder_kl.pth)

    def validate(self, where: str) -> None:
        if not self.preset and (self.checkpoint or self.autoencoder):
            raise UserError(f"{where}: checkpoint and autoencoder here need a `preset` (the network's "
                            "architecture); a checkpoint of this suite goes in the run's `checkpoint`")
        if self.preset and not self.checkpoint:
            raise UserError(f"{where}: preset {self.preset!r} needs `checkpoint` (the release's nnet_ema.pth)")


@dataclass
class DataConfig:
    """A data set: the built-in `digits`, a `folder` of PNG/JPEG images, or an `npz` (uint8 NHWC, arr_0)."""
    name: str = "digits"
    path: str | None = None

    def validate(self, where: str) -> None:
        if self.name not in ("digits", "folder", "npz"):
            raise UserError(f"{where}: unknown data set {self.name!r}{did_you_mean(self.name, ['digits', 'folder', 'npz'])}; "
                            "valid: digits, folder, npz")
        if self.name != "digits" and not self.path:
            raise UserError(f"{where}: data set {self.name!r} needs `path` (the image folder or .npz file)")


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 200
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0
    threads: int | None = None
    out_dir: str = "results/train/uvit_digits"
    export: str | None = None
    export_half: bool = True
    device: str = "auto"      # where training runs (as a run's `device`); noise is still drawn on the CPU
    precision: str = "fp32"   # autocast of the forward and loss; weights, optimiser and EMA stay fp32
    schedule: str = "linear"  # the noise schedule and time input trained (`schedules`); the checkpoint records it
    ema_warmup: bool = False  # EMA decay min(ema_decay, (1 + t) / (10 + t)): the starting weights wash out (`recipe`)
    holdout: float = 0.0      # fraction of the data held out for the held-out loss (0: none)
    eval_every: int = 500     # steps between held-out loss evaluations (with holdout > 0)
    patience: int = 0         # stop after this many evaluations without improvement (0: run every step)

    def validate(self, where: str) -> None:
        _positive(where, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                  checkpoint_every=self.checkpoint_every)
        check_device_spec(self.device, where)
        check_precision(self.precision, where)
        check_schedule_name(self.schedule, where)
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"{where}: ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.warmup_steps < 0:
            raise UserError(f"{where}: warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 0 <= self.holdout < 1:
            raise UserError(f"{where}: holdout must be in [0, 1) (got {self.holdout}); 0.1 holds out a tenth")
        _positive(where, eval_every=self.eval_every)
        if self.patience < 0 or (self.patience and not self.holdout):
            raise UserError(f"{where}: patience = {self.patience} needs holdout > 0 (the stopping rule reads the "
                            "held-out loss) and must be >= 0; set holdout = 0.1, or patience = 0")
        if self.weight_decay < 0:
            raise UserError(f"{where}: weight_decay must be >= 0 (got {self.weight_decay}); 0 turns it off")
        for key, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= beta < 1:
                raise UserError(f"{where}: {key} must be in [0, 1) (got {beta}); AdamW's defaults are 0.9 and 0.999")
        check_seed(self.seed, f"{where}: seed")
        if self.threads is not None:
            check_threads(self.threads, where)


@dataclass
class TrainFile:
    """A training config: `[data]`, `[model]`, `[train]`, and at most one method's table.

    With a method's table (`[adadiff]`, `[berxit]`, `[ase]`, `[l2c]`: the `TrainConfig` a method
    declares) that method's training task runs, usually from a base checkpoint; without one a U-ViT
    is trained from scratch as `[model]` says, or a DiT as `[dit]` says. `training.load_train_config` reads one from TOML.
    """
    data: DataConfig = field(default_factory=DataConfig)
    model: UViTConfig = field(default_factory=UViTConfig)
    dit: DiTConfig | None = None  # `[dit]` instead of `[model]`: a DiT from scratch (diffusers' constructor names)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str | None = None      # the method whose table the file holds
    task_config: Any = None      # that table, as the method's TrainConfig
    exclusive_keys = (("model", "dit"),)


@dataclass
class SamplingConfig:
    """Sampling. `schedule`: the noise schedule and time-input convention the network was trained with
    (`schedules`: linear, scaled-linear, vp). `guidance`: classifier-free guidance weight w in
    eps_u + w (eps_c - eps_u); 1.0 is none (U-ViT's scale s is w - 1). `prompts`: a text-to-image
    network's prompts, an .npz of CLIP token features (`contexts` N x 77 x 768, `empty_context` 77 x 768
    for guidance; see `prompts`); sample i takes prompt i mod N."""
    solver: str = "dpm-solver++"
    num_steps: int = 25
    num_samples: int = 1000
    batch_size: int = 250
    schedule: str = "linear"
    guidance: float = 1.0
    guidance_channels: int = 0  # guide only the first this many channels (DiT's official rule: 3 of 4); 0 = all
    prompts: str = ""

    def validate(self, where: str) -> None:
        check_solver(self.solver, where)
        check_schedule_and_solver(self.schedule, self.solver, where)
        _positive(where, num_steps=self.num_steps, num_samples=self.num_samples, batch_size=self.batch_size)
        if self.guidance < 1:
            raise UserError(f"{where}: guidance must be >= 1 (got {self.guidance}); 1.0 is no guidance, "
                            "U-ViT's scale s is guidance - 1")
        if self.guidance_channels < 0 or (self.guidance_channels and self.guidance == 1):
            raise UserError(f"{where}: guidance_channels must be >= 0, and set only with guidance > 1 (got "
                            f"{self.guidance_channels} at guidance {self.guidance}); 0 guides every channel")


FID_BACKENDS = ("torch-fidelity", "clean-fid")


@dataclass
class MetricsConfig:
    """Quality metrics.

    `inception`: "auto" (when weights are on disk), "require" (error if absent), "download" (fetch them
    when absent; refused under --offline), "off".
    `fid_backend`: "torch-fidelity" (the engine) or "clean-fid" (the cross-check; in the Inception space it
    needs clean-fid's inception-2015-12-05.pt, found at `cleanfid_model` or where clean-fid looks).
    `prc`: precision and recall (k-NN manifolds with `prc_neighborhood` neighbours).
    `fid_bootstrap`: resamples for a bootstrap confidence interval of FID at level `fid_ci` (0 = none).
    `reference_stats`: published FID statistics (`metrics.reference_stats`); FID then needs no reference images.
    `swd`: the sliced Wasserstein distance over Laplacian-pyramid patches (`metrics.swd`, no network): "auto"
    (only when no feature space reads the images), "on", "off"; `swd_projections` random directions per
    pyramid level, drawn with `swd_seed`.
    `extractor`: the file `adadiff-bench train-extractor` wrote for this data set: its feature space is used too.
    """
    inception: str = "auto"
    inception_weights: str | None = None
    fid_backend: str = "torch-fidelity"
    cleanfid_model: str | None = None
    kid_subset_size: int = 1000
    isc_splits: int = 10
    prc: bool = True
    prc_neighborhood: int = 3
    fid_bootstrap: int = 0
    fid_ci: float = 0.95
    reference_stats: str = ""   # published FID statistics (.npz with mu, sigma in Inception pool3 space)
    swd: str = "auto"
    swd_projections: int = 128
    swd_seed: int = 0
    extractor: str = ""        # a feature space trained on this data by `adadiff-bench train-extractor` (its .pt)

    def validate(self, where: str) -> None:
        if self.inception not in ("auto", "require", "off", "download"):
            raise UserError(f"{where}: inception must be one of auto, require, off, download "
                            f"(got {self.inception!r})")
        if self.fid_backend not in FID_BACKENDS:
            raise UserError(f"{where}: unknown fid_backend {self.fid_backend!r}"
                            f"{did_you_mean(self.fid_backend, FID_BACKENDS)}; valid: {', '.join(FID_BACKENDS)}")
        _positive(where, kid_subset_size=self.kid_subset_size, isc_splits=self.isc_splits,
                  prc_neighborhood=self.prc_neighborhood)
        if self.swd not in ("auto", "on", "off"):
            raise UserError(f"{where}: swd must be one of auto, on, off (got {self.swd!r})")
        _positive(where, swd_projections=self.swd_projections)
        check_seed(self.swd_seed, f"{where}: swd_seed")
        if self.fid_bootstrap < 0:
            raise UserError(f"{where}: fid_bootstrap must be >= 0 resamples (got {self.fid_bootstrap}); 0 turns it off")
        if not 0 < self.fid_ci < 1:
            raise UserError(f"{where}: fid_ci must be in (0, 1), e.g. 0.95 (got {self.fid_ci})")
        if self.reference_stats and (self.inception == "off" or self.fid_backend == "clean-fid"):
            raise UserError(f"{where}: reference_stats are Inception statistics for torch-fidelity's FID; set "
                            "inception = \"require\" and fid_backend = \"torch-fidelity\", or remove reference_stats")


DEFAULT_TIMED_SAMPLES = 256


def timed_samples(timing: "TimingConfig", sampled: int) -> int:
    """Images in each timed call: the config's number, or min(DEFAULT_TIMED_SAMPLES, sampled) when unset."""
    return timing.num_samples if timing.num_samples is not None else min(DEFAULT_TIMED_SAMPLES, sampled)


@dataclass
class TimingConfig:
    """Wall-clock protocol: a separate timed pass of `num_samples` images, `warmup_batches` short warm-up
    runs (2 solver steps) of the cell and the reference, fixed threads, `repeats` interleaved repeats.

    `num_samples` unset times min(DEFAULT_TIMED_SAMPLES, [sampling] num_samples): a small run is not held
    up by timing more images than it samples; a number given is honoured as is."""
    enabled: bool = True
    num_samples: int | None = None
    repeats: int = 3
    warmup_batches: int = 1
    threads: int = 2

    def validate(self, where: str) -> None:
        _positive(where, threads=self.threads)
        if self.num_samples is not None:
            _positive(where, num_samples=self.num_samples)
        check_threads(self.threads, where)
        if self.warmup_batches < 0:
            raise UserError(f"{where}: warmup_batches must be >= 0 (got {self.warmup_batches}); 0 skips the warm-up")
        if self.repeats < 3:
            raise UserError(f"{where}: repeats must be >= 3 so that a median means something (got {self.repeats})")


@dataclass
class MethodEntry:
    """One `[[methods]]` table: a registered method, optional solver/step overrides, and its knobs.

    Any value given as a list is swept: the cells are the product of all lists.
    """
    name: str
    solver: str | list[str] | None = None
    num_steps: int | list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "run"
    checkpoint: str = "checkpoints/uvit_digits.pt"
    seeds: list[int] = field(default_factory=lambda: [0])
    results_dir: str = "results"
    device: str = "auto"          # auto (CUDA when available) | cpu | cuda | cuda:N
    precision: str = "fp32"       # fp32 | bf16 | fp16: autocast of the network; solver and metrics in fp32
    deterministic: bool = False   # deterministic kernels (CUDA: cuBLAS workspace, no cuDNN autotuning, no TF32)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    methods: list[MethodEntry] = field(default_factory=lambda: [MethodEntry("full")])

    def validate(self, where: str) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise UserError(f"{where}: run name {self.name!r} must be a plain folder name (no slashes)")
        if "\0" in self.name or len(self.name.encode()) > MAX_NAME_BYTES:
            raise UserError(f"{where}: run name must be at most {MAX_NAME_BYTES} bytes without NUL characters "
                            f"(got {len(self.name.encode())} bytes); pick a shorter name")
        if not self.seeds:
            raise UserError(f"{where}: seeds must list at least one seed")
        for seed in self.seeds:
            check_seed(seed, f"{where}: seeds")
        if not self.methods:
            raise UserError(f"{where}: add at least one [[methods]] table (for example name = \"full\")")
        check_device_spec(self.device, where)
        check_precision(self.precision, where)


def check_device_spec(spec: str, where: str) -> None:
    """The `device` setting's syntax (no hardware is looked at here: see `device.resolve_device`)."""
    if not isinstance(spec, str) or not DEVICE_SPEC.match(spec):
        raise UserError(f"{where}: device must be auto, cpu, cuda or cuda:N (got {spec!r})")


def check_precision(precision: str, where: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"{where}: precision must be one of {', '.join(PRECISIONS)} (got {precision!r}); "
                        "fp32 is exact, bf16 and fp16 autocast the network")


def check_solver(solver: str, where: str) -> None:
    if solver not in SOLVERS:
        raise UserError(f"{where}: unknown solver {solver!r}{did_you_mean(solver, SOLVERS)}; valid: {', '.join(SOLVERS)}")


def check_seed(seed: int, where: str) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{where}: a seed must be in [0, 2^63 - 1] (got {seed}); use a non-negative integer")


def check_threads(threads: int, where: str) -> None:
    if not 1 <= threads <= MAX_THREADS:
        raise UserError(f"{where}: threads must be in [1, {MAX_THREADS}] (got {threads}); use at most the machine's "
                        "cores")


def _positive(where: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:  # (NaN fails this test, as it should)
            raise UserError(f"{where}: {key} must be > 0 (got {value})")


# ---- loading ---------------------------------------------------------------------------------

def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass an existing TOML file (see configs/)")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))  # (TOML is UTF-8 whatever the locale)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        "save the config as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {str(path)!r} ({exc.strerror or exc}); fix its permissions") from None


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    raw = read_toml(path)
    for key, value in (overrides or {}).items():
        raw[key] = value
    return from_dict(RunConfig, raw, str(path))


def method_entry_from_dict(raw: dict, where: str) -> MethodEntry:
    """`[[methods]]` tables: known fields go to MethodEntry, every other key is a method knob."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: each [[methods]] entry must be a table")
    if "name" not in raw:
        raise UserError(f"{where}: a [[methods]] table needs `name` (for example name = \"full\")")
    raw = dict(raw)
    for key, value in raw.items():
        if value == []:
            raise UserError(f"{where}: {key} is an empty list; give at least one value (a list sweeps its values)")
    entry = MethodEntry(name=_check_type(raw.pop("name"), str, f"{where}.name"))
    for key in ("solver", "num_steps"):
        if key in raw:
            setattr(entry, key, _check_type(raw.pop(key), typing.get_type_hints(MethodEntry)[key], f"{where}.{key}"))
    entry.params = raw
    return entry


def from_dict(cls, raw: Any, where: str):
    """Build dataclass `cls` from a TOML table, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(key, names)}; valid keys: {', '.join(names)}")
    for group in getattr(cls, "exclusive_keys", ()):  # keys of which a table may set one at most
        given = [key for key in group if key in raw]
        if len(given) > 1:
            raise UserError(f"{where}: {' and '.join(given)} exclude each other; set only one of them")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if key == "methods":
            if not isinstance(value, list):
                raise UserError(f"{where}: methods must be an array of tables ([[methods]])")
            values[key] = [method_entry_from_dict(item, f"{where}: methods[{i}]") for i, item in enumerate(value)]
        elif _dataclass_in(hint) is not None:
            values[key] = from_dict(_dataclass_in(hint), value, f"{where}: [{key}]")
        else:
            values[key] = _check_type(value, hint, f"{where}: {key}")
    obj = cls(**values)
    for key in names:
        sub = getattr(obj, key)
        if dataclasses.is_dataclass(sub) and hasattr(sub, "validate"):
            sub.validate(f"{where}: [{key}]")
    if hasattr(obj, "validate"):
        obj.validate(where)
    for key, value in values.items():  # after `validate`, so that a key's own range message comes first
        _check_finite(value, f"{where}: {key}")
    return obj


def _dataclass_in(hint: Any):
    """The dataclass a field holds (unwrapping `X | None`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return classes[0] if classes else None
    return None


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return `value` if it matches `hint` (ints are accepted for floats), else raise UserError."""
    if _matches(value, hint):
        return float(value) if hint is float and isinstance(value, int) else value
    raise UserError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinity anywhere in a value: every range check (`x < 0`) lets NaN through."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value!r}; write a number (NaN and inf are not values)")
    for item in value if isinstance(value, list) else value.values() if isinstance(value, dict) else ():
        _check_finite(item, where)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "nothing (leave it out)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def to_dict(obj: Any) -> Any:
    """A config as plain data (for run.json and checkpoints)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
