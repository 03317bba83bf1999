"""Checkpoints: one registry of formats, the only place that opens a checkpoint file and says what it is.

A checkpoint of this suite is a dict with a `format` field naming its format ("adadiff-bench/uvit",
"adadiff-bench/adadiff", "adadiff-bench/berxit", ...); files in other projects' layouts (a published
U-ViT state dict, an official AdaDiff checkpoint) carry no such field and are recognised by their
keys. Each format says what it holds and how to load it into a ready object. Files are read with
`torch.load(weights_only=True)`: nothing in them can run code.

The core formats live here (a U-ViT, a published U-ViT state dict); methods register theirs next
to the code that reads and writes them (`Method.reads` / `Method.writes` name them).

    load_checkpoint(path, "adadiff-bench/uvit")   # the object, or one line saying what the file is instead
    cached_checkpoint(path, ...)                   # the same, shared (read-only use while sampling)
    open_checkpoint(path)                          # (format, payload) without loading
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import DiTConfig, UViTConfig, UViTT2IConfig
from .errors import UserError
from .models.backbone import Backbone
from .models.dit import DiT
from .models.uvit import UViT

FORMAT = "adadiff-bench/uvit"
DIT_FORMAT = "adadiff-bench/dit"
UVIT_STATE_DICT = "uvit-state-dict"
VERSION = 1
TRAIN_HINT = "train one with `adadiff-bench train --config configs/train_digits.toml`"


@dataclass(frozen=True)
class CheckpointFormat:
    """One kind of checkpoint file: its name, what it holds, how to load it, how to make one."""
    name: str                                       # the file's `format` field (or a name for a foreign layout)
    what: str                                       # for messages: "a U-ViT"
    load: Callable[..., object]                     # (payload, path, **options) -> the ready object
    how_to_make: str = ""                           # one clause: where such a file comes from
    recognise: Callable[[dict], bool] | None = None  # a foreign layout (no `format` field): does it look like one?


_FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] != fmt:
        raise ValueError(f"checkpoint format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes; of a folder (a diffusers model), over its files' relative names and bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    folder = path.is_dir()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if folder else [path]:
        if folder:
            digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """The raw payload of a checkpoint file (weights only: no code runs), with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; {TRAIN_HINT} or point `checkpoint` at an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file ({type(exc).__name__}); "
                        "re-download or retrain it") from None


def _identify(payload) -> CheckpointFormat | None:
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("format"), str):
        return _FORMATS.get(payload["format"])
    return next((f for f in _FORMATS.values() if f.recognise is not None and f.recognise(payload)), None)


def _identify_any(payload) -> CheckpointFormat | None:
    """The format of a payload, loading the methods' (and plugins') formats when it is not a core one."""
    fmt = _identify(payload)
    if fmt is None:
        from .methods.registry import load_all
        load_all()
        fmt = _identify(payload)
    return fmt


def open_checkpoint(path: str | Path) -> tuple[CheckpointFormat, dict]:
    """(format, payload) of a checkpoint file; a file of no known format is refused with one line."""
    payload = read_checkpoint(path)
    fmt = _identify_any(payload)
    if fmt is None:
        raise _unknown_format(path, payload)
    return fmt, payload


def _unknown_format(path: str | Path, payload) -> UserError:
    stated = payload.get("format") if isinstance(payload, dict) else None
    return UserError(f"{str(path)!r} is not a checkpoint this suite knows{f' (format {stated!r})' if stated else ''}; "
                     f"known formats: {', '.join(sorted(_FORMATS))}")


def load_checkpoint(path: str | Path, formats: str | Sequence[str] | None = None, where: str = "",
                    **options) -> object:
    """The object a checkpoint holds, refusing (one line) a file of another format than `formats`."""
    fmt, payload = open_checkpoint(path)
    wanted = (formats,) if isinstance(formats, str) else tuple(formats or ())
    if wanted and fmt.name not in wanted:
        needed = " or ".join(_FORMATS[w].what if w in _FORMATS else w for w in wanted)
        hint = next((_FORMATS[w].how_to_make for w in wanted if w in _FORMATS and _FORMATS[w].how_to_make), "")
        raise UserError(f"{where + ': ' if where else ''}{str(path)!r} is {fmt.what} ({fmt.name}), not {needed}"
                        f"{'; ' + hint if hint else ''}")
    return load_body(fmt, payload, str(path), **options)


