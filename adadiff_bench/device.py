"""Where the network runs and in what precision: the `device` and `precision` settings.

`device`: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N". Under torchrun each
rank takes `cuda:LOCAL_RANK`. A GPU that is asked for and absent is a `UserError`, raised before
anything is written.

`precision`: "fp32", "bf16" or "fp16". Reduced precision is autocast around the network alone; the
solver's arithmetic, the step log and the metrics stay in fp32.

Randomness never depends on the device: every draw is made by a CPU generator and then moved
(`to_device`), so a sample's noise is the same on the CPU and on any GPU.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re

import numpy as np
import torch

from .config import check_device_spec
from .errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(spec: str, where: str = "device") -> torch.device:
    """The torch device `spec` names on this machine; a CUDA device that is absent is a UserError.

    Under torchrun (WORLD_SIZE > 1) "auto" and "cuda" mean cuda:LOCAL_RANK."""
    check_device_spec(spec, where)
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{where}: device {spec!r} asks for a GPU but CUDA is not available here "
                        f"({cuda_absence()}); set device = \"cpu\" or \"auto\", or run on a machine with a GPU")
    index = int(spec.split(":")[1]) if ":" in spec else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"{where}: device cuda:{index} does not exist (this machine has {count} GPU"
                        f"{'s' if count != 1 else ''}: cuda:0..cuda:{count - 1}); pick one of those")
    torch.cuda.set_device(index)  # (nccl and the CUDA-event timing use the current device)
    return torch.device("cuda", index)


def wants_cuda(spec: str) -> bool:
    """Whether a `device` setting would run on CUDA here (what picks torchrun's backend before anything loads)."""
    return spec != "cpu" and torch.cuda.is_available()


def cuda_absence() -> str:
    """Why CUDA is unavailable, in a few words."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no usable GPU or driver"


def check_precision_on(precision: str, device: torch.device, where: str) -> None:
    """bf16 needs a GPU that has it (Ampere or newer); on the CPU every precision runs (slowly for fp16)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{where}: precision bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                        "use fp16 or fp32")


def autocast(device: torch.device, precision: str):
    """Autocast to `precision` on `device` for the network's forward (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A CPU-made tensor (noise, labels, indices) moved to `device`; None stays None."""
    if tensor is None or tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())


def rows_on(rows, device: torch.device) -> torch.Tensor:
    """Host row numbers (a CPU tensor or a NumPy array) as an index on `device`: on a GPU pinned and copied
    without waiting, so compaction adds no synchronisation to the one read of a mask."""
    index = torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index.to(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's weights live on (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def set_deterministic(device: torch.device, deterministic: bool) -> dict:
    """Ask torch for deterministic kernels when `deterministic` (cuBLAS workspace, no cuDNN autotuning,
    no TF32); returns the settings as recorded in run.json."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return {"deterministic": deterministic,
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def device_info(device: torch.device) -> dict:
    """What run.json records about the device: its name and, on CUDA, the GPU, driver and CUDA versions."""
    info = {"device": str(device), "torch_cuda": torch.version.cuda}
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update({"gpu_name": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "compute_capability": f"{props.major}.{props.minor}", "driver": cuda_driver_version(),
                 "cudnn": torch.backends.cudnn.version()})
    return info


def short_device_name(info: dict) -> str:
    """A `device_info` record in a word or two: the GPU's name on CUDA, else the torch device."""
    return str(info.get("gpu_name") or info.get("device") or "cpu")


def device_name(device: torch.device) -> str:
    """A short name for results rows: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def cuda_driver_version() -> str | None:
    """The NVIDIA driver's version, from the driver library (None where it cannot be read)."""
    try:
        import pynvml  # noqa: PLC0415 (optional)
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 (pynvml missing or no NVML: fall back to /proc)
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module\s+(\S+)", f.read())
            return match.group(1) if match else None
    except OSError:
        return None
