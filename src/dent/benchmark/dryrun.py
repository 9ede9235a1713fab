"""``dent bench --dry-run``: the timings a bench would take and a rough estimate of their cost, without timing.

A dent call at K steps costs at least 2K + 1 forward passes of the model (K forward + backward steps, one
prediction: the floor ``dent bench`` reports), so the estimate is that floor times one timed forward pass of
the model at each batch size; the fast paths, the naive reference and the official implementation are
counted at the same floor (an estimate to decide whether to run, not a measurement).
"""

from __future__ import annotations

import time

import torch

from dent.benchmark.config import BenchConfig
from dent.benchmark.runner import bench_data_name, bench_inputs, bench_model


def dry_run(cfg: BenchConfig) -> str:
    b = cfg.bench
    model, weights = bench_model(cfg)
    x, _ = bench_inputs(cfg, max(b.batch_sizes), bench_data_name(cfg))
    forward = {}
    with torch.no_grad():
        for batch in b.batch_sizes:
            start = time.perf_counter()
            model(x[:batch])
            forward[batch] = time.perf_counter() - start
    calls = b.warmup + b.repeats
    timed = [(mode, k, batch) for mode in b.modes for k in b.steps for batch in b.batch_sizes]
    seconds = sum(calls * (2 * k + 1) * forward[batch] for _, k, batch in timed)
    seconds += sum(calls * (2 * k + 1) * forward[batch] for mode, k, batch in timed if b.naive_for(mode, k))
    if b.official:
        seconds += sum(calls * (2 * k + 1) * forward[batch] for k in b.steps for batch in b.batch_sizes)
    fast = [mode for mode in b.modes if mode.endswith(("_fast", "_fast_prediction"))]
    per_image = forward[max(b.batch_sizes)] / max(b.batch_sizes)
    seconds += 2 * len(fast) * b.agreement_images * (2 * max(b.steps) + 1) * per_image  # each and its float32 twin
    lines = [
        "dry run: nothing was timed or written",
        f"model {weights}; {len(timed)} timed configurations ({', '.join(b.modes)} x K {b.steps} x batch "
        f"{b.batch_sizes}), {b.warmup} warm-up + {b.repeats} timed calls each"
        + (f"; the official implementation ({b.official})" if b.official else "")
        + (f"; agreement of {', '.join(fast)} with float32 on {b.agreement_images} images" if fast else ""),
        "one forward pass: " + ", ".join(f"batch {batch} {s:.3f} s" for batch, s in forward.items())
        + f" ({torch.get_num_threads()} threads)",
        f"estimate: {seconds / 60:.0f} min at the 2K + 1 forward-pass floor (profiles, memory and the attack "
        "gradients add to it)",
    ]
    return "\n".join(lines)
