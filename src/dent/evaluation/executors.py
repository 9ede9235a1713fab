"""Where an evaluation's units run: in this process (``evaluation.executor local``) or on Ray workers (``ray``).

Either way the driver (the ``dent evaluate`` process) is the only writer of the run's store: an executor yields
each unit as it finishes and the driver commits it before asking for the next, so ``kill -9`` of the driver
loses at most the units in flight, and a re-run resumes from the store as always. A unit is one defense batch
(its positions, seed and defense config are in the unit), so where it runs does not change what it computes.

On Ray, each worker is an actor that loads the model and builds the defenses once and then runs one unit per
call. Actors rather than tasks: a task would load the model (and, for a zoo model, read its checkpoint) for
every unit, which costs as much as a clean unit of a small model; docs/scale_out.md has the measured figures.
A worker that dies mid-unit (its process killed, its node lost) is replaced and the unit resubmitted, at most
``evaluation.ray.max_retries`` times; its unit is stored once, when a worker returns it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from dent.confbase import Section
from dent.errors import ConfigError, DentError
from dent.evaluation.config import RaySection
from dent.evaluation.unitrun import run_unit
from dent.evaluation.units import Unit

log = logging.getLogger("dent.evaluation")


@dataclass
class UnitWork:
    """Everything a worker needs to run units: the model, the defense factory, the evaluation subsets (by subset
    seed) and the per-unit options of :func:`dent.evaluation.unitrun.run_unit`."""

    cfg: Any  # EvaluateConfig: its device and per-unit options
    model: nn.Module  # a worker moves it to its device (Ray workers get it from the driver's CPU)
    defense_factory: Callable[[nn.Module, Section], nn.Module]
    subsets: dict[int, tuple[torch.Tensor, torch.Tensor]]
    adversarial_dir: Optional[Path] = None


@dataclass
class FinishedUnit:
    """A unit's result and where it was computed."""

    unit: Unit
    result: dict[str, Any]
    seconds: float
    device: str
    host: str
    worker: str  # "pid 1234 on host h" (Ray: and the node id): the run's log records it per unit


class UnitWorker:
    """Runs units of one evaluation, building each defense once (the driver passes in the ones it already built
    when it runs units itself)."""

    def __init__(self, work: UnitWork, defended: Optional[dict[str, nn.Module]] = None, progress: bool = False,
                 node: str = ""):
        from dent.runtime import resolve_device, use_deterministic_kernels

        use_deterministic_kernels()
        self.work, self.progress = work, progress
        self.device = resolve_device(work.cfg.device)
        self.defended = dict(defended or {})
        self.model = work.model.to(self.device).eval()
        self.where = f"pid {os.getpid()} on host {socket.gethostname()}" + (f", node {node}" if node else "")

    def run(self, unit: Unit) -> FinishedUnit:
        if unit.defense not in self.defended:
            self.defended[unit.defense] = self.work.defense_factory(self.model, unit.defense_config).to(self.device)
        images, labels = self.work.subsets[unit.context["data"]["subset_seed"]]
        start = time.perf_counter()
        result = run_unit(unit, self.defended[unit.defense], images, labels, device=self.device, seed=unit.seed,
                          progress=self.progress, clean_draws=self.work.cfg.evaluation.clean_draws,
                          adversarial_dir=self.work.adversarial_dir)
        return FinishedUnit(unit, result, time.perf_counter() - start, str(self.device), socket.gethostname(),
                            f"{self.where}, {self.device}")


def run_locally(units: Iterable[Unit], worker: UnitWorker, on_start: Callable[[Unit], None]) -> Iterator[FinishedUnit]:
    for unit in units:
        on_start(unit)
        yield worker.run(unit)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("config key 'evaluation.executor': 'ray' needs the Ray package, which is not installed: "
                          "pip install -e \".[ray]\" (or pip install \"ray[default]\")") from None
    return ray


#: ``ray.init`` options of a dent driver: no dashboard, the workers' output kept in their log files.
QUIET_DRIVER: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}


def local_instance_options(cpus: int) -> dict[str, Any]:
    """``ray.init`` options for a local instance with at least ``cpus`` logical CPUs (whatever the machine has).

    Ray starts its workers at niceness 15 (``RAY_worker_niceness``), below any other work on the machine: on a
    machine shared with other jobs a worker then ran a unit 20x slower than this process. A local instance's
    workers get this process's priority (niceness 0) unless the variable is set already.
    """
    os.environ.setdefault("RAY_worker_niceness", "0")
    return {**QUIET_DRIVER, "num_cpus": max(os.cpu_count() or 1, cpus)}


