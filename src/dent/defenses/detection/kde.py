"""Kernel density and Bayesian uncertainty as a detector (Feinman, Curtin, Shintre, Gardner 2017).

Two features of an input, combined by a logistic regression fitted on clean vs adversarial examples:

* the log kernel density of its last hidden layer's features (the input of the model's last ``nn.Linear``)
  among the clean training features of its *predicted* class, Gaussian kernel ``exp(-||h - h_i||^2 / (2 b^2))``
  of bandwidth ``b`` (the kernel's normalizing constant is left out: a constant shift, absorbed by the
  standardization); adversarial inputs tend to lie off the predicted class's manifold, at low density;
* its MC-dropout uncertainty: over T stochastic passes with dropout on, ``mean_t ||p_t||^2 - ||mean_t p_t||^2``
  for the softmax outputs ``p_t`` (the summed variance of the class probabilities).

Dropout: a model with dropout layers (``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``) runs T full
passes with those layers, and only those, in training mode. A model without any gets dropout at rate ``dropout``
inserted on its last hidden layer: the last hidden features ``h`` of the one deterministic pass, dropped T
times, through the last linear layer (checked at ``fit`` to produce the model's logits). The layers before it
are deterministic, so this is exactly T passes with that dropout layer inserted, for the cost of one.

Feinman et al. also fit on noisy clean inputs as negatives; here the negatives are the clean inputs given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dent.defenses.detection.base import Detector, watched_traits
from dent.defenses.detection.layers import find_layer, last_linear, run_capturing
from dent.defenses.detection.logistic import LogisticRegression
from dent.errors import InvalidInputError

#: The dropout layers MC dropout switches on in a model that has them.
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class KernelDensityUncertainty(Detector):
    """Feinman et al.'s detector: score = the logistic regression's logit on (log density, uncertainty).

    ``fit`` first fits the density on clean training images and their true labels, then the regression on
    clean vs adversarial images; the threshold is then the regression's decision boundary (logit 0), and
    :meth:`calibrate` may move it to a target false-positive rate. Randomized (MC dropout): attacks use EOT.
    """

    needs_training = True
    sized_buffers = ("train_features", "train_labels")
    randomized = True  # MC dropout

    def __init__(self, model: nn.Module, bandwidth: float = 1.0, passes: int = 50, dropout: float = 0.5):
        super().__init__()
        if not (bandwidth > 0 and passes >= 2 and 0 < dropout < 1):
            raise InvalidInputError(f"KernelDensityUncertainty: need bandwidth > 0, passes >= 2 and dropout in "
                                    f"(0, 1); got {bandwidth}, {passes}, {dropout}")
        self.model, self.bandwidth, self.passes, self.dropout = model, bandwidth, passes, dropout
        self.head_name = last_linear(model)
        self.own_dropout = any(isinstance(m, DROPOUT) for m in model.modules())
        traits = watched_traits(model, type(self).__name__)
        self.adaptive = traits.adaptive
        self.cost = traits.cost * (1 + passes if self.own_dropout else 1)
        self.regression = LogisticRegression(2)
        self.register_buffer("train_features", torch.empty(0, 0))
        self.register_buffer("train_labels", torch.empty(0, dtype=torch.long))

    @property
    def head(self) -> nn.Module:
        # looked up, not stored: a second submodule would repeat its weights in the state dict
        return find_layer(self.model, self.head_name)

    def score(self, x: Tensor) -> Tensor:
        self.require_trained()
        return self.regression(self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """[B, 2]: each input's log density and MC-dropout uncertainty."""
        logits, hidden = run_capturing(self.model, self.head, x, "input")
        return torch.stack([self.log_density(hidden, logits.argmax(dim=1)), self.uncertainty(x, hidden)], dim=1)

    def log_density(self, hidden: Tensor, classes: Tensor) -> Tensor:
        """[B]: log of the mean kernel between each ``hidden`` [B, D] and the training features of its class."""
        train = self.train_features
        squared = hidden.square().sum(1, keepdim=True) + train.square().sum(1) - 2 * hidden @ train.T
        same = self.train_labels[None, :] == classes[:, None]
        log_kernel = (-squared.clamp_min(0) / (2 * self.bandwidth ** 2)).masked_fill(~same, float("-inf"))
        return torch.logsumexp(log_kernel, dim=1) - same.sum(dim=1).log()

    def uncertainty(self, x: Tensor, hidden: Tensor) -> Tensor:
        """[B]: the summed variance of the softmax over ``passes`` MC-dropout passes (module docstring)."""
        if self.own_dropout:
            probs = self._passes_with_own_dropout(x)
        else:
            dropped = F.dropout(hidden.expand(self.passes, *hidden.shape), self.dropout, training=True)
            probs = self.head(dropped).softmax(dim=-1)
        return probs.square().sum(-1).mean(0) - probs.mean(0).square().sum(-1)

    def _passes_with_own_dropout(self, x: Tensor) -> Tensor:
        layers = [m for m in self.model.modules() if isinstance(m, DROPOUT)]
        modes = [m.training for m in layers]
        try:
            for layer in layers:
                layer.train()
            return torch.stack([self.model(x).softmax(dim=1) for _ in range(self.passes)])
        finally:
            for layer, mode in zip(layers, modes):
                layer.train(mode)

    def fit(self, train_images: Tensor, train_labels: Tensor, clean_images: Tensor, adversarial_images: Tensor,
            batch_size: int = 256) -> "KernelDensityUncertainty":
        """Fit the density on ``train_images`` with their true ``train_labels``, then the regression on
        ``clean_images`` (negatives) vs ``adversarial_images`` (positives)."""
        self.fit_density(train_images, train_labels, batch_size)
        clean, adversarial = (_features_of(self, images, batch_size) for images in (clean_images, adversarial_images))
        targets = torch.cat([torch.zeros(len(clean)), torch.ones(len(adversarial))]).to(clean)
        self.regression.fit(torch.cat([clean, adversarial]), targets)
        self._mark_trained()
        return self

    def fit_density(self, images: Tensor, labels: Tensor, batch_size: int = 256) -> None:
        """Store the last hidden features of ``images`` by class; every class must have at least one."""
        with torch.no_grad():
            parts = [run_capturing(self.model, self.head, chunk, "input") for chunk in images.split(batch_size)]
        logits, hidden = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self._check_head(logits, hidden)
        missing = sorted(set(range(logits.shape[1])) - set(labels.tolist()))
        if missing or labels.shape != logits.shape[:1]:
            raise InvalidInputError(f"fit needs one label per training image and at least one image of every "
                                    f"class 0..{logits.shape[1] - 1}; got {labels.numel()} labels, classes missing: "
                                    f"{missing}")
        self.train_features, self.train_labels = hidden.detach().clone(), labels.to(hidden.device).long()

    def _check_head(self, logits: Tensor, hidden: Tensor) -> None:
        """MC dropout without the model's own dropout layers runs the last linear layer alone: it must be the output."""
        if hidden.dim() != 2:
            raise InvalidInputError(f"the input of {self.head_name!r} (the last hidden layer) must be [B, D], got "
                                    f"{tuple(hidden.shape)}")
        if not self.own_dropout and not torch.allclose(self.head(hidden), logits, rtol=1e-4, atol=1e-5):
            raise InvalidInputError(f"{type(self.model).__name__}'s last nn.Linear {self.head_name!r} does not "
                                    "produce its logits, so dropout cannot be inserted before it; give the model a "
                                    "dropout layer")


def _features_of(detector: KernelDensityUncertainty, images: Tensor, batch_size: int) -> Tensor:
    """:meth:`KernelDensityUncertainty.features` in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([detector.features(chunk) for chunk in images.split(batch_size)])
