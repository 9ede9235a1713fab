"""``dent train`` under ``torchrun``: the world of processes a run is split over, and what it shares.

``torchrun --nproc_per_node N`` starts N processes (ranks) with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
their environment; :func:`session` joins them into one process group (gloo on the CPU, NCCL on CUDA, or
``train.distributed.backend``) and :class:`World` is what the trainer asks of it. Without torchrun (or with
``WORLD_SIZE`` 1) the world is one process and every operation here is the identity, so a single-process run
computes exactly what it did before this module existed.

What a run of N ranks computes:

- ``train.batch_size`` is the *global* batch. Every rank draws the same epoch order and augmentation from the
  epoch's generator (a function of ``seed`` and the epoch), takes its contiguous shard of each global batch
  (:meth:`World.shard`) and attacks only that shard; DistributedDataParallel averages the gradients, each rank's
  loss weighted by its share of the batch (:meth:`World.loss_weight`), so the update is the gradient of the mean
  loss over the global batch, as in one process.
- Attack random starts (and other draws of a recipe) come from a generator of (seed, epoch, rank)
  (:meth:`World.recipe_generator`): they are not the single-process run's draws.
- BatchNorm normalizes with the statistics of each rank's shard (plain DDP, no SyncBatchNorm); DDP broadcasts
  rank 0's running statistics at every forward pass, so the checkpoint holds rank 0's.
- Rank 0 alone writes (checkpoints, logs, history, curves, exports); every rank's RNG state is gathered into the
  checkpoint, so a resumed run continues every rank's random stream bit for bit.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dent.errors import ConfigError
from dent.runtime import resolve_device
from dent.training.config import Backend, TrainConfig

T = TypeVar("T")

#: The environment torchrun sets for every rank (``MASTER_ADDR``/``MASTER_PORT`` are read by ``init_process_group``).
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """The processes of one training run: this one's ``rank`` of ``size``; one process by default."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @classmethod
    def current(cls) -> "World":
        """The world of the initialized process group, or one process when there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank = dist.get_rank()
        return cls(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), dist.get_backend())

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def description(self) -> dict[str, Any]:
        """What a run's provenance, checkpoint and history record of the world."""
        return {"world_size": self.size, "backend": self.backend}

    # -- the data of a step ---------------------------------------------------------------------

    def per_rank_batch(self, batch_size: int) -> int:
        """The images a rank trains on per step; the global ``train.batch_size`` must split evenly."""
        if batch_size % self.size:
            fits = [b for b in (batch_size // self.size * self.size, (batch_size // self.size + 1) * self.size) if b]
            raise ConfigError(
                f"train.batch_size {batch_size} is the global batch of all ranks together: it must be divisible by "
                f"the world size {self.size} (torchrun --nproc_per_node), not {batch_size} / {self.size} = "
                f"{batch_size / self.size:.2f} per rank; expected e.g. {' or '.join(map(str, fits))}"
            )
        return batch_size // self.size

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` images: the parts differ by at most one image
        (only a last, short batch splits unevenly; the first ``n % size`` ranks take one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def loss_weight(self, n_rank: int, n: int) -> float:
        """The factor of a rank's mean loss on ``n_rank`` of the batch's ``n`` images that makes DDP's average of
        the ranks' gradients the gradient of the mean loss over the whole batch (1 when the shards are equal)."""
        return self.size * n_rank / n

    def recipe_generator(self, epoch_generator: torch.Generator, seed: int, epoch: int) -> torch.Generator:
        """The generator a recipe draws from (attack random starts): the epoch's in one process; per rank, one of
        (seed, epoch, rank), so that the shared epoch generator stays in step on every rank."""
        if not self.distributed:
            return epoch_generator
        return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 65_537 + self.rank + 1) % 2**63)

    def rank_seed(self, seed: int) -> int:
        """The seed of rank > 0's global RNGs (dropout): its own stream, not a copy of rank 0's."""
        return (seed * 1_000_003 + self.rank) % 2**63

    # -- collectives (the identity in one process) ----------------------------------------------

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in DistributedDataParallel (its parameters and buffers broadcast from rank 0)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def average(self, tensors: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """The mean over ranks of each tensor (``None`` stays ``None``): gradients taken outside DDP's backward."""
        if not self.distributed:
            return tensors
        out = []
        for tensor in tensors:
            if tensor is not None:
                tensor = tensor.clone()
                dist.all_reduce(tensor)
                tensor /= self.size
            out.append(tensor)
        return out

    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value summed over ranks (an epoch's loss and metric sums); every rank has the same keys."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return dict(zip(keys, total.tolist()))

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its result on every rank (held-out evaluation: done once, seen by all)."""
        if not self.distributed:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics), as the checkpoint holds them."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def _device(self) -> torch.device:
        """Where NCCL needs a collective's tensors (the rank's GPU); gloo takes CPU tensors."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Joining the processes torchrun started


def _env_int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} in the environment: expected an integer (torchrun sets it)") from None


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """The world torchrun describes in ``environ`` (before the process group exists; no backend yet)."""
    if "WORLD_SIZE" not in environ:
        return World()
    size = _env_int(environ, "WORLD_SIZE")
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size} in the environment: expected at least 1 process")
    if size == 1:
        return World()
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start distributed training with "
                          f"torchrun --nproc_per_node {size} -m dent.cli.main train ...")
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} in the environment: expected 0..{size - 1} (WORLD_SIZE={size})")
    return World(rank, size, local_rank)


def rank_device(device_name: str, world: World) -> torch.device:
    """The device of this rank: the CPU, or the GPU ``LOCAL_RANK`` when ``device`` is ``auto`` or ``cuda``."""
    device = resolve_device(device_name)
    if not world.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"device {device_name}: under torchrun every rank takes the GPU of its LOCAL_RANK; "
                          "expected device cuda or auto")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={world.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                          "expected --nproc_per_node at most the number of GPUs")
    return torch.device("cuda", world.local_rank)


def backend_for(choice: Backend, device: torch.device) -> str:
    """``train.distributed.backend``: ``auto`` is NCCL on CUDA and gloo on the CPU; NCCL needs CUDA."""
    if choice is Backend.AUTO:
        return "nccl" if device.type == "cuda" else "gloo"
    if choice is Backend.NCCL and device.type != "cuda":
        raise ConfigError(f"train.distributed.backend nccl needs CUDA devices, but this run's device is {device}; "
                          "expected backend gloo (or auto) on the CPU")
    return choice.value


@contextmanager
def session(cfg: TrainConfig, device: torch.device | str | None = None) -> Iterator[tuple[World, torch.device]]:
    """The world of this process and its device, for the length of a training run: under torchrun, the process
    group is created here (and destroyed after) unless the caller made one already."""
    if dist.is_available() and dist.is_initialized():
        world = World.current()
        yield world, rank_device(str(device or cfg.device), world)
        return
    world = world_from_env()
    own = rank_device(str(device or cfg.device), world)
    if not world.distributed:
        yield world, own
        return
    world.per_rank_batch(cfg.train.batch_size)  # a bad batch size fails before the ranks join and load data
    backend = backend_for(cfg.train.distributed.backend, own)
    if own.type == "cuda":
        torch.cuda.set_device(own)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    try:
        yield World(world.rank, world.size, world.local_rank, backend), own
    finally:
        gc.collect()  # DDP modules left in reference cycles would be freed after their group, and hang there
        dist.destroy_process_group()


def single_process_only(what: str) -> None:
    """Refuse ``what`` under torchrun with more than one process (it has no distributed form)."""
    world = world_from_env()
    if world.distributed:
        raise ConfigError(f"{what} runs in one process, not under torchrun with WORLD_SIZE={world.size}: "
                          "run it without torchrun")
