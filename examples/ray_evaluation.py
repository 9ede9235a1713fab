"""One evaluation run locally and on Ray (1 and 2 workers): wall time, Ray's overhead, identical results.

A small BatchNorm convnet and random 16x16 images labelled by it, batch-wise dent (1 step) and the static model
under a 2-iteration APGD-CE + APGD-T: tens of units of a fraction of a second each, so what Ray adds per unit
shows. Ray's overhead is its wall time beyond the local executor's (worker start, shipping the model and data,
one call per unit), spread over the units; the script also times a bare call round trip to a worker.

    python examples/ray_evaluation.py [--images 96] [--workers 1,2] [--address ADDRESS] [--out DIR]

Needs the Ray extra (pip install -e ".[ray]"). Without --address it starts a local Ray instance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dent.evaluation.config import EvaluateConfig
from dent.evaluation.executors import QUIET_DRIVER, import_ray, local_instance_options
from dent.evaluation.runner import evaluate
from dent.evaluation.store import ResultStore
from dent.provenance import cpu_model_name, numerics_description

BATCH = 8
DEFENSES = {"defenses": {"static": {"steps": 0}, "dent": {"steps": 1, "lr": 0.01}}}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10)).eval()


class Data:
    def __init__(self, model: nn.Module, n: int):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.labels = model(self.images).argmax(1)


def config(n_images: int, executor: list[str]) -> EvaluateConfig:
    return EvaluateConfig.load(None, [
        "device", "cpu", "data.n_images", str(n_images), "data.batch_size", str(BATCH), "evaluation.progress",
        "false", "attack.version", "custom", "attack.attacks", "[apgd-ce, apgd-t]", "attack.threats",
        "[Linf:8/255]", "attack.n_iter", "2", "attack.n_restarts", "1", "attack.n_target_classes", "1", *executor,
    ], file_defaults=DEFENSES)


def stored(run_dir: Path) -> tuple[dict[str, object], float]:
    """The per-point results by unit key (without timing notes) and the units' summed compute seconds."""
    with ResultStore(run_dir / "results.sqlite", create=False) as store:
        records = list(store.records())
    results = {r.key: {k: v for k, v in r.result.items() if k != "notes"} for r in records}
    return results, sum(r.seconds for r in records)


def round_trip_ms(ray, calls: int = 200) -> float:
    @ray.remote(num_cpus=1)
    class Echo:
        def ping(self, x):
            return x

    echo = Echo.remote()
    ray.get(echo.ping.remote(0))
    start = time.perf_counter()
    for i in range(calls):
        ray.get(echo.ping.remote(i))
    ms = 1000 * (time.perf_counter() - start) / calls
    ray.kill(echo)
    return ms


def measure(args: argparse.Namespace, out: Path) -> list[dict[str, object]]:
    model = small_net()
    data = Data(model, args.images)
    ray = import_ray()
    start = time.perf_counter()
    ray.init(**({**QUIET_DRIVER, "address": args.address} if args.address else local_instance_options(max(args.workers))))
    init_s = time.perf_counter() - start
    rows = []
    try:
        runs = [("local", 1, [])] + [("ray", w, ["evaluation.executor", "ray", "evaluation.ray.workers", str(w)])
                                     for w in args.workers]
        for executor, workers, overrides in runs:
            run_dir = out / f"{executor}-{workers}"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # each Ray worker (num_cpus 1) computes with one thread
            try:
                start = time.perf_counter()
                run = evaluate(config(args.images, overrides), model=model, data=data, run_dir=run_dir)
                wall = time.perf_counter() - start
            finally:
                torch.set_num_threads(threads)
            results, compute = stored(run_dir)
            rows.append({"executor": executor, "workers": workers, "units": run.n_run, "wall_s": wall,
                         "compute_s": compute, "results": results})
        call_ms = round_trip_ms(ray)
    finally:
        ray.shutdown()
    print(f"machine: {cpu_model_name()}, {os.cpu_count()} logical CPUs, CPU capability "
          f"{numerics_description('cpu').get('cpu_capability')}; load average {os.getloadavg()[0]:.2f} at the end; "
          f"torch {torch.__version__}, ray {ray.__version__}; fp32")
    print(f"evaluation: {args.images} images of 16x16, batches of {BATCH}, defenses static and dent (1 step), "
          f"AA-custom(apgd-ce, apgd-t) 2 iterations at Linf 8/255; ray.init {init_s:.1f} s (not in the walls)")
    local = rows[0]
    print("| executor | workers | units | wall (s) | units' own compute (s) | wall / local | extra per unit vs local "
          "(ms, worker start included) | results identical to local |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        extra = 1000 * (row["wall_s"] - local["wall_s"]) / row["units"]
        print(f"| {row['executor']} | {row['workers']} | {row['units']} | {row['wall_s']:.1f} | "
              f"{row['compute_s']:.1f} | {row['wall_s'] / local['wall_s']:.2f} | "
              f"{'-' if row is local else f'{extra:.0f}'} | {'yes' if row['results'] == local['results'] else 'NO'} |")
    print(f"bare round trip of one call to a Ray worker: {call_ms:.2f} ms")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help=f"images evaluated (a multiple of {BATCH})")
    parser.add_argument("--workers", default="1,2", help="the Ray worker counts to measure, comma-separated")
    parser.add_argument("--address", default="", help="a Ray cluster to join (default: a local instance)")
    parser.add_argument("--out", type=Path, help="where the run directories go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.images < BATCH or args.images % BATCH:
        parser.error(f"--images must be a positive multiple of {BATCH}, got {args.images}")
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers like 1,2, got {args.workers!r}")
    if any(w < 1 for w in args.workers):
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        measure(args, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    return 0 if all(row["results"] == rows[0]["results"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
