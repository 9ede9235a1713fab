"""A logistic regression on a few standardized features, fitted with torch (L-BFGS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.defenses.detection.base import NotFittedError
from dent.errors import InvalidInputError


class LogisticRegression(nn.Module):
    """``logit(f) = w . (f - mean) / std + b`` for features ``f`` [N, n_features].

    :meth:`fit` standardizes the features by their mean and standard deviation on the training data (a constant
    feature is left unscaled) and minimizes the mean binary cross-entropy plus ``l2 * ||w||^2``: the penalty
    keeps the weights finite on separable data, where the unpenalized optimum is at infinity.
    """

    def __init__(self, n_features: int, l2: float = 1e-3):
        super().__init__()
        self.l2 = l2
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("weight", torch.zeros(n_features))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("fitted", torch.tensor(False))

    def forward(self, features: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise NotFittedError("LogisticRegression is not fitted: call fit(features, labels) first")
        features = features.to(self.weight.dtype)
        return ((features - self.mean) / self.std) @ self.weight + self.bias

    def fit(self, features: Tensor, labels: Tensor, iterations: int = 100) -> "LogisticRegression":
        """Fit on ``features`` [N, n_features] and binary ``labels`` [N] (1 = positive class)."""
        features, labels = features.detach().double(), labels.detach().double()
        if features.dim() != 2 or features.shape != (labels.numel(), self.weight.numel()):
            raise InvalidInputError(f"expected features [N, {self.weight.numel()}] and labels [N], got "
                                    f"{tuple(features.shape)} and {tuple(labels.shape)}")
        if labels.min() == labels.max():
            raise InvalidInputError("LogisticRegression.fit needs examples of both classes")
        mean, std = features.mean(0), features.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        z = (features - mean) / std
        weight, bias = torch.zeros_like(mean, requires_grad=True), torch.zeros((), dtype=z.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ weight + bias, labels) + self.l2 * weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        for name, value in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias)):
            getattr(self, name).copy_(value.detach())
        self.fitted.fill_(True)
        return self
