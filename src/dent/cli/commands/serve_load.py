"""``dent serve-load``: a bounded load test of ``dent serve`` (throughput, latency percentiles, batch sizes,
memory against concurrency), for several defenses in one run (docs/serving.md, README "Serving")."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from dent.cli.command import add_config_arguments, command
from dent.cli.commands.serve import SERVE_PACKAGES
from dent.errors import DentError
from dent.serving.config import ServeConfig

#: The defenses dent serve-load knows by name: the config entry and the isolation policy it is served under.
#: dent+ is served sample-wise (without the diversity term that couples batch-mates, as cfgs/serve.yaml);
#: batch-wise dent under ``shared``, the only policy under which its batches mix requests as the others' do
#: (``client`` makes every batch one request: there would be no batching to measure).
DEFENSES: dict[str, tuple[dict, str]] = {
    "static": ({"steps": 0}, "sample"),
    "dent+_k1": ({"preset": "dent_plus_bsi", "diversity_weight": 0.0, "steps": 1}, "sample"),
    "dent+_k6": ({"preset": "dent_plus_bsi", "diversity_weight": 0.0, "steps": 6}, "sample"),
    "dent": ({"preset": "dent"}, "shared"),
}
DEFAULT_REQUESTS = 40


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse


def requests_entry(text: str) -> tuple[str | None, int]:
    """``N`` (every defense) or ``NAME=N`` (one defense)."""
    name, _, count = text.rpartition("=")
    if name and name not in DEFENSES:
        raise argparse.ArgumentTypeError(f"unknown defense {name!r} in {text!r}; known: {', '.join(DEFENSES)}")
    return name or None, at_least(1)(count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)  # the service's config, as for dent serve (each defense replaces its `defense`)
    parser.add_argument("--defenses", nargs="+", choices=list(DEFENSES), metavar="NAME",
                        help=f"the defenses to serve and measure, in order (default: all of {', '.join(DEFENSES)}; "
                        "the ratios are to static's figures)")
    parser.add_argument("--url", help="measure the service already running at URL instead of starting services")
    parser.add_argument("--concurrency", nargs="+", type=at_least(1), default=[1, 4, 16], metavar="C",
                        help="requests in flight at once, one level each (default: 1 4 16)")
    parser.add_argument("--requests", nargs="+", type=requests_entry, default=[], metavar="N|NAME=N",
                        help=f"requests per level: N for every defense, NAME=N for one (default: {DEFAULT_REQUESTS})")
    parser.add_argument("--images", type=at_least(1), default=1, help="images per request (default: 1)")
    parser.add_argument("--images-from", choices=("cifar10", "random"), default="cifar10",
                        help="CIFAR-10 test images (default; found as for every command) or uniform random ones")
    parser.add_argument("--warmup", type=at_least(0), default=2,
                        help="uncounted requests first, one at a time, per service (default: 2)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")


def serve_overrides(name: str) -> list[str]:
    """The ``dent serve`` overrides that serve the named defense under its policy, on this machine only."""
    defense, isolation = DEFENSES[name]
    shared = ["serve.allow_shared", "true"] if isolation == "shared" else []
    return [f"defense={json.dumps(defense)}", "serve.isolation", isolation, *shared, "serve.host", "127.0.0.1"]


def test_images(source: str, n: int) -> torch.Tensor:
    if source == "random":
        return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from dent.data import load_subset

    return load_subset("cifar10", "test", n=n).images


def precision(cfg: ServeConfig) -> str:
    autocast = getattr(cfg.defense, "autocast", "none")  # a DentConfig's; other kinds run the model as it is
    return "float32" if autocast == "none" else f"autocast {autocast}"


def settings_text(args: argparse.Namespace, names: list[str]) -> str:
    """The services' settings, from their configs (each checked here, before the first service starts)."""
    configs = [ServeConfig.load(args.cfg, [*args.overrides, *serve_overrides(name)]) for name in names]
    serve = configs[0].serve
    defenses = "; ".join(f"{name} {json.dumps(DEFENSES[name][0])} under isolation {DEFENSES[name][1]}"
                         for name in names)
    return (f"model {configs[0].model.arch}, precision {', '.join(sorted({precision(c) for c in configs}))}; "
            f"max_batch {serve.max_batch}, max_wait_ms {serve.max_wait_ms:g}, queue_size {serve.queue_size}; "
            f"{defenses}")


@command("serve-load", "load-test dent serve: throughput, latency percentiles and batch sizes against concurrency",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    try:
        from dent.serving import loadtest
    except ImportError as exc:
        if exc.name not in (*SERVE_PACKAGES, "httpx"):
            raise
        raise DentError(f"dent serve-load needs the serve extra (missing module {exc.name!r}): "
                        "pip install -e '.[serve]'") from None
    if args.url and (args.defenses or args.cfg or args.overrides):
        raise DentError("--url measures the service already running there; --defenses, --cfg and overrides "
                        "configure the services dent serve-load starts itself")
    if args.url and not loadtest.healthy(args.url):
        raise DentError(f"no service answers {args.url}/healthz: start one with dent serve, or leave out --url")
    names = ["service"] if args.url else args.defenses or list(DEFENSES)
    given = dict(args.requests)
    counts = {name: given.get(name, given.get(None, DEFAULT_REQUESTS)) for name in names}
    settings = f"the service at {args.url}" if args.url else settings_text(args, names)
    bodies = loadtest.request_bodies(test_images(args.images_from, max(counts.values()) * args.images), args.images)

    def measure(name: str, url: str, pid: int | None = None) -> list:
        return loadtest.measure(url, name, bodies, args.images, args.concurrency, counts[name], pid, args.warmup)

    if args.url:
        levels = measure("service", args.url)
    else:
        levels = []
        for name in names:  # one service at a time: each has the machine to itself (but for other jobs)
            print(f"dent serve-load: {name}, {counts[name]} requests per level ...", flush=True)
            with loadtest.spawned_service(args.cfg, [*args.overrides, *serve_overrides(name)]) as (url, pid):
                levels += measure(name, url, pid)
    report = "\n\n".join([
        f"dent serve-load, {loadtest.machine_text()}",
        f"{settings}; concurrency {' '.join(map(str, args.concurrency))}; requests per level "
        f"{', '.join(f'{n} {c}' for n, c in counts.items())}; {args.images} image(s) per request from "
        f"{args.images_from}; {args.warmup} warm-up request(s) per service, not counted",
        loadtest.format_table(levels),
    ])
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0
