"""Training: AdamW with linear warm-up, EMA weights, periodic checkpoints, resume; dispatch to a method's task.

A training config (`load_train_config`) trains a U-ViT from scratch, or, with a method's table
(`[adadiff]`, `[berxit]`, ...), runs the `training_task` that method declares in the registry.

`train.device` picks where the network trains and `train.precision` autocasts its forward and loss
(fp16 with a gradient scaler); weights, optimiser and EMA stay fp32. Batch indices, timesteps and
noise are drawn by the CPU generator and then moved, so the data and noise never depend on the device.

`out_dir/last.pt` holds the whole training state (model, EMA, optimiser, gradient scaler, generator,
step, and the SHA-256 of the base checkpoint a method's task builds on) and is rewritten atomically every
`checkpoint_every` steps; a rerun with the same config resumes from it, on any device, if the base file still
has that hash (`restart=True` ignores the state and starts from step 0). At the end the EMA weights are
written as a checkpoint (`out_dir/ema.pt`, and `export` in half precision when asked), which
`adadiff_bench.load_model` reads; with `end_report`, a sample grid and the loss by timestep beside it. Everything saved holds
CPU tensors, so a model trained on a GPU loads on a machine without one.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoints import (CheckpointFormat, atomic_torch_save, build_dit, build_model, load_checkpoint, moved_to,
                          register_format, save_checkpoint, sha256_file)
from .config import DiTConfig, TrainFile, UViTConfig, from_dict, read_toml, to_dict
from .data import check_matches_model, load_dataset
from .device import autocast, check_precision_on, device_info, resolve_device, short_device_name, to_device
from .diffusion import alphas_cumprod, schedule_training_loss
from .errors import UserError, did_you_mean
from .schedules import DEFAULT_SCHEDULE
from .recipe import (TrainingRecord, ema_decay_at, ema_start_share, held_out_loss, split_holdout, swap_weights,
                     training_session)
from .methods.registry import available_methods, get_method, trainable_methods
from .training_report import Predictions, write_training_report

STATE_FORMAT = "adadiff-bench/train-state"
CPU = torch.device("cpu")
STATE_KEYS = {"config", "step", "model", "ema", "optimizer", "generator"}
GENERIC_TABLES = ("data", "model", "dit", "train")


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to `base_lr`, then constant (as U-ViT's training recipe)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else base_lr


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


@dataclass
class Task:
    """What a training run optimises: the module (EMA'd and checkpointed), its loss, how to export it.

    train() moves `model` and the `frozen` modules (what the loss uses beside `model`: a base network, exit
    heads; neither trained nor saved) to the device. `loss(x0, y, generator)` runs under autocast with x0 and y
    on that device and `generator` on the CPU: it draws there and moves the draws to x0's device, as
    `diffusion.add_noise` does. `export(path, ema, meta, half)` gets the EMA module back on the CPU."""
    model: torch.nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]
    export: Callable[[Path, torch.nn.Module, dict, bool], None]
    model_config: UViTConfig | DiTConfig
    frozen: tuple[torch.nn.Module, ...] = ()
    base_checkpoint: str | None = None  # the file the task builds on: resuming needs its content unchanged
    predictions: Predictions | None = None  # eps per exit of the EMA module, for the end report (None: module(x, t, y))
    fresh: tuple[torch.nn.Module, ...] = ()  # freshly initialised parts of `model` (estimators, new heads) ...
    fresh_lr: float | None = None            # ... and their own learning rate (None: [train] lr, like the rest)


def parameter_groups(task: Task, lr: float) -> list[dict]:
    """The optimiser's groups, each with its `base_lr` (warmed up per step): the trainable parameters of the
    task's `fresh` modules at `fresh_lr` when it is set, everything else that trains at `lr`."""
    fresh_ids = {id(p) for module in task.fresh for p in module.parameters()} if task.fresh_lr else set()
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in fresh_ids], "base_lr": lr},
              {"params": [p for p in trainable if id(p) in fresh_ids], "base_lr": task.fresh_lr}]
    return [group for group in groups if group["params"]]


LABEL_DROPOUT = 0.1  # DiT's class dropout: the share of samples trained on the null label (for guidance)


def base_task(config: TrainFile, alpha_bar: torch.Tensor) -> Task:
    """A U-ViT (or with `[dit]`, a DiT) from scratch with L_simple on `[train] schedule` (the checkpoint records it:
    sampling checks it). A DiT learns its null label too: each sample's label is dropped with DiT's 0.1."""
    network = config.dit or config.model
    model, schedule = (build_dit(config.dit) if config.dit else build_model(config.model)), config.train.schedule

    def loss(x0, y, generator):
        if config.dit is not None:
            y = drop_labels(y, model.null_label, LABEL_DROPOUT, generator)
        return schedule_training_loss(model, x0, y, generator, schedule)

    return Task(model, loss, lambda path, ema, meta, half: save_checkpoint(
        path, ema, network, {**meta, "schedule": schedule}, half=half), network)