BODY_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError)


def load_body(fmt: CheckpointFormat, payload, path: str, **options) -> object:
    """`fmt.load`, refusing in one line a body that does not fit its format tag (a missing table, a tensor
    where a dict belongs, a string where a size belongs): the tag alone proves nothing."""
    try:
        return fmt.load(payload, path, **options)
    except UserError:
        raise
    except BODY_ERRORS as exc:
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise UserError(f"checkpoint {path!r} says it is {fmt.what} ({fmt.name}) but its contents do not fit that "
                        f"format ({type(exc).__name__}: {detail}); re-download or retrain it") from None


def cached_checkpoint(path: str | Path, formats: str | Sequence[str] | None = None, where: str = "",
                      device: torch.device | str = "cpu") -> object:
    """`load_checkpoint`, loaded once per file version and device and shared: only for read-only use
    (sampling, checks). Its modules and tensors live on `device`."""
    stat = Path(path).stat() if Path(path).is_file() else None
    version = (stat.st_mtime_ns, stat.st_size) if stat else None
    key = (formats,) if isinstance(formats, str) else tuple(formats or ())
    try:
        return _cached(str(path), version, key, str(torch.device(device)))
    except UserError as exc:
        raise UserError(f"{where}: {exc}" if where else str(exc)) from None


@lru_cache(maxsize=16)
def _cached(path: str, version, formats: tuple[str, ...], device: str) -> object:
    if device == "cpu":
        return load_checkpoint(path, formats)
    return moved_to(_cached(path, version, formats, "cpu"), torch.device(device))


def moved_to(obj, device: torch.device):
    """A copy of a loaded checkpoint's object on `device`: modules and tensors moved, in dicts, lists, tuples
    (named too) and dataclasses."""
    if isinstance(obj, torch.nn.Module):
        return copy.deepcopy(obj).to(device)
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {key: moved_to(value, device) for key, value in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: moved_to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(moved_to(value, device) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved_to(value, device) for value in obj)
    return obj


def checkpoint_format(path: str | Path) -> CheckpointFormat:
    return open_checkpoint(path)[0]


# ---- writing -------------------------------------------------------------------------------------

def atomic_torch_save(obj, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    from .results import temporary_beside
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # (a full disk, a folder made read-only)
        raise UserError(f"cannot write {str(path)!r} ({exc.strerror or exc}); free space or fix permissions, "
                        "then rerun the same command") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state_for_saving(module: torch.nn.Module, half: bool) -> dict:
    """A detached CPU copy of the state dict, floating tensors in half precision when asked."""
    return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
            for k, v in module.state_dict().items()}


def load_state_dict_strict(model: torch.nn.Module, state: dict, where: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming missing and unexpected keys."""
    expected = model.state_dict()
    check_state_fits(expected, state, where)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def check_state_fits(expected: dict, state, where: str) -> None:
    """Refuse (one line) a state that is not a dict of tensors with exactly `expected`'s names and shapes."""
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {where!r}: its state dict is a {type(state).__name__}, not a table of tensors; "
                        "re-download or retrain it")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"checkpoint {where!r}: state dict entries {', '.join(not_tensors[:5])} are not tensors; "
                        "re-download or retrain it")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(f"checkpoint {where!r} does not fit the model ({'; '.join(parts)}); "
                        "check that the model config matches the checkpoint")


# ---- U-ViT: this suite's format and the published state dicts ---------------------------------------