def connect_ray(section: RaySection) -> bool:
    """Connect to the cluster of ``evaluation.ray.address`` (empty: start a local instance sized for the
    workers). Returns whether this call connected (and so should disconnect when the run ends)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if section.address:
        options = {**QUIET_DRIVER, "address": section.address}
    else:
        options = local_instance_options(math.ceil(section.workers * section.num_cpus))
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"config key 'evaluation.ray.address': cannot connect to Ray at {section.address!r}: "
                          f"{exc} (use 'auto' inside a cluster started with `ray start`, host:port of its head, "
                          f"or '' for a local instance)") from None
    return True


def workers_that_fit(section: RaySection, resources: dict[str, float]) -> int:
    """How many of the requested workers the cluster's total resources can hold at once."""
    fits = [section.workers]
    for name, per_worker in (("CPU", section.num_cpus), ("GPU", section.num_gpus)):
        if per_worker > 0:
            fits.append(int(resources.get(name, 0.0) / per_worker + 1e-9))
    n = min(fits)
    if n < 1:
        raise ConfigError(
            f"config key 'evaluation.ray': one worker needs num_cpus {section.num_cpus} and num_gpus "
            f"{section.num_gpus}, but the Ray cluster has {resources.get('CPU', 0.0):g} CPUs and "
            f"{resources.get('GPU', 0.0):g} GPUs in all")
    if n < section.workers:
        log.warning("evaluation.ray.workers %d: the cluster holds only %d workers of num_cpus %g, num_gpus %g; "
                    "running %d", section.workers, n, section.num_cpus, section.num_gpus, n)
    return n


@dataclass
class _RayPool:
    """The Ray actors of a run and the unit each is running."""

    ray: Any
    actor_class: Any
    work_ref: Any
    in_flight: dict[Any, tuple[Any, Unit]] = field(default_factory=dict)  # object ref -> (actor, unit)

    def new_actor(self) -> Any:
        return self.actor_class.remote(self.work_ref)

    def submit(self, actor: Any, unit: Unit) -> None:
        self.in_flight[actor.run.remote(unit)] = (actor, unit)

    def next_finished(self) -> tuple[Any, Any, Unit]:
        """Wait for a unit to come back: (its object ref, its actor, the unit)."""
        [ref], _ = self.ray.wait(list(self.in_flight), num_returns=1)
        actor, unit = self.in_flight.pop(ref)
        return ref, actor, unit

    def stop(self) -> None:
        """Kill the workers still running a unit (the driver is stopping: an error, an interrupt)."""
        for actor, _ in self.in_flight.values():
            self.ray.kill(actor)
        self.in_flight.clear()


def run_on_ray(units: Iterable[Unit], work: UnitWork, section: RaySection,
               on_start: Callable[[Unit], None]) -> Iterator[FinishedUnit]:
    """Yield each unit as a Ray worker finishes it (in any order), replacing a worker that dies mid-unit."""
    ray = import_ray()
    connected = connect_ray(section)
    pool = None
    try:
        n_workers = workers_that_fit(section, ray.cluster_resources())
        actor_class = ray.remote(num_cpus=section.num_cpus, num_gpus=section.num_gpus, max_restarts=0)(RayUnitWorker)
        pool = _RayPool(ray, actor_class, ray.put(work))
        queue, attempts = deque(units), {}
        for _ in range(min(n_workers, len(queue))):
            _start(pool, pool.new_actor(), queue.popleft(), on_start)
        while pool.in_flight:
            ref, actor, unit = pool.next_finished()
            try:
                finished = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                actor = _replace_dead_worker(pool, unit, attempts, section.max_retries, exc)
                queue.appendleft(unit)
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            else:
                yield finished
            if queue:
                _start(pool, actor, queue.popleft(), on_start)
    finally:
        if pool is not None:
            pool.stop()
        if connected:
            ray.shutdown()


def _start(pool: _RayPool, actor: Any, unit: Unit, on_start: Callable[[Unit], None]) -> None:
    on_start(unit)
    pool.submit(actor, unit)


def _replace_dead_worker(pool: _RayPool, unit: Unit, attempts: dict[str, int], max_retries: int, exc: Exception):
    attempts[unit.key] = attempts.get(unit.key, 0) + 1
    if attempts[unit.key] > max_retries:
        raise DentError(f"unit {unit.describe()}: its Ray worker died {attempts[unit.key]} times "
                        f"(evaluation.ray.max_retries {max_retries}); last error: {_first_line(exc)}")
    log.warning("unit %s: its Ray worker died (%s); retry %d of %d on a new worker", unit.describe(),
                _first_line(exc), attempts[unit.key], max_retries)
    return pool.new_actor()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _cause(exc: Exception) -> BaseException:
    """The exception a unit raised on its worker (a dent error keeps its clear message), not Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayUnitWorker(UnitWorker):
    """:class:`UnitWorker` as a Ray actor: it runs in a worker process of a cluster node."""

    def __init__(self, work: UnitWork):
        import ray

        super().__init__(work, node=ray.get_runtime_context().get_node_id()[:12])
