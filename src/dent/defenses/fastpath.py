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


@contextmanager
def channels_last_weights(model: nn.Module, cache: dict[int, tuple[int, Tensor]]) -> Iterator[None]:
    """The 4-D parameters of ``model`` laid out channels-last for the block (same values), restored after.

    The copies are kept in ``cache`` (parameter id -> (its version, the copy)) and redone when a
    parameter was changed in place, so the wrapped model is never modified and a call copies nothing.
    Only ``.data`` is swapped: the parameters do not require grad while Dent runs.
    """
    swapped = []
    try:
        for param in model.parameters():
            if param.dim() != 4 or param.is_contiguous(memory_format=torch.channels_last):
                continue
            entry = cache.get(id(param))
            if entry is None or entry[0] != param._version:
                entry = (param._version, param.detach().contiguous(memory_format=torch.channels_last))
                cache[id(param)] = entry
            swapped.append((param, param.data))
            param.data = entry[1]
        yield
    finally:
        for param, data in swapped:
            param.data = data


def _fastest_seconds(call: Callable[[], object], repeats: int = 2) -> float:
    call()  # warm-up: oneDNN builds its kernels for a new shape and layout
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def faster_memory_format(step: Callable[[Tensor], Tensor], model: nn.Module, cache: dict[int, tuple[int, Tensor]],
                         x: Tensor, learns: bool) -> dict[str, object]:
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

    contiguous = _fastest_seconds(run(x.contiguous()))
    with channels_last_weights(model, cache):
        channels_last = _fastest_seconds(run(x.contiguous(memory_format=torch.channels_last)))
    return {"format": "channels_last" if channels_last < contiguous else "contiguous",
            "contiguous_s": contiguous, "channels_last_s": channels_last}