def build_model(config: UViTConfig) -> UViT:
    """A U-ViT from its config; the config stays on the module (`model.config`) for whoever saves it."""
    model = UViT(**dataclasses.asdict(config))
    model.config = config
    return model


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: UViTConfig | DiTConfig,
                    meta: dict | None = None, half: bool = False) -> None:
    """This suite's checkpoint of a backbone (a U-ViT, or a DiT with its diffusers config)."""
    state = state_for_saving(model, half)
    atomic_torch_save({"format": DIT_FORMAT if isinstance(config, DiTConfig) else FORMAT, "version": VERSION,
                       "model": dataclasses.asdict(config), "state_dict": state, "meta": meta or {}}, path)


def uvit_from_state(config: UViTConfig, state: dict, path: str) -> UViT:
    """A float32 U-ViT in eval mode with these weights (strict). Names and shapes are checked on a shapeless
    (meta) copy first, so a checkpoint claiming a huge model is refused before its memory is allocated."""
    check_layer_count(config, state, path)
    return checked_build(lambda: UViT(**dataclasses.asdict(config)), lambda: build_model(config), state, path)


def check_layer_count(config: UViTConfig | DiTConfig, state, path: str) -> None:
    """Refuse a config that claims more blocks than its state dict has tensors (each block holds several): the
    size a hostile file claims is bounded before anything is built, even on the meta device."""
    layers = config.num_layers if isinstance(config, DiTConfig) else config.depth
    if isinstance(state, dict) and layers > len(state):
        raise UserError(f"checkpoint {path!r}: its config says {layers} layers but its state dict holds only "
                        f"{len(state)} tensors; re-download or retrain it")


def checked_build(shapeless, build, state, path: str):
    """`build()` in float32 eval mode with `state` loaded strictly, its names and shapes first checked against
    `shapeless()` built on the meta device (nothing allocated for a checkpoint that does not fit)."""
    with torch.device("meta"):
        check_state_fits(shapeless().state_dict(), state, path)
    model = build()
    load_state_dict_strict(model, state, path)
    return model.float().eval()


def _load_uvit(payload: dict, path: str) -> UViT:
    return uvit_from_state(uvit_config_from(payload["model"], path), payload["state_dict"], path)


def uvit_config_from(table, path: str, field: str = "model") -> UViTConfig:
    """The U-ViT config a checkpoint carries, refusing (one line) a table of unknown keys, wrong types or bad sizes."""
    text_to_image = isinstance(table, dict) and "clip_dim" in table
    return config_from_table(UViTT2IConfig if text_to_image else UViTConfig, table, path, field)


SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def config_from_table(cls, table, path: str, field: str):
    """A config dataclass from a checkpoint's table: known keys, values of the declared scalar type, then its
    own `validate` (sizes > 0 and the like)."""
    fix = "re-download or retrain it"
    if not isinstance(table, dict):
        raise UserError(f"checkpoint {path!r}: `{field}` is a {type(table).__name__}, not a table of "
                        f"{cls.__name__} fields; {fix}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in table if k not in fields)
    if unknown:
        raise UserError(f"checkpoint {path!r}: `{field}` has unknown key(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(fields)}; {fix}")
    for key, value in table.items():
        kinds = str(fields[key].type).replace(" ", "").split("|")
        allowed = tuple(t for kind in kinds for t in SCALARS.get(kind, ()))
        wrong_type = allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)))
        if wrong_type and not (value is None and "None" in kinds):
            raise UserError(f"checkpoint {path!r}: `{field}.{key}` is {value!r} ({type(value).__name__}), "
                            f"expected {' or '.join(kinds)}; {fix}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"checkpoint {path!r}: `{field}.{key}` is {value}, expected a finite number; {fix}")
    config = cls(**table)
    if hasattr(config, "validate"):
        config.validate(f"checkpoint {path!r}: `{field}`")
    return config


UVIT_KEY_PREFIXES = ("pos_embed", "patch_embed.", "time_embed.", "label_emb.", "context_embed.",
                     "in_blocks.", "mid_block.", "out_blocks.", "norm.", "decoder_pred.", "final_layer.")


def looks_like_uvit_state(payload: dict) -> bool:
    """A published U-ViT state dict: only U-ViT parameter names, and its patch embedding among them."""
    return "patch_embed.proj.weight" in payload and all(str(k).startswith(UVIT_KEY_PREFIXES) for k in payload)


def _load_uvit_state(payload, path: str, uvit: UViTConfig | None = None) -> UViT:
    if uvit is None or not isinstance(payload, dict):
        raise UserError(f"checkpoint {path!r} is a plain state dict without a model config; pass the "
                        "U-ViT config (load_model(path, config=UViTConfig(...)))")
    return uvit_from_state(uvit, payload, path)


register_format(CheckpointFormat(FORMAT, "a U-ViT", _load_uvit, TRAIN_HINT))
register_format(CheckpointFormat(UVIT_STATE_DICT, "a published U-ViT state dict (config given separately)",
                                 _load_uvit_state, recognise=looks_like_uvit_state))


# ---- DiT: this suite's format and diffusers' `save_pretrained` folders ----------------------------------

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # older folders (DiT-XL-2-256) name the latter
# keys an older Transformer2DModel config.json carries that a patched DiT leaves at these values
INERT_DIFFUSERS_KEYS = {"cross_attention_dim": None, "num_vector_embeds": None, "only_cross_attention": False,
                        "use_linear_projection": False, "double_self_attention": False, "caption_channels": None,
                        "interpolation_scale": None, "attention_type": "default"}


def build_dit(config: DiTConfig) -> DiT:
    """A DiT with fresh weights from its config, kept on the module (`model.config`) for whoever saves it."""
    model = DiT.from_config(**dataclasses.asdict(config))
    model.config = config
    return model


def dit_from_state(config: DiTConfig, state, path: str) -> DiT:
    """A float32 DiT in eval mode with these weights (strict), names and shapes checked on a meta copy first."""
    check_layer_count(config, state, path)
    return checked_build(lambda: DiT.from_config(**dataclasses.asdict(config)), lambda: build_dit(config), state, path)


def _load_dit(payload: dict, path: str) -> DiT:
    return dit_from_state(config_from_table(DiTConfig, payload["model"], path, "model"), payload["state_dict"], path)


def load_diffusers_dit(folder: str | Path) -> DiT:
    """A DiT from a diffusers folder: `config.json` and its weights (a pipeline's folder: its `transformer/`).
    The weights are read as safetensors, or as a weights-only torch file: nothing in the folder runs code."""
    folder = transformer_folder(folder)
    weights = diffusers_weights_file(folder)
    if not (folder / "config.json").is_file() or weights is None:
        raise UserError(f"{str(folder)!r} is not a diffusers DiT folder: it needs config.json and "
                        f"{' or '.join(DIFFUSERS_WEIGHTS)} (the layout `save_pretrained` writes)")
    config = diffusers_dit_config(folder / "config.json")
    state = read_diffusers_weights(weights)
    state = {f"transformer.{key}": value for key, value in state.items()} if isinstance(state, dict) else state
    return dit_from_state(config, state, str(folder))


def transformer_folder(folder: str | Path) -> Path:
    """The folder that holds a DiT's config.json: a pipeline's `transformer/`, or the folder itself."""
    folder = Path(folder)
    return folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder


def diffusers_weights_file(folder: Path) -> Path | None:
    """The weights file of a diffusers model folder (safetensors first), if it has one."""
    return next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)


def read_diffusers_config(path: Path) -> dict:
    """A diffusers `config.json` as a table, with one-line errors for unreadable JSON or another kind of value."""
    import json
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not readable JSON ({type(exc).__name__}); re-download it") from None
    if not isinstance(table, dict):
        raise UserError(f"{str(path)!r} holds a {type(table).__name__}, not a diffusers config table; re-download it")
    return table


