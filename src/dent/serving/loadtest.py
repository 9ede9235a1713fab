"""A bounded load test of ``dent serve`` (``dent serve-load``, issue #19): throughput and latency against
concurrency, the batch sizes the batcher formed, and the service's peak memory.

At each concurrency level C, C asyncio workers of one ``httpx.AsyncClient`` share a fixed number of requests:
each sends one, waits for its answer, sends the next, until none is left (a closed loop: C requests in flight at
most), so a level always stops by itself. Latency is measured by the client, from sending a request to reading
its answer. The batches are reconstructed from every answer's ``batch_images`` and ``batch_requests``: a batch
of r requests is seen by r answers, so each answer counts 1/r of its batch (exact while this client is the
service's only one). The service's memory is its ``VmHWM`` (peak resident set since it started) from
``/proc/<pid>/status``, read after each level.

:func:`measure` targets a service by URL; :func:`spawned_service` starts ``dent serve`` in a subprocess for one
defense, so that several defenses are measured in one invocation on the same machine state.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator, Optional, Sequence

import httpx
import numpy as np
import torch

from dent.errors import DentError
from dent.provenance import cpu_model_name

@dataclass
class Level:
    """What one concurrency level measured."""

    defense: str
    concurrency: int
    requests: int
    images_per_request: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the answered (200) requests, in seconds
    errors: Counter = field(default_factory=Counter)  # status code (or transport error) -> count
    batches: Counter = field(default_factory=Counter)  # images per batch -> batches formed
    peak_rss_mib: Optional[float] = None
    load_average: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def throughput(self) -> float:
        """Answered requests per second."""
        return self.answered / self.seconds

    def percentile(self, q: float) -> float:
        """The q-th percentile of the answered requests' latencies, in ms (linear interpolation)."""
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


def request_bodies(images: torch.Tensor, per_request: int) -> list[bytes]:
    """JSON bodies of ``per_request`` images each, encoded once (the client's own cost stays off the clock)."""
    return [json.dumps(chunk.tolist()).encode() for chunk in images.split(per_request) if len(chunk) == per_request]


async def _send(client: httpx.AsyncClient, url: str, body: bytes, level: Level) -> None:
    """One request: its latency, or its error, and its share of the batch that answered it."""
    started = time.perf_counter()
    try:
        response = await client.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
    except httpx.TransportError as exc:
        level.errors[type(exc).__name__] += 1
        return
    if response.status_code != 200:
        level.errors[str(response.status_code)] += 1
        return
    level.latencies.append(time.perf_counter() - started)
    meta = response.json()["metadata"]
    level.batches[meta["batch_images"]] += 1 / meta["batch_requests"]


async def _run_level(url: str, bodies: Sequence[bytes], level: Level, timeout_s: float) -> None:
    sent = iter(range(level.requests))  # shared by the workers: every request is sent exactly once

    async def worker(client: httpx.AsyncClient) -> None:
        for i in sent:
            await _send(client, url, bodies[i % len(bodies)], level)

    limits = httpx.Limits(max_connections=level.concurrency, max_keepalive_connections=level.concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(level.concurrency)))
        level.seconds = time.perf_counter() - started


def peak_rss_mib(pid: Optional[int]) -> Optional[float]:
    """The process's peak resident set since it started (``VmHWM``, Linux), in MiB; None where unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure(url: str, defense: str, bodies: Sequence[bytes], images_per_request: int, concurrency: Sequence[int],
            requests: int, pid: Optional[int] = None, warmup: int = 2, timeout_s: float = 120.0) -> list[Level]:
    """Every concurrency level, in order, against the service at ``url`` (``pid``: its process, for memory),
    after ``warmup`` requests one at a time that are not counted (the first calls are slower)."""
    asyncio.run(_run_level(url, bodies, Level(defense, 1, warmup, images_per_request), timeout_s))
    levels = []
    for c in concurrency:
        level = Level(defense, c, requests, images_per_request)
        asyncio.run(_run_level(url, bodies, level, timeout_s))
        level.peak_rss_mib = peak_rss_mib(pid)
        level.load_average = os.getloadavg()[0]
        levels.append(level)
    return levels


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def spawned_service(cfg_file: Optional[str], overrides: Sequence[str], start_timeout_s: float = 600.0
                    ) -> Iterator[tuple[str, int]]:
    """``dent serve --cfg cfg_file overrides`` on a free port, reached at 127.0.0.1 (``overrides`` bind it there),
    in a subprocess with this environment: yields (URL, pid) once ``/healthz`` answers; stopped by SIGTERM after.
    Its output goes to a temporary file, whose end is shown if it exits before answering."""
    port = free_port()
    command = [sys.executable, "-m", "dent.cli.main", "serve", *(["--cfg", cfg_file] if cfg_file else []),
               *overrides, "serve.port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log, start_timeout_s)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def healthy(url: str) -> bool:
    """Whether a service answers ``url``'s ``/healthz``."""
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if proc.poll() is not None:
            log.seek(0)
            tail = "".join(log.readlines()[-15:])
            raise DentError(f"dent serve exited with status {proc.returncode} before answering:\n{tail}")
        if time.monotonic() > deadline:
            raise DentError(f"dent serve did not answer {url}/healthz within {timeout_s:.0f} s")
        time.sleep(0.5)


def batches_text(level: Level) -> str:
    """The batches formed, as ``images x count`` by size (counts are whole unless another client interfered)."""
    return ", ".join(f"{size}x{count:g}" for size, count in sorted(level.batches.items())) or "-"


def ratio(value: float, base: Optional[float], decimals: int) -> str:
    """``value / base``; "-" without a base to compare with (no static row, or nothing it answered)."""
    return f"{value / base:.{decimals}f}" if base and base == base else "-"  # base == base: not NaN


def format_table(levels: Sequence[Level]) -> str:
    """A markdown table; ``x static``: throughput (and p50 latency) over the static model's at the same
    concurrency in this run."""
    static = {level.concurrency: level for level in levels if level.defense == "static"}
    head = ("| defense | C | requests | errors | req/s | img/s | x static | p50 ms | p95 ms | p99 ms | p50 x static "
            "| batches formed (images x count) | mean images/batch | peak RSS MiB | load avg |")
    rows = [head, "|" + " --- |" * 2 + " ---: |" * 9 + " --- |" + " ---: |" * 3]
    for level in levels:
        base = static.get(level.concurrency)
        n_batches = sum(level.batches.values())
        rows.append("| " + " | ".join([
            level.defense, str(level.concurrency), str(level.requests),
            ", ".join(f"{k}: {v}" for k, v in sorted(level.errors.items())) or "0",
            f"{level.throughput():.2f}", f"{level.throughput() * level.images_per_request:.2f}",
            ratio(level.throughput(), base and base.throughput(), 3),
            *(f"{level.percentile(q):.0f}" for q in (50, 95, 99)),
            ratio(level.percentile(50), base and base.percentile(50), 2),
            batches_text(level),
            f"{level.answered * level.images_per_request / n_batches:.2f}" if n_batches else "-",
            f"{level.peak_rss_mib:.0f}" if level.peak_rss_mib is not None else "n/a",
            f"{level.load_average:.2f}",
        ]) + " |")
    return "\n".join(rows)


def machine_text() -> str:
    """Where and when: the date, the CPU, torch, and the thread setting the service inherits."""
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; CPU {cpu_model_name()}, {os.cpu_count()} logical CPUs, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
