"""Memory-format fast path of :class:`~dent.defenses.Dent`: channels-last convolutions, chosen by measurement.

oneDNN's convolutions run on channels-last (NHWC) tensors when the input or the weight is channels-last.
Whether that is faster depends on the CPU or GPU, the precision and the batch size (measured on one AVX-512
CPU at batch 16, one thread: fp32 0.143 s channels-last vs 0.131 s contiguous, bf16 0.039 s vs 0.059 s;
docs/performance.md), so ``memory_format='auto'`` times both on the first call with each input shape.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


#: Modules whose weights autocast computes in its lower precision (its "lower_precision_fp" ops).
AUTOCAST_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def _converted(param: Tensor, channels_last: bool, dtype: torch.dtype | None) -> Tensor:
    out = param.detach()
    if dtype is not None and out.dtype == torch.float32:  # what autocast casts (not float64)
        out = out.to(dtype)
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@contextmanager
def converted_weights(model: nn.Module, cache: dict[tuple, tuple[tuple, Tensor]], channels_last: bool,
                      dtype: torch.dtype | None) -> Iterator[None]:
    """The weights of ``model``'s convolutions and linear layers, for the block: their 4-D ones laid out
    channels-last (``channels_last``) and all of them cast to ``dtype`` (the autocast dtype: autocast would
    cast them again in every forward, since it caches only casts of tensors that require grad). The same
    values as autocast's own casts; restored after the block.

    The copies are kept in ``cache`` ((parameter id, layout, dtype) -> (its version and storage, the copy)) and
    redone when a parameter was changed in place or replaced, so the wrapped model is never modified and a
    call copies nothing.
    Only ``.data`` is swapped: the parameters do not require grad while Dent runs.
    """
    swapped = []
    try:
        if channels_last or dtype is not None:
            for module in model.modules():
                if not isinstance(module, AUTOCAST_MODULES):
                    continue
                for param in module.parameters(recurse=False):
                    key, source = (id(param), channels_last, dtype), (param._version, param.data_ptr())
                    entry = cache.get(key)
                    if entry is None or entry[0] != source:  # changed in place, or moved (e.g. .to(device))
                        entry = cache[key] = (source, _converted(param, channels_last, dtype))
                    swapped.append((param, param.data))
                    param.data = entry[1]
        yield
    finally:
        for param, data in reversed(swapped):
            param.data = data


def _fastest_seconds(call: Callable[[], object], repeats: int = 2) -> float:
    call()  # warm-up: oneDNN builds its kernels for a new shape and layout
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def faster_memory_format(step: Callable[[Tensor], Tensor], model: nn.Module, cache: dict[tuple, tuple[tuple, Tensor]],
                         x: Tensor, learns: bool, dtype: torch.dtype | None) -> dict[str, object]:
    """``format``: ``'channels_last'`` or ``'contiguous'``, whichever runs one adaptation step (``step(x)``'s
    forward and backward, or with nothing to learn the forward alone) faster on ``x``; ``contiguous_s`` and
    ``channels_last_s``: the fastest of 2 timed runs of each (after one untimed)."""

    def run(inputs: Tensor) -> Callable[[], None]:
        def call() -> None:
            with torch.enable_grad() if learns else torch.no_grad():
                loss = step(inputs)
                if learns:
                    loss.backward()  # into the adapted tensors' .grad, which the next step's zero_grad clears
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)

        return call

    with converted_weights(model, cache, False, dtype):
        contiguous = _fastest_seconds(run(x.contiguous()))
    with converted_weights(model, cache, True, dtype):
        channels_last = _fastest_seconds(run(x.contiguous(memory_format=torch.channels_last)))
    return {"format": "channels_last" if channels_last < contiguous else "contiguous",
            "contiguous_s": contiguous, "channels_last_s": channels_last}