def diffusers_dit_config(path: Path) -> DiTConfig:
    """The DiTConfig of a diffusers `config.json`, refusing another class or a setting the suite's DiT lacks."""
    table = read_diffusers_config(path)
    if table.get("_class_name") not in DIT_CLASS_NAMES:
        raise UserError(f"{str(path)!r} configures {table.get('_class_name')!r}, not a DiT "
                        f"({' or '.join(DIT_CLASS_NAMES)}); point the checkpoint at a DiT's folder")
    active = [key for key, inert in INERT_DIFFUSERS_KEYS.items() if key in table and table[key] != inert]
    if active:
        raise UserError(f"{str(path)!r} sets {', '.join(active)}: not a patched, class-conditional DiT, which is all "
                        "the suite runs")
    settings = {key: value for key, value in table.items()  # (diffusers' own `_` keys and the inert ones dropped)
                if not key.startswith("_") and key not in INERT_DIFFUSERS_KEYS}
    return config_from_table(DiTConfig, settings, str(path), "config")


def read_diffusers_weights(path: Path) -> dict:
    """The state dict in a diffusers weights file, with one-line errors."""
    if path.suffix != ".safetensors":
        return read_checkpoint(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{str(path)!r} is corrupt or not a safetensors file ({type(exc).__name__}); "
                        "re-download it") from None


register_format(CheckpointFormat(DIT_FORMAT, "a DiT", _load_dit, TRAIN_HINT))

BACKBONE_FORMATS = (FORMAT, DIT_FORMAT)  # this suite's checkpoints of a bare backbone
BACKBONE_KINDS = ("uvit", "dit")         # how a network built on a backbone names its kind (`backbone` field)


def backbone_kind(config: UViTConfig | DiTConfig) -> str:
    return "dit" if isinstance(config, DiTConfig) else "uvit"


def build_backbone(config: UViTConfig | DiTConfig) -> Backbone:
    """A backbone with fresh weights from its config (a U-ViT's or a DiT's)."""
    return build_dit(config) if isinstance(config, DiTConfig) else build_model(config)


def backbone_config_from(payload: dict, path: str) -> UViTConfig | DiTConfig:
    """The backbone config a network's checkpoint carries in `model`, of the kind its `backbone` field names
    (files written before DiT support have none: a U-ViT)."""
    kind = payload.get("backbone", "uvit")
    if kind not in BACKBONE_KINDS:
        raise UserError(f"checkpoint {path!r}: `backbone` is {kind!r}, expected one of {', '.join(BACKBONE_KINDS)}; "
                        "re-download or retrain it")
    if kind == "dit":
        return config_from_table(DiTConfig, payload["model"], path, "model")
    return uvit_config_from(payload["model"], path)


def load_model(path: str | Path, config: UViTConfig | None = None) -> Backbone:
    """A float32 backbone in eval mode: a U-ViT or a DiT from a checkpoint of this suite, a published U-ViT
    state dict together with its `config` (a strict load names any key that does not fit), a diffusers DiT
    folder, or the backbone of a network built on one (a fine-tuned AdaDiff checkpoint: the backbone every
    method of a comparison can share)."""
    if Path(path).is_dir():
        return load_diffusers_dit(path)
    payload = read_checkpoint(path)
    fmt = _identify_any(payload)
    if fmt is not None and fmt.name in (FORMAT, DIT_FORMAT):
        return load_body(fmt, payload, str(path))
    if fmt is None and isinstance(payload, dict) and "format" in payload:
        raise _unknown_format(path, payload)
    if fmt is None or fmt.name == UVIT_STATE_DICT:
        return load_body(_FORMATS[UVIT_STATE_DICT], payload, str(path), uvit=config)
    backbone = getattr(load_body(fmt, payload, str(path)), "backbone", None)
    if isinstance(backbone, (UViT, DiT)):
        return backbone.float().eval()
    raise UserError(f"checkpoint {str(path)!r} is {fmt.what} ({fmt.name}), not a backbone (a U-ViT or a DiT) or a "
                    f"network built on one; {TRAIN_HINT}")
