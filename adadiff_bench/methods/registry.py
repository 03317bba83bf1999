"""The method registry: names -> method classes, validated on entry, open to other packages.

A method owns its whole lifecycle, declared on its class: its knobs (`Params`), the table of a
training config it trains from (`TrainConfig`, read from `[<name>]`) and its training task
(`training_task`), the checkpoint formats its knobs read and its training writes (`reads`,
`writes`, names in `adadiff_bench.checkpoints`), what it trains or fetches before sampling
(`prepare`), and how it turns a backbone into a denoiser (`__call__`).

Built-in methods live in `adadiff_bench.methods` and the `baselines` modules (installed as
`adadiff_bench.baselines`); other packages add theirs through the entry-point group
`adadiff_bench.methods`, each entry pointing at a module that registers on import or at a
`Method` subclass (see `adadiff_bench.plugins`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import from_dict
from ..device import module_device
from ..errors import UserError, unknown_choice
from ..plugins import load_plugins
from ..steplog import StepLog

if TYPE_CHECKING:
    from ..diffusion import SamplingContext
    from ..models.backbone import Backbone

ENTRY_POINT_GROUP = "adadiff_bench.methods"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


@dataclass
class NoParams:
    """A method without knobs."""


@dataclass(frozen=True)
class PrepareContext:
    """What `Method.prepare` may use: where trained-on-demand checkpoints are cached, and whether to show progress."""
    training_cache: Path   # <results_dir>/.adadiff_cache, shared by every run of that results folder
    progress: bool = True


class Method:
    """Turns a backbone into a denoiser `eps = method(x, t, y, ctx)` and records what ran in the step log.

    Subclasses set `name`, `Params` (a dataclass of knobs), `family` (groups methods in reports:
    reference, early-exit, layer-dropping, step-skipping, caching), `batch_dependent` (True when the
    paper's rule decides per batch, so batch size can change results), `ceiling` (True for an oracle
    that peeks at what a real method cannot know: its row is a bound, not a competitor), `fixed_exit_point`
    (True for an early exit whose knob sets where samples exit, so no rule decides: `run` never warns that it
    is degenerate), and implement
    `__call__`. Methods that keep tensors across steps report their peak size with `note_cache`.

    Lifecycle, in the order the harness runs it: `check` and `check_schedule` (every cell, before
    anything runs), `prepare` (train or fetch what a setting needs; rank 0 first under torchrun), the
    constructor (once per cell, with the prepared knobs), then per batch `start_batch` and one call
    per sampling step. A method that trains sets `TrainConfig` and implements `training_task`.

    Devices: the run's model is on `self.device`; a method loads its own modules there
    (`cached_checkpoint(..., device=self.device)`) and makes every tensor with `device=` (or from an
    input), so it runs on a GPU as on the CPU (tests/test_device.py checks this on the CPU). Randomness
    is drawn by CPU generators and then moved, so it never depends on the device.
    """
    name: ClassVar[str]
    family: ClassVar[str] = "other"
    Params: ClassVar[type] = NoParams
    batch_dependent: ClassVar[bool] = False
    ceiling: ClassVar[bool] = False
    fixed_exit_point: ClassVar[bool] = False
    TrainConfig: ClassVar[type | None] = None   # the `[<name>]` table of a training config, if the method trains
    reads: ClassVar[tuple[str, ...]] = ()       # checkpoint formats its knobs accept
    writes: ClassVar[str | None] = None         # the checkpoint format its training exports
    trained_files: ClassVar[tuple[str, ...]] = ("checkpoint",)  # knobs naming trained files: their budgets show

    def __init__(self, model: Backbone, params=None):
        self.model = model
        self.device = module_device(model)  # where the method's own modules and tensors must live too
        self.params = params if params is not None else self.Params()
        self.log: StepLog | None = None
        self.record_artifacts = False  # set by the harness for the sampling pass (never the timed one)
        self.cache_bytes = 0  # peak bytes held across sampling steps (feature caches), per batch

    def note_cache(self, *tensors: torch.Tensor | None) -> None:
        """Record the size of what is cached now; `cache_bytes` keeps the peak."""
        size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        self.cache_bytes = max(self.cache_bytes, size)

    @classmethod
    def check(cls, params, model: Backbone, where: str) -> None:
        """Checks of the knobs that need the run's model (e.g. an exit point beyond its depth, or a backbone
        without the long skips the method needs); raise UserError. Runs for every cell before anything is
        written, and again on the prepared knobs."""

    @classmethod
    def check_schedule(cls, params, solver: str, num_steps: int, where: str) -> None:
        """Checks of the knobs against the cell's solver and step count (e.g. a router trained for one
        schedule); raise UserError. The harness calls this for every cell before anything is written."""

    @classmethod
    def prepare(cls, params, context: PrepareContext):
        """Train or fetch what this setting needs before any sampling; return the knobs to sample with.

        The harness calls it once per distinct setting after every check has passed (under torchrun on
        rank 0 first, then on the others, which find the result cached). Writes go under
        `context.training_cache`, atomically. The default needs nothing."""
        return params

    @classmethod
    def training_task(cls, config, alpha_bar: torch.Tensor):
        """The `training.Task` of a training config whose `[<name>]` table is this method's `TrainConfig`."""
        raise NotImplementedError(f"method {cls.name!r} does not train")

    def artifacts(self) -> dict[str, dict]:
        """Extra arrays to store with the cell, {file name: {key: array}} (e.g. uncertainty maps)."""
        return {}

    def restore_artifacts(self, artifacts: dict[str, dict]) -> None:
        """Take back what `artifacts()` returned before a resumed sampling (a killed cell's finished batches)."""

    def start_batch(self, log: StepLog) -> None:
        """Called before each new batch of samples: forget any state kept across steps; record into `log`."""
        self.log = log

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, ctx: SamplingContext) -> torch.Tensor:
        raise NotImplementedError


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under `cls.name`, refusing malformed and duplicate names."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lowercase words joined by '-' (e.g. 'static-exit')")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__module__}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} must subclass adadiff_bench.methods.Method")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass of the method's knobs")
    if cls.TrainConfig is not None and not dataclasses.is_dataclass(cls.TrainConfig):
        raise TypeError(f"{cls.__name__}.TrainConfig must be a dataclass (the [{name}] table of a training config)")
    _REGISTRY[name] = cls
    return cls


