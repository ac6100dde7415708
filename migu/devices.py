"""Where this process runs: the launcher's environment, the device, the precision and its autocast.

Nothing here needs a process group; migu.distributed re-exports every name. Imports only torch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def launched_world_size() -> int:
    """WORLD_SIZE set by the launcher (torchrun, accelerate launch), 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def resolve_device(setting: str = "auto") -> torch.device:
    """`auto`: cuda:LOCAL_RANK when CUDA is available, else cpu; `cpu`; `cuda` (error if unavailable)."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from migu.config import ConfigError  # lazily: this module depends on torch alone

        raise ConfigError("train.device=cuda: no CUDA device is available (use auto or cpu)")
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cpu_has_bf16(flags: Optional[set] = None, mkldnn_bf16: Optional[bool] = None) -> bool:
    """Whether this CPU runs bfloat16 matmuls natively: an AMX-bf16 or AVX512-bf16 flag and oneDNN's bf16 path.

    On CPUs without those flags (AVX2, plain AVX-512) oneDNN emulates bf16 and autocast is slower than fp32.
    `flags` (from /proc/cpuinfo) and `mkldnn_bf16` are read from the machine when None (tests pass them).
    """
    if flags is None:
        flags = set()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
    if mkldnn_bf16 is None:
        try:
            mkldnn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            mkldnn_bf16 = False
    return mkldnn_bf16 and bool({"amx_bf16", "avx512_bf16"} & set(flags))


def resolve_precision(setting: str, device: torch.device, cuda_bf16: Optional[bool] = None,
                      cpu_bf16: Optional[bool] = None) -> str:
    """`train.precision` as it runs: `auto` → bf16 on a CUDA GPU with bf16 or a CPU with bf16 kernels, else fp32.

    Other settings are returned unchanged. `cuda_bf16` / `cpu_bf16` override the detection (tests).
    """
    if setting != "auto":
        return setting
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    elif device.type == "cpu":
        ok = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
    else:
        ok = False
    return "bf16" if ok else "fp32"


def resolve_attention(setting: str, device: torch.device, precision: str) -> Optional[str]:
    """`model.attention` as it runs: `auto` → `eager` on a CPU under bf16, None (the model's default) elsewhere.

    On CPU, torch's flash-attention kernel is slow in bf16 backward (50 ms a layer for SmolLM2 at 8 × 128
    tokens, more than its MLP); the plain matmul attention is faster there, and slower in fp32.
    """
    if setting != "auto":
        return setting
    return "eager" if device.type == "cpu" and precision == "bf16" else None


def precision_problem(precision: str, device: torch.device) -> Optional[str]:
    """Why `precision` cannot run on `device` (one line naming the key), or None."""
    if precision == "fp16" and device.type != "cuda":
        return (f"train.precision=fp16: float16 autocast needs a CUDA device (this run is on {device.type}; "
                "CPU has no loss scaling for fp16); use train.precision=bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "train.precision=bf16: this GPU does not support bfloat16; use train.precision=fp16 or fp32"
    return None


def launched_rank() -> int:
    """RANK set by the launcher (0 without one); valid before and after the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def autocast(device: torch.device, precision: str):
    """torch.autocast for bf16/fp16 on `device`; a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _accelerate_engine() -> Optional[str]:
    """`accelerate launch` with a DeepSpeed / FSDP accelerate config exports these; the runner uses DDP."""
    for var, engine in (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return f"{var}={os.environ[var]} ({engine})"
    return None
