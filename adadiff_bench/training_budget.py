"""What each row's networks were given to train: steps, images seen, wall-clock and device, from the meta that
`adadiff-bench train` writes into every checkpoint it exports.

A row's budget is the chain of its checkpoints: the run's model, then the method's own checkpoint (an
AdaDiff, ASE, BERxiT, L2C or DuoDiff network) when it names one. A file with no such meta (an official
release, a checkpoint from elsewhere) reads "not recorded": a reader then knows the budget is unknown, not zero.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .checkpoints import read_checkpoint
from .device import short_device_name
from .errors import UserError

NOT_RECORDED = "not recorded"


@functools.lru_cache(maxsize=64)
def _meta(path: str, mtime_ns: int) -> dict:
    """The `meta` table of a checkpoint (empty when it has none); read once per file version."""
    try:
        payload = read_checkpoint(path)
    except UserError:
        return {}
    meta = payload.get("meta") if isinstance(payload, dict) else None
    return meta if isinstance(meta, dict) else {}


def checkpoint_budget(path: str | Path) -> dict:
    """{steps, batch_size, samples_seen, seconds, device} of the training that exported `path` (only the keys
    its meta records; {} when none). A training that ran on more than one device names each with its steps."""
    path = Path(path)
    meta = _meta(str(path), path.stat().st_mtime_ns) if path.is_file() else {}
    if not isinstance(meta.get("steps"), int):
        return {}
    train = (meta.get("train_config") or {}).get("train") or {}
    batch = train.get("batch_size") if isinstance(train, dict) else None
    budget = {"steps": meta["steps"]}
    if isinstance(batch, int):
        budget.update(batch_size=batch, samples_seen=meta.get("samples_seen", meta["steps"] * batch))
    seconds = meta.get("train_seconds", meta.get("train_seconds_this_session"))
    if isinstance(seconds, (int, float)):
        budget["seconds"] = float(seconds)
    device = meta.get("device")
    # (`train` records device.device_info: the GPU's name on CUDA, else the torch device)
    budget["device"] = short_device_name(device) if isinstance(device, dict) else str(device or "cpu")
    steps_by_device = steps_per_device(meta.get("sessions"))
    if len(steps_by_device) > 1:  # a training in stages that moved between devices: each one's share
        budget["device"] = " and ".join(f"{name} ({steps:,} steps)" for name, steps in steps_by_device.items())
    return budget


def steps_per_device(sessions) -> dict[str, int]:
    """{device: steps trained there} over a checkpoint's recorded sessions, in order of first use ("not
    recorded" for steps saved before sessions were); {} for a missing or malformed record (a hostile file)."""
    steps: dict[str, int] = {}
    for session in sessions if isinstance(sessions, list) else ():
        span = session.get("steps") if isinstance(session, dict) else None
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            return {}
        name = session.get("device")
        name = NOT_RECORDED if name is None else str(name)[:60]
        steps[name] = steps.get(name, 0) + max(span[1] - span[0], 0)
    return steps


def describe_budget(path: str | Path, budget: dict) -> str:
    """A checkpoint's `checkpoint_budget` in words: "uvit_digits: 5,000 steps x 128 = 640k images, 41.5 min on cpu"."""
    name = Path(path).stem
    if not budget:
        return f"{name}: {NOT_RECORDED}"
    text = f"{name}: {budget['steps']:,} steps"
    if "samples_seen" in budget:
        seen = budget["samples_seen"]
        text += f" x {budget['batch_size']} = " + (f"{seen / 1e3:,.0f}k" if seen >= 10_000 else f"{seen:,}") + " images"
    if "seconds" in budget:
        text += f", {budget['seconds'] / 60:.1f} min"
    return text + f" on {budget['device']}"


def row_budget(paths: list[str | Path]) -> dict:
    """The row's columns: `training_budget` (each checkpoint of the chain in words, '; '-joined) and
    `train_images_seen` (their sum; NaN when any of them is not recorded)."""
    paths = list(dict.fromkeys(str(p) for p in paths if p))
    budgets = [checkpoint_budget(p) for p in paths]
    seen = [b.get("samples_seen") for b in budgets]
    return {"training_budget": "; ".join(describe_budget(p, b) for p, b in zip(paths, budgets)),
            "train_images_seen": float(sum(seen)) if seen and None not in seen else float("nan")}
