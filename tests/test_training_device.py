"""`adadiff-bench train` on a device and in a precision: the CPU in fp32 is the plain loop, bit for bit; bf16 and
fp16 autocast the forward and loss while weights stay fp32; an absent GPU is refused before anything is written;
a run resumes on another device but not in another precision; saved states hold CPU tensors."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from adadiff_bench import training
from adadiff_bench.checkpoints import build_model, load_model
from adadiff_bench.cli import main
from adadiff_bench.data import load_dataset
from adadiff_bench.diffusion import alphas_cumprod, training_loss
from adadiff_bench.errors import UserError
from adadiff_bench.methods.adadiff import load_adadiff
from adadiff_bench.training import load_train_config, train
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODEL = "".join(f"{field} = {getattr(TINY, field)}\n"
                for field in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"))


def write_config(tmp_path, name: str = "run", adadiff_base=None, **train_settings):
    """A tiny training TOML (4 steps of batch 8, a checkpoint every 2) writing to tmp_path/name; a U-ViT from
    scratch, or AdaDiff fine-tuned from `adadiff_base`. `train_settings` override [train] keys."""
    settings = {"steps": 4, "batch_size": 8, "warmup_steps": 2, "ema_decay": 0.5, "checkpoint_every": 2,
                "out_dir": str(tmp_path / name), **train_settings}
    text = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in settings.items())
    head = (f'[adadiff]\nbase_checkpoint = "{adadiff_base}"\nfreeze_backbone = false\n' if adadiff_base
            else f"[model]\n{MODEL}")
    path = tmp_path / f"{name}.toml"
    path.write_text(f"{head}\n[train]\n{text}")
    return path


@pytest.fixture
def losses(monkeypatch) -> list[torch.Tensor]:
    """Every training loss train() computes from now on (the task's loss, wrapped)."""
    seen = []
    make_task = training.training_task

    def task_with_recorded_loss(config, alpha_bar):
        task = make_task(config, alpha_bar)

        def loss(x0, y, generator):
            value = task.loss(x0, y, generator)
            seen.append(value.detach().float().cpu())
            return value
        return dataclasses.replace(task, loss=loss)

    monkeypatch.setattr(training, "training_task", task_with_recorded_loss)
    return seen


def run(path, **overrides) -> dict:
    """Train the config at `path` (with [train] `overrides`); returns its last.pt."""
    config = load_train_config(path)
    config.train = dataclasses.replace(config.train, **overrides)
    train(config, progress=False)
    return torch.load(config.train.out_dir + "/last.pt", map_location="cpu", weights_only=True)


def assert_same_weights(state: dict, other: dict, atol: float = 0.0) -> None:
    """The same model and EMA weights: bit for bit, or within `atol`."""
    for part in ("model", "ema"):
        for name, value in state[part].items():
            same = torch.equal(value, other[part][name]) if atol == 0 else torch.allclose(value, other[part][name],
                                                                                          atol=atol)
            assert same, f"{part}.{name}"


def plain_training(config) -> torch.nn.Module:
    """What train() did before the device and precision settings, written out: the fp32 loop on the CPU (its EMA)."""
    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = build_model(config.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)
    images, alpha_bar = load_dataset(config.data).as_model_input(), alphas_cumprod()
    for step in range(cfg.steps):
        batch = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        loss = training_loss(model, images[batch], None, generator, alpha_bar)
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate(step, cfg.lr, cfg.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        training.update_ema(ema, model, cfg.ema_decay)
    return ema


# ---- the CPU ------------------------------------------------------------------------------------------

def test_cpu_fp32_is_the_plain_loop_bit_for_bit(tmp_path, losses):
    """device "cpu" in fp32 trains the same weights as the plain fp32 loop; so do "auto" and the defaults (no
    device or precision given) on a machine without a GPU, with the same loss curve."""
    cpu = run(write_config(tmp_path, "cpu", device="cpu", precision="fp32"))
    reference = plain_training(load_train_config(tmp_path / "cpu.toml"))
    for name, value in reference.state_dict().items():
        assert torch.equal(value, cpu["ema"][name]), name
    curve = torch.stack(losses)
    assert len(curve) == 4 and torch.isfinite(curve).all() and cpu["scaler"] == {}  # (no scaler outside fp16)
    if torch.cuda.is_available():
        return
    for name, settings in {"auto": {"device": "auto"}, "defaults": {}}.items():
        losses.clear()
        assert_same_weights(run(write_config(tmp_path, name, **settings)), cpu)
        assert torch.equal(torch.stack(losses), curve)


def test_bf16_on_the_cpu_autocasts_and_keeps_fp32_weights(tmp_path, losses):
    fp32 = run(write_config(tmp_path, "fp32", device="cpu"))
    bf16 = run(write_config(tmp_path, "bf16", device="cpu", precision="bf16"))
    assert torch.isfinite(torch.stack(losses[4:])).all() and len(losses) == 8
    assert not torch.equal(torch.stack(losses[4:]), torch.stack(losses[:4]))  # autocast changed the arithmetic
    changed = [name for name, value in fp32["ema"].items() if not torch.equal(value, bf16["ema"][name])]
    assert "in_blocks.0.attn.qkv.weight" in changed
    for name, value in fp32["ema"].items():  # ... of the same training
        assert torch.allclose(value, bf16["ema"][name], atol=0.01), name
    tensors = [*bf16["model"].values(), *bf16["ema"].values(),
               *(t for s in bf16["optimizer"]["state"].values() for k, t in s.items() if k != "step")]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    meta = torch.load(tmp_path / "bf16" / "ema.pt", weights_only=True)["meta"]
    assert meta["precision"] == "bf16" and meta["device"]["device"] == "cpu"


def test_fp16_keeps_its_gradient_scaler_and_resumes_exactly(tmp_path):
    straight = run(write_config(tmp_path, "straight", device="cpu", precision="fp16"))
    assert straight["scaler"]["_growth_tracker"] == 4 and straight["scaler"]["scale"] > 0
    path = write_config(tmp_path, "resumed", device="cpu", precision="fp16")
    half = run(path, steps=2)
    assert half["step"] == 2 and half["scaler"]["_growth_tracker"] == 2
    resumed = run(path)
    assert resumed["step"] == 4 and resumed["scaler"] == straight["scaler"]
    assert_same_weights(resumed, straight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_an_absent_gpu_is_one_line_and_writes_nothing(tmp_path, capsys, device):
    config = write_config(tmp_path)
    assert main(["train", "--config", str(config), "--device", device, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: [train]: device" in err and "CUDA is not available" in err
    assert not (tmp_path / "run").exists()


def test_resume_moves_between_devices_but_not_precisions(tmp_path, capsys):
    """An interrupted run (4 of 6 steps) resumes with another device setting and ends where an uninterrupted
    run ends (bit for bit on the CPU; "auto" is a GPU where there is one); a precision change is refused with
    one line naming it."""
    straight = run(write_config(tmp_path, "straight", device="cpu", steps=6))
    path = write_config(tmp_path, "moved", device="cpu")
    assert run(path)["step"] == 4
    capsys.readouterr()
    moved = run(path, device="auto", steps=6)
    assert "at step 4" in capsys.readouterr().out
    assert_same_weights(moved, straight, atol=1e-3 if torch.cuda.is_available() else 0.0)
    assert main(["train", "--config", str(path), "--precision", "bf16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs in train.precision ('fp32' saved, 'bf16' now)" in err


def test_a_state_from_before_the_precision_setting_resumes_as_fp32(tmp_path):
    path = write_config(tmp_path, steps=2)
    state = run(path)
    for key in ("device", "precision"):
        del state["config"]["train"][key]
    del state["scaler"]
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(UserError, match=r"differs in train\.precision \('fp32' saved, 'bf16' now\)"):
        run(path, steps=4, precision="bf16")
    assert run(path, steps=4)["step"] == 4


@pytest.mark.parametrize("task", ["uvit", "uvit-conditional", "adadiff-official", "adadiff-probe-per-exit",
                                  "adadiff-timestep", "adadiff-attention"])
def test_the_training_losses_make_no_tensor_off_the_models_device(tmp_path, tiny_checkpoint, task):
    """With the model and the batch on the "meta" device, a tensor a task makes on the CPU (without the model's
    device) fails to mix with them, as it would on a GPU; the noise it draws on the CPU is moved."""
    config = load_train_config(write_config(tmp_path, adadiff_base=tiny_checkpoint if "adadiff" in task else None))
    if task.startswith("adadiff-"):
        estimator, *heads = task.removeprefix("adadiff-").split("-", 1)
        config.task_config = dataclasses.replace(config.task_config, estimator=estimator,
                                                 heads=heads[0] if heads else "shared")
    if task == "uvit-conditional":
        config.model = dataclasses.replace(config.model, num_classes=10)
    made = training.training_task(config, alphas_cumprod())
    made.model.to("meta")
    x0 = torch.zeros(4, TINY.in_chans, TINY.img_size, TINY.img_size, device="meta")
    y = torch.arange(4, device="meta") if task == "uvit-conditional" else None
    loss = made.loss(x0, y, torch.Generator().manual_seed(0))
    assert loss.device.type == "meta" and loss.dim() == 0


class Recorder(torch.nn.Module):
    """A frozen module that notes where train() moves it (and is on the device the loss sees)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.moved_to = []

    def to(self, *args, **kwargs):
        self.moved_to.append(torch.device(*args))
        return super().to(*args, **kwargs)


def task_with_a_frozen_module(tmp_path, monkeypatch) -> tuple[Recorder, list]:
    """train() runs a one-parameter task whose loss also uses a frozen module; its exports are noted."""
    frozen, exported = Recorder(), []

    def make_task(config, alpha_bar):
        scale = torch.nn.Linear(1, 1)

        def loss(x0, y, generator):
            assert frozen.weight.device == x0.device == scale.weight.device
            return (scale(x0.mean().view(1, 1)) * frozen.weight - 1).pow(2).mean()

        def export(path, ema, meta, half):
            exported.append({name: value.device for name, value in ema.state_dict().items()})
        return training.Task(scale, loss, export, TINY, frozen=(frozen,))

    monkeypatch.setattr(training, "training_task", make_task)
    return frozen, exported


def test_the_frozen_modules_follow_the_model_and_the_export_gets_the_ema_on_the_cpu(tmp_path, monkeypatch):
    frozen, exported = task_with_a_frozen_module(tmp_path, monkeypatch)
    run(write_config(tmp_path, device="cpu"))
    assert frozen.moved_to == [torch.device("cpu")]
    assert exported == [{"weight": torch.device("cpu"), "bias": torch.device("cpu")}]


# ---- a GPU ----------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_loads_on_the_cpu_and_resumes(tmp_path, losses, capsys, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    on_cpu = run(write_config(tmp_path, "cpu", device="cpu", steps=6))
    cpu_curve, losses[:] = torch.stack(losses), []
    path = write_config(tmp_path, "cuda", device="cuda", precision=precision)
    run(path)
    # everything saved holds CPU tensors (read back without map_location, they would land on the GPU otherwise)
    state = torch.load(tmp_path / "cuda" / "last.pt", weights_only=True)
    tensors = [*state["model"].values(), *state["ema"].values(),
               *(t for s in state["optimizer"]["state"].values() for t in s.values())]
    assert all(t.device.type == "cpu" for t in tensors) and torch.isfinite(torch.stack(losses)).all()
    model = load_model(tmp_path / "cuda" / "ema.pt")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    meta = torch.load(tmp_path / "cuda" / "ema.pt", weights_only=True)["meta"]
    assert meta["device"]["device"].startswith("cuda") and "gpu_name" in meta["device"]
    assert meta["precision"] == precision
    # the same batches and noise as on the CPU: the first loss (same initial weights) agrees
    tolerance = 5e-3 if precision == "fp32" else 5e-2
    assert torch.allclose(losses[0], cpu_curve[0], rtol=tolerance), (losses[0], cpu_curve[0])
    # resume on the GPU from the saved step: two more steps, with the saved optimiser state and generator
    capsys.readouterr()
    resumed = run(path, steps=6)
    assert "at step 4" in capsys.readouterr().out and resumed["step"] == 6 and len(losses) == 6
    saved_adam_steps = [int(s["step"]) for s in state["optimizer"]["state"].values()]
    adam_steps = [int(s["step"]) for s in resumed["optimizer"]["state"].values()]
    assert all(n > saved for n, saved in zip(adam_steps, saved_adam_steps))  # (fp16 may skip an overflowing step)
    assert precision == "fp16" or set(adam_steps) == {6}
    assert torch.allclose(losses[4], cpu_curve[4], rtol=tolerance), (losses[4], cpu_curve[4])  # the same batch
    assert_same_weights(resumed, on_cpu, atol=0.01)


@needs_cuda
def test_adadiff_trains_on_cuda(tmp_path, tiny_checkpoint, losses):
    path = write_config(tmp_path, adadiff_base=tiny_checkpoint, device="cuda", precision="bf16"
                        if torch.cuda.is_bf16_supported() else "fp16")
    state = run(path)
    assert state["step"] == 4 and torch.isfinite(torch.stack(losses)).all()
    net = load_adadiff(tmp_path / "run" / "ema.pt")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in net.parameters())


@needs_cuda
def test_the_frozen_modules_train_on_cuda_and_the_export_gets_the_ema_on_the_cpu(tmp_path, monkeypatch):
    frozen, exported = task_with_a_frozen_module(tmp_path, monkeypatch)
    state = run(write_config(tmp_path, device="cuda"))
    assert frozen.moved_to[0].type == "cuda" and frozen.weight.device.type == "cuda" and state["step"] == 4
    assert exported == [{"weight": torch.device("cpu"), "bias": torch.device("cpu")}]