def load_all() -> None:
    """Import the built-in methods, the baselines and every plugin of the entry-point group (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    methods = importlib.import_module("adadiff_bench.methods")
    for module in pkgutil.iter_modules(methods.__path__):
        if module.name != "registry":
            importlib.import_module(f"adadiff_bench.methods.{module.name}")
    baselines = _baselines_package()
    if baselines is not None:
        for module in pkgutil.iter_modules(baselines.__path__):
            importlib.import_module(f"adadiff_bench.baselines.{module.name}")
    for loaded in load_plugins(ENTRY_POINT_GROUP):
        if isinstance(loaded, type) and issubclass(loaded, Method):
            register_method(loaded)


def _baselines_package():
    """`adadiff_bench.baselines`: installed, or (in a source checkout) the `baselines/` folder beside the package."""
    try:
        return importlib.import_module("adadiff_bench.baselines")
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parents[2] / "baselines"
        if not (source / "__init__.py").is_file():
            return None
        spec = importlib.util.spec_from_file_location("adadiff_bench.baselines", source / "__init__.py",
                                                      submodule_search_locations=[str(source)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def baseline_module(name: str):
    """The module `adadiff_bench.baselines.<name>` (installed, or the source checkout's `baselines/`)."""
    _baselines_package()
    return importlib.import_module(f"adadiff_bench.baselines.{name}")


def available_methods() -> list[str]:
    load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    load_all()
    if name not in _REGISTRY:
        raise unknown_choice("method", name, _REGISTRY)
    return _REGISTRY[name]


def trainable_methods() -> list[str]:
    """Methods with a training table (`[<name>]` in a training config)."""
    return [name for name in available_methods() if _REGISTRY[name].TrainConfig is not None]


def make_params(cls: type[Method], raw: dict, where: str):
    """Validate a method's knobs (one setting, no lists left) into its Params dataclass."""
    return from_dict(cls.Params, raw, f"{where} ({cls.name})")