def drop_labels(y: torch.Tensor, null_label: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by the null label with probability `share` (drawn on the CPU from `generator`)."""
    dropped = (torch.rand(len(y), generator=generator) < share).to(y.device)
    return torch.where(dropped, torch.full_like(y, null_label), y)


def training_task(config: TrainFile, alpha_bar: torch.Tensor) -> Task:
    """The task a training config names: its method's (through the registry), or a U-ViT from scratch."""
    if config.task is None:
        return base_task(config, alpha_bar)
    if config.train.schedule != DEFAULT_SCHEDULE:  # (methods' tasks draw DDPM timesteps from `alpha_bar`)
        raise UserError(f"[train] schedule = {config.train.schedule!r} trains a U-ViT from scratch; [{config.task}] "
                        f"trains on the {DEFAULT_SCHEDULE!r} schedule only: remove schedule")
    if hasattr(config.task_config, "validate"):  # (a config built in Python has not been through from_dict)
        config.task_config.validate(f"[{config.task}]")
    return get_method(config.task).training_task(config, alpha_bar)


def load_train_config(path: str | Path) -> TrainFile:
    """A training TOML: `[data]`, `[model]`, `[train]` and at most one table of a method that trains."""
    raw = read_toml(path)
    tables = [key for key in raw if key not in GENERIC_TABLES]
    trainable = trainable_methods()
    for key in tables:
        if key in available_methods() and key not in trainable:
            raise UserError(f"{path}: method {key!r} does not train (it has no [{key}] table); methods that train: "
                            f"{', '.join(trainable)}")
        if key not in trainable:
            valid = [*GENERIC_TABLES, *trainable]
            raise UserError(f"{path}: unknown table or key {key!r}{did_you_mean(key, valid)}; valid: "
                            f"{', '.join(GENERIC_TABLES)} and one method's table: {', '.join(trainable)}")
    if len(tables) > 1:
        raise UserError(f"{path}: a training config has at most one method's table (found "
                        f"{', '.join(f'[{t}]' for t in tables)}); split it into one file per model")
    config = from_dict(TrainFile, {k: raw[k] for k in GENERIC_TABLES if k in raw}, str(path))
    if tables:
        config.task = tables[0]
        config.task_config = from_dict(get_method(tables[0]).TrainConfig, raw[tables[0]], f"{path}: [{tables[0]}]")
    return config


def train(config: TrainFile, progress: bool = True, restart: bool = False, end_report: bool = False) -> Path:
    """Run (or resume, unless `restart`) training; returns the path of the EMA checkpoint. With `end_report`, a
    sample grid and the loss per timestep are written beside the exported checkpoint (`training_report`)."""
    cfg = config.train
    device = resolve_device(cfg.device, "[train]")  # (an absent GPU is refused before anything is written)
    check_precision_on(cfg.precision, device, "[train]")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    alpha_bar = alphas_cumprod()
    task = training_task(config, alpha_bar)
    data = load_dataset(config.data)
    check_matches_model(data, task.model_config.img_size, task.model_config.in_chans)
    conditional = task.model_config.num_classes > 0
    if conditional and data.labels is None:
        raise UserError("model.num_classes > 0 needs a labelled data set; set num_classes = -1 or add labels")
    classes = getattr(task.model_config, "data_classes", task.model_config.num_classes)
    if conditional and data.num_classes > classes:
        raise UserError(f"the data set has {data.num_classes} classes but the model embeds {classes}; raise the "
                        "model's class count (U-ViT: [model] num_classes; DiT: [dit] num_embeds_ada_norm)")
    images, labels = data.as_model_input(), data.labels
    # a seeded held-out split for the stopping rule; training batches come from the rest
    train_index, held_index = split_holdout(len(images), cfg.holdout, cfg.seed)
    held_images, held_labels = images[held_index], labels[held_index] if conditional else None
    train_images, train_labels = images[train_index], labels[train_index] if conditional else None

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = task.model.to(device)
    for module in task.frozen:
        module.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(task, cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # (a no-op for fp32 and bf16)
    generator = torch.Generator().manual_seed(cfg.seed)
    base = BaseFile(task.base_checkpoint, sha256_file(task.base_checkpoint)) if task.base_checkpoint else None
    start_step, log = 0, TrainingRecord(cfg.patience)
    if restart:
        print(f"--restart: training from step 0 (any earlier state in {out_dir} is replaced)")
    else:
        start_step = _resume(out_dir / "last.pt", config, model, ema, optimizer, scaler, generator, base, log)

    end_step = start_step if log.should_stop() else cfg.steps  # (a rerun of a training that stopped early)
    model.train()
    bar = tqdm(range(start_step, end_step), initial=start_step, total=cfg.steps, desc="train",
               disable=not progress, mininterval=2.0)
    started = time.perf_counter()
    device_record = device_info(device)  # (what the export records; its short name goes into each saved state)
    device_label = short_device_name(device_record)
    for step in bar:
        # a batch drawn on the CPU and moved; forward and loss autocast to `precision`
        batch = torch.randint(len(train_images), (cfg.batch_size,), generator=generator)
        x0 = to_device(train_images[batch], device)
        y = to_device(train_labels[batch], device) if conditional else None
        with autocast(device, cfg.precision):
            loss = task.loss(x0, y, generator)
        if not torch.isfinite(loss):  # (one read per step) a NaN or inf loss never recovers: stop before saving it
            raise UserError(f"training loss is {loss.item()} at step {step + 1}; lower [train] lr (now {cfg.lr}) or "
                            f"check the data and model config (the last good state is {out_dir / 'last.pt'}, if any)")
        for group in optimizer.param_groups:  # (a state saved before groups had `base_lr` trained at cfg.lr)
            group["lr"] = learning_rate(step, group.get("base_lr", cfg.lr), cfg.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, model, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))
        stop = cfg.holdout > 0 and (step + 1) % cfg.eval_every == 0 and _evaluate(
            task, model, ema, log, step + 1, held_images, held_labels, cfg, device)
        if progress:  # (reading the loss waits for the GPU) the batch's loss, and the last held-out one and its best
            bar.set_postfix(loss=f"{loss.item():.4f}", **_held_out_postfix(log), refresh=False)
        if stop or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_state(out_dir / "last.pt", config, model, ema, optimizer, scaler, generator, step + 1, base,
                        log, time.perf_counter() - started, session=(device_label, start_step))
        if stop:
            steps_run = step + 1
            best_step, best_loss = log.best
            print(f"held-out loss has not improved on {best_loss:.5f} (step {best_step}) for {cfg.patience} "
                  f"evaluations: stopping at step {steps_run} of {cfg.steps}")
            break
    else:
        steps_run = end_step
    bar.close()

    elapsed = time.perf_counter() - started
    meta = {"steps": steps_run, "seed": cfg.seed, "data": data.name, "data_sha256": data.sha256,
            "samples_seen": steps_run * cfg.batch_size,
            "ema_start_share": ema_start_share(steps_run, cfg.ema_decay, cfg.ema_warmup),
            "held_out_loss": [list(entry) for entry in log.history],
            "train_config": to_dict(config), "train_seconds_this_session": round(elapsed, 1),
            "train_seconds": round(log.seconds_before + elapsed, 1),
            "device": device_record, "precision": cfg.precision,
            "sessions": log.with_session(device_label, start_step, steps_run, elapsed)}
    if base is not None:
        meta.update(base_checkpoint=base.path, base_sha256=base.sha256)
    ema = ema.cpu()  # (what a task exports loads on any machine)
    ema_path = out_dir / "ema.pt"
    task.export(ema_path, ema, meta, False)
    if cfg.export:
        task.export(Path(cfg.export), ema, meta, cfg.export_half)
    if end_report:
        for module in task.frozen:  # (what a task's predictions use beside the EMA module, back on the CPU)
            module.cpu()
        held_out = cfg.holdout > 0  # (the loss table on the held-out split when there is one)
        shown, shown_labels = (held_images, held_labels) if held_out else (images, labels if conditional else None)
        write_training_report(Path(cfg.export or ema_path), ema, task.predictions, shown, shown_labels,
                              cfg.schedule, cfg.seed, held_out)
    return ema_path


@dataclass(frozen=True)
class BaseFile:
    """The checkpoint a method's training builds on, and the SHA-256 of its content."""
    path: str
    sha256: str


def _held_out_postfix(log: TrainingRecord) -> dict[str, str]:
    """The progress bar's view of the stopping rule: the last held-out loss and the step of the best so far."""
    if not log.history:
        return {}
    return {"held_out": f"{log.history[-1][1]:.4f}", "best_at": str(log.best[0])}


def _evaluate(task: Task, model, ema, log: TrainingRecord, step: int, images, labels, cfg, device) -> bool:
    """Record the EMA weights' loss on the held-out split (the task's loss reads `model`: the EMA values are
    swapped in for the evaluation and back out); True when the stopping rule says stop."""
    swap_weights(model, ema)
    model.eval()
    try:
        with autocast(device, cfg.precision):
            loss = held_out_loss(task.loss, images, labels, cfg.batch_size, cfg.seed, lambda t: to_device(t, device))
    finally:
        model.train()
        swap_weights(model, ema)
    log.record(step, loss)
    return log.should_stop()


def _save_state(path: Path, config: TrainFile, model, ema, optimizer, scaler, generator, step: int,
                base: BaseFile | None, log: TrainingRecord, elapsed: float, session: tuple[str, int]) -> None:
    """`session`: (device, first step) of this session, recorded after the earlier ones."""
    atomic_torch_save({"format": STATE_FORMAT, "config": to_dict(config), "step": step,
                       "base_sha256": base.sha256 if base else None,
                       "held_out_loss": [list(entry) for entry in log.history],
                       "train_seconds": log.seconds_before + elapsed,
                       "sessions": log.with_session(session[0], session[1], step, elapsed),
                       # every tensor on the CPU: a state saved on a GPU loads anywhere
                       "model": moved_to(model.state_dict(), CPU), "ema": moved_to(ema.state_dict(), CPU),
                       "optimizer": moved_to(optimizer.state_dict(), CPU), "scaler": scaler.state_dict(),
                       "generator": generator.get_state()}, path)


def _resume(path: Path, config: TrainFile, model, ema, optimizer, scaler, generator, base: BaseFile | None,
            log: TrainingRecord | None = None) -> int:
    """Load `last.pt` if present, made by the same config on the same base file; returns the step to start from.

    The model is already on its device: the weights are copied onto it, and the optimiser's state follows its
    parameters there."""
    if not path.is_file():
        return 0
    fix = f"delete {path} to train again from step 0"
    try:
        state = load_checkpoint(path, STATE_FORMAT)
        saved, current = _identity(state["config"]), _identity(to_dict(config))
    except UserError as exc:  # (truncated by a kill or a full disk, or another file)
        raise UserError(f"cannot resume: {exc}; or {fix}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot resume: {path} holds no readable training config ({type(exc).__name__}); {fix}") from None
    if saved != current:
        raise UserError(f"{path} was written by a different training config (differs in "
                        f"{', '.join(_differences(saved, current))}); use a new train.out_dir or delete the old one")
    _check_same_base(path, state.get("base_sha256"), base)
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # (empty for fp32 and bf16, absent in a state from before the precision setting)
            scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        if log is not None:  # (no history nor seconds in a state from before the stopping rule)
            for step, loss in state.get("held_out_loss") or ():
                log.record(step, loss)
            log.seconds_before = float(state.get("train_seconds") or 0.0)
            log.sessions = list(state.get("sessions") or [training_session(None, 0, state["step"], log.seconds_before)])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"cannot resume: {path} does not fit this training run ({type(exc).__name__}); {fix}") from None
    print(f"resuming from {path} at step {state['step']}")
    return int(state["step"])


