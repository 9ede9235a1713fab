"""Measuring one call: wall-clock time (with warm-up and repeats), peak memory, and a profiler breakdown."""

from __future__ import annotations

import statistics
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of each timed repeat (warm-up calls excluded): wall clock, and this process's CPU time.

    ``median`` is what tables report, of the wall clock or, with ``clock="cpu"``, of the CPU time: on a
    loaded machine with one torch thread, CPU time leaves out the time spent waiting for a core.
    ``paired``: the timings of a reference call made just before each repeat (see :func:`time_calls`).
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    clock: str = "wall"
    paired: "Timing | None" = None

    @property
    def seconds(self) -> list[float]:
        return self.cpu if self.clock == "cpu" else self.wall

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def record(self, call: Callable[[], Any], device: torch.device) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        synchronize(device)
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - start_cpu)

    def to_dict(self) -> dict[str, Any]:
        out = {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds),
               "clock": self.clock, "wall_s": self.wall, "cpu_s": self.cpu}
        if self.paired is not None:
            out["paired_median_s"] = self.paired.median
            out["paired_s"] = self.paired.seconds
        return out


def time_calls(call: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0,
               clock: str = "wall", paired: Callable[[], Any] | None = None) -> Timing:
    """Run ``call`` ``warmup`` times untimed, then ``repeats`` times timed (the device synchronized around each).

    ``paired``: a reference call (the static forward) timed right before each repeat, so that ratios to it
    compare calls made under the same conditions (machine load drifts over a long benchmark).
    """
    for _ in range(warmup):
        call()
    synchronize(device)
    timing = Timing(clock=clock, paired=None if paired is None else Timing(clock=clock))
    for _ in range(repeats):
        if paired is not None:
            timing.paired.record(paired, device)
        timing.record(call, device)
    return timing


#: Operators that launch no kernel, besides views: allocation and bookkeeping (left out of the operator count).
_NO_KERNEL = ("empty", "empty_strided", "_record_function_enter_new", "_record_function_exit", "lift_fresh")


class _TensorBytes(TorchDispatchMode):
    """Live bytes of the storages that operators create while active, their peak, and the operator count.

    Every new storage of an operator's output is counted once, from its creation until it is freed (a weak
    reference's finalizer), so the peak is that of the tensors a call allocates: activations, saved
    tensors, gradients, optimizer state. Tensors that existed before (weights, the input) and outputs that
    alias an input (views, in-place results) are not counted, nor are a library's internal workspaces
    (e.g. oneDNN scratch memory) or the allocator's caching.

    ``ops`` counts the operators that compute something (not views, allocations or bookkeeping): on a GPU,
    about the number of kernel launches, which is what per-call overhead scales with.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.ops = 0
        self._sizes: dict[int, int] = {}

    def _count(self, tensor: Any, inputs: set[int]) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # e.g. sparse or wrapper tensors
            return
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes or key in inputs:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        if func.overloadpacket.__name__ not in _NO_KERNEL:
            self.ops += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for tensor in tree_flatten(out)[0]:
            self._count(tensor, inputs)
        return out


def peak_memory(call: Callable[[], Any], device: torch.device) -> tuple[int, str, int]:
    """Peak bytes that one ``call`` allocates above what was allocated before it, how that was measured, and
    the number of operators it ran (see :class:`_TensorBytes`).

    CUDA: the caching allocator's peak of allocated bytes (``torch.cuda.max_memory_allocated``). Other
    devices: the peak of live tensor storages created during the call (:class:`_TensorBytes`). The call runs
    through a Python dispatch mode either way: slower, so never combined with timing.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with _TensorBytes() as tracker:
            result = call()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak, "cuda allocator peak", tracker.ops
    with _TensorBytes() as tracker:
        result = call()
        del result
    return tracker.peak, "tensor storages (dispatch mode)", tracker.ops


#: Profiler operator name fragments -> category of the breakdown (first match wins; order matters).
CATEGORIES = (
    ("optimizer math", ("_foreach", "lerp", "addcdiv", "sqrt", "reciprocal", "minimum")),
    ("conv backward", ("convolution_backward", "conv_backward", "convolution_transpose_backward")),
    ("conv forward", ("mkldnn_convolution", "cudnn_convolution", "_slow_conv2d", "thnn_conv", "conv_depthwise",
                      "_nnpack")),
    ("linear", ("addmm", "aten::mm", "aten::bmm", "matmul")),
    ("batchnorm backward", ("batch_norm_backward", "batchnorm_backward")),
    ("batchnorm forward", ("batch_norm", "batchnorm")),
    ("relu backward", ("threshold_backward",)),
    ("relu forward", ("relu", "clamp_min")),
    ("blur", ("replication_pad", "reflection_pad")),
    ("softmax/entropy", ("softmax", "logsumexp", "_log_softmax")),
    ("copy/alloc", ("copy_", "clone", "empty", "zeros", "cat", "fill_", "to_copy", "contiguous", "resize_",
                    "as_strided", "split", "view", "expand", "repeat")),
    ("elementwise", ("add", "mul", "sub", "div", "sum", "mean", "where", "exp", "neg", "pow")),
)


def categorize(name: str) -> str:
    for category, fragments in CATEGORIES:
        if any(fragment in name for fragment in fragments):
            return category
    return "other"


def profile_breakdown(call: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Self time (ms) per category of operator for one call, from :mod:`torch.profiler`.

    CPU: the operators' self CPU time; CUDA: their self device (kernel) time, plus the CPU time of the
    whole call, which shows launch and Python overheads. ``unattributed_ms`` is wall time that no
    operator accounts for (Python, the autograd engine's bookkeeping, waiting).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        call()
        synchronize(device)
    wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    optimizer_ms = 0.0
    for event in prof.key_averages():
        if event.key.startswith("Optimizer.step"):
            optimizer_ms += event.cpu_time_total / 1e3
            continue
        if event.key.startswith(("Optimizer.zero_grad", "ProfilerStep", "autograd::engine")):
            continue
        if device.type == "cuda":
            micros = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
        else:
            micros = event.self_cpu_time_total
        category = categorize(event.key)
        totals[category] += micros / 1e3
        calls[category] += event.count
    attributed = sum(totals.values())
    result = {
        "wall_ms": wall * 1e3,
        "categories_ms": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
        "calls": dict(calls),
        "optimizer_step_total_ms": optimizer_ms,
        "clock": "self device time" if device.type == "cuda" else "self CPU time",
    }
    if device.type != "cuda":
        result["unattributed_ms"] = max(wall * 1e3 - attributed, 0.0)
    return result
