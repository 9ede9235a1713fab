"""Shared test settings and fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """Tiny test models run faster on one thread, and parallel test workers do not oversubscribe the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar10_dir():
    """The CIFAR-10 directory found by the normal discovery, or skip when this machine has none."""
    from dent.data import find_data_dir
    from dent.errors import DataNotFoundError

    try:
        return find_data_dir()
    except DataNotFoundError as exc:
        pytest.skip(f"CIFAR-10 not available here ({str(exc).splitlines()[0]})")
