"""What a service answers with: the model and defense of its config, built once at start and checked against
its isolation policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dent.data import DATASETS
from dent.defenses import build_defense, rejects
from dent.defenses.kinds import kind_name, resolved_defense
from dent.models import load_model
from dent.runtime import resolve_device
from dent.serving.config import ServeConfig
from dent.serving.inputs import ImageSpec
from dent.serving.isolation import check_isolation

#: The class name of a detector's extra answer (its logit K: "rejected as adversarial").
REJECTED = "rejected"


@dataclass(frozen=True)
class Served:
    """A defense ready to answer: where it runs, what images it takes, what its labels mean."""

    defense: nn.Module
    device: torch.device
    spec: ImageSpec
    classes: tuple[str, ...]
    model_name: str
    defense_kind: str

    def predict(self, images: Tensor) -> Tensor:
        """Logits, on the CPU, of a [N, 3, H, W] batch (dent adapts with grad even under no_grad)."""
        with torch.no_grad():
            return self.defense(images.to(self.device)).float().cpu()


def build_served(model: nn.Module, cfg: ServeConfig) -> Served:
    """``cfg``'s defense around ``model``; refused when the isolation policy cannot hold with it."""
    device = resolve_device(cfg.device)
    defense = build_defense(model, resolved_defense(cfg.defense, device)).to(device).eval()
    check_isolation(defense, cfg.serve.isolation)
    info = DATASETS.get(cfg.serve.dataset)
    classes = info.classes + ((REJECTED,) if rejects(defense) else ())
    return Served(defense, device, ImageSpec(info.image_size, cfg.serve.max_batch), classes, cfg.model.arch,
                  kind_name(cfg.defense))


def load_served(cfg: ServeConfig) -> Served:
    """:func:`build_served` around ``cfg``'s model from the zoo."""
    model = load_model(cfg.model.arch, dataset=cfg.serve.dataset, threat_model=cfg.model.threat_model,
                       model_dir=cfg.model.model_dir, checkpoint=cfg.model.checkpoint)
    return build_served(model, cfg)