def _check_same_base(path: Path, saved_sha256, base: BaseFile | None) -> None:
    """Refuse to resume on a base checkpoint whose content changed since the state was saved (same path, new
    weights: a retrained base). A state from before the hash was recorded resumes with a warning."""
    if base is None:
        return
    if saved_sha256 is None:
        warnings.warn(f"{path} records no base hash (saved before the check existed); resuming without checking "
                      f"that {base.path} is the base it was trained on")
    elif saved_sha256 != base.sha256:
        raise UserError(f"{path} was trained on a base with hash {str(saved_sha256)[:12]}, the base at {base.path} has "
                        f"hash {base.sha256[:12]}; pass --restart to start over")


def _identity(config: dict) -> dict:
    """What must match to resume: all but the run length (extending is valid), the thread count, the device
    (a run may move between the CPU and a GPU) and where the result is exported (it does not change the
    training). The precision must match: it changes the recipe."""
    train = {k: v for k, v in config["train"].items()
             if k not in ("steps", "threads", "device", "export", "export_half")}
    train.setdefault("precision", "fp32")  # (a state from before the setting trained in fp32)
    train.setdefault("schedule", DEFAULT_SCHEDULE)  # (... and on the linear schedule)
    for key, before in (("ema_warmup", False), ("holdout", 0.0), ("eval_every", 500), ("patience", 0)):
        train.setdefault(key, before)  # (... and with the recipe settings' defaults)
    task = config.get("task")
    added = getattr(get_method(task).TrainConfig, "added_keys", {}) if task in trainable_methods() else {}
    if added:  # (... and a method's table with the values of the keys it gained since, as its class declares)
        config = {**config, "task_config": {**added, **config["task_config"]}}
    return {**config, "train": train}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Where two configs differ, as dotted keys with both values: "train.precision ('fp32' saved, 'bf16' now)"."""
    differences = []
    for key in dict.fromkeys([*current, *saved]):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key} ({old!r} saved, {new!r} now)")
    return differences


register_format(CheckpointFormat(STATE_FORMAT, "a training state (last.pt: model, EMA, optimiser, step)",
                                 lambda payload, path: payload,
                                 recognise=lambda payload: set(payload) == STATE_KEYS))
