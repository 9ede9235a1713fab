"""Process-level runtime choices: the compute device, seeding, deterministic kernels, and the CPU memory allocator."""

from __future__ import annotations

import ctypes
import functools
import ctypes.util
import os
import random

import numpy as np
import torch

from dent.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ConfigError(f"device {name!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> bool:
    """Make this process choose deterministic kernels, so the same command on the same machine stores the same
    per-point results; ``DENT_DETERMINISTIC=0`` turns it off. Returns whether it is on.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a deterministic
    implementation warns instead of failing), oneDNN's deterministic mode, cuDNN's deterministic kernels
    without autotuning, and the cuBLAS workspace that deterministic CUDA matrix products need (only where it
    is not set yet; it takes effect if no CUDA work ran before). It does not make results equal across
    machines: other CPU capabilities (AVX2 vs AVX-512), thread counts or GPUs sum in another order
    (docs/evaluation.md, "Determinism").
    """
    choice = os.environ.get("DENT_DETERMINISTIC", "1").strip().lower() or "1"
    if choice not in ("1", "0", "true", "false", "on", "off"):
        raise ConfigError(f"DENT_DETERMINISTIC={choice!r}: expected 1 (the default) or 0")
    enabled = choice in ("1", "true", "on")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.mkldnn.deterministic = enabled
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return enabled


#: Set by :func:`tune_cpu_allocator`: whether glibc's malloc was told to keep freed memory for reuse.
CPU_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS (Linux/glibc only).

    By default glibc serves allocations of 32 MB and more (one ResNet-18 activation at batch 128) with fresh
    ``mmap`` pages and returns large freed blocks to the OS, so every training-mode forward/backward pass
    page-faults its activations in again: measured on 2 CPU cores at batch 128, about 0.5 million page faults
    and a quarter of a dent call's time (docs/performance.md). Raising the mmap and trim thresholds lets freed
    blocks be reused; the process keeps its peak heap. The ``dent`` command line calls this at start;
    ``DENT_CPU_ALLOCATOR=default`` turns it off (``tuned``, the default, keeps it on). Returns whether the settings were applied.
    """
    global CPU_ALLOCATOR_TUNED
    choice = os.environ.get("DENT_CPU_ALLOCATOR", "tuned").strip().lower() or "tuned"
    if choice not in ("tuned", "default"):
        raise ConfigError(f"DENT_CPU_ALLOCATOR={choice!r}: expected 'tuned' (the default) or 'default'")
    if choice == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    largest = ctypes.c_int(2**31 - 1)
    CPU_ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, largest)) and bool(mallopt(m_trim_threshold, largest))
    return CPU_ALLOCATOR_TUNED


def cpu_capability() -> dict[str, object]:
    """What this CPU offers torch: its ATen kernel level (``DEFAULT``, ``AVX2``, ``AVX512``...) and native bf16.

    ``bf16`` is true where the CPU has bf16 arithmetic instructions (AVX-512 BF16 or AMX) *and* oneDNN uses
    them (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); without them bf16 is emulated and far slower than
    float32 (measured 18x on an AVX2 CPU, docs/performance.md).
    """
    flags = {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())
             for name in ("avx512", "avx512_bf16", "amx_tile")}
    onednn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {"capability": torch.backends.cpu.get_cpu_capability(), **flags, "onednn_bf16": onednn_bf16,
            "bf16": onednn_bf16 and (flags["avx512_bf16"] or flags["amx_tile"])}


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes in bf16 natively (so bf16 autocast is faster there), and why."""
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
        return supported, f"{name}: torch.cuda.is_bf16_supported() = {supported}"
    if device.type == "cpu":
        cpu = cpu_capability()
        why = (f"CPU capability {cpu['capability']}, avx512_bf16 {cpu['avx512_bf16']}, amx {cpu['amx_tile']}, "
               f"oneDNN bf16 {cpu['onednn_bf16']}")
        return bool(cpu["bf16"]), why
    return False, f"device type {device.type!r}: native bf16 is detected on CPU and CUDA only"
