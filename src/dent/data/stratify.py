"""Class-stratified subsets: evaluations on N images see every class about N / K times."""

from __future__ import annotations

from typing import Sequence

import torch

from dent.errors import DentError


def stratified_indices(labels: torch.Tensor | Sequence[int], n: int, seed: int) -> torch.Tensor:
    """Exactly ``n`` distinct indices into ``labels``, as evenly spread over the classes as their sizes allow.

    Which classes get one more when ``n`` does not divide evenly, which images each class gives, and the
    order of the result (shuffled, so batches mix classes) all come from a ``torch.Generator`` seeded
    with ``seed``: the same labels, ``n`` and seed always give the same indices.
    """
    labels = torch.as_tensor(labels).flatten()
    if not 0 <= n <= len(labels):
        raise DentError(f"cannot draw n={n} images from a split of {len(labels)} images; n must be 0..{len(labels)}")
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    quotas = class_quotas(torch.tensor([len(m) for m in members], dtype=torch.long), n, generator)
    chosen = [m[torch.randperm(len(m), generator=generator)[:q]] for m, q in zip(members, quotas.tolist())]
    indices = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)
    return indices[torch.randperm(len(indices), generator=generator)]


def class_quotas(sizes: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """How many images each class gives: equal shares, capped by class size (the rest goes to larger classes);
    a remainder smaller than the number of classes goes, one each, to randomly chosen classes."""
    quotas = torch.zeros_like(sizes)
    remaining = n
    while remaining > 0:
        open_classes = torch.nonzero(quotas < sizes).flatten()
        share = remaining // len(open_classes)
        if share == 0:
            lucky = open_classes[torch.randperm(len(open_classes), generator=generator)[:remaining]]
            quotas[lucky] += 1
            break
        added = torch.clamp(sizes[open_classes] - quotas[open_classes], max=share)
        quotas[open_classes] += added
        remaining -= int(added.sum())
    return quotas
