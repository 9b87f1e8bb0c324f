"""Where and how models run: device choice, mixed precision, seeding, and a description of the hardware."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch


class DeviceError(RuntimeError):
    """The requested device is not available here."""


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device to run on: `auto` (or None) a CUDA GPU where one is visible, else the CPU; `cpu`,
    `cuda`, `cuda:N` or a `torch.device`. A name torch does not know, a kind this package does not run
    on, or a GPU asked for where there is none is a `DeviceError` that says what to pass."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from err
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} was requested but no CUDA GPU is visible; use cpu or auto")
    return device


# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") that mean native bf16 arithmetic.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's `key: value` lines of Linux's CPU description (read once); {} where there
    is none to read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the blank line after the first processor's block
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (x86 "flags", Arm "Features"); None where there is
    no such list to read."""
    fields = cpuinfo_fields(cpuinfo)
    listed = fields.get("flags", fields.get("Features"))
    return frozenset(listed.split()) if listed is not None else None


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX, Arm's BF16). oneDNN's
    own check also says yes for AVX-512 without them, where bf16 is emulated: a ResNet-50 then runs at a
    third of its fp32 speed (benchmarks/bench_inference.py: 23.1 against 65.2 images/s at 128 px on 2
    cores of such a Xeon), so where Linux lists the flags they must show it too."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    flags = cpu_flags()
    return flags is None or bool(flags & NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` becomes bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32; a precision
    asked for is kept, except fp16 on a CPU: a `DeviceError` saying what to pass (`cpu_fp16_refusal`)."""
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError(cpu_fp16_refusal())
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_fp16_refusal() -> str:
    """Why fp16 is refused on a CPU: PyTorch's CPU fp16 kernels are mostly emulated (a tiny training run
    took 74 s an epoch against 1-2 s in fp32) and its loss scaling (GradScaler) works on GPUs only, so
    small gradients underflow too. `auto` never picks it there; bf16 is the CPU's half precision."""
    if cpu_has_bf16():
        instead = "--precision bf16 (native on this CPU), fp32 or auto"
    else:
        instead = "--precision fp32 or auto (this CPU has no native bf16: bf16 would be emulated too)"
    return (
        "--precision fp16 runs on a CUDA GPU only (on a CPU it is emulated, ~50x slower, and has no loss "
        f"scaling): pass {instead}"
    )


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the autocast context, so loops contain no precision branches."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def onnx_session(
    path: Path | str,
    *,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> Any:
    """An ONNX Runtime session for a model file (exported age models, YuNet): `threads` intra-op
    threads (None: ONNX Runtime's choice), on `providers` (default: CUDA where available, else CPU).
    ImportError where ONNX Runtime is not installed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=list(providers))


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch with `seed` (a run's --seed plus the process's rank). numpy's seed
    is 32-bit, so a seed past 2**32 - 1 (the highest --seed on a process of rank > 0) wraps there."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def hardware_summary(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = cpuinfo_fields().get("model name") or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
