"""Batched prediction and clean accuracy."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str = "cpu", progress: bool = True
) -> torch.Tensor:
    """Predicted labels for ``images`` in batches; ``model`` may be a dynamic defense (it adapts per batch)."""
    model.to(device)
    preds = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", disable=not progress):
        batch = images[start : start + batch_size].to(device)
        preds.append(model(batch).argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def clean_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
    device: torch.device | str = "cpu", progress: bool = True,
) -> float:
    preds = predict(model, images, batch_size, device, progress)
    return (preds == labels.cpu()).float().mean().item()
