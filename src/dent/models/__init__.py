"""Models: architectures, named pretrained models, and their checkpoints.

All models take images in [0, 1] (N, 3, H, W); input normalization is part of the model.

* ``ARCHITECTURES`` -- registry of factories ``(num_classes=10, **kw) -> nn.Module``; :func:`build_model`.
* ``PRETRAINED`` -- registry of named models with weights (:class:`PretrainedModel`): shipped with an
  installed package, RobustBench checkpoints (``MODEL_DIR/cifar10/<Linf|L2>/<name>.pt``), or the project's
  own reference checkpoints; :func:`load_model`, :func:`list_models`.
* :class:`Normalized` -- wraps a network trained on normalized inputs so it takes [0, 1] images.

``MODEL_DIR`` is the ``model_dir`` argument, else ``$DENT_MODEL_DIR``, else ``./models``.
"""

from dent.models.architectures import ARCHITECTURES, build_model
from dent.models.checkpoints import (
    CheckpointNotFoundError,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_safetensors,
)
from dent.models.normalization import CIFAR10_MEAN, CIFAR10_STD, Normalize, Normalized, PerImageStandardize
from dent.models.zoo import (
    PRETRAINED,
    ModelInfo,
    ModelVariant,
    PretrainedModel,
    list_models,
    load_model,
    resolve_model_dir,
)

# Registering the named models (import order = listing order in ``dent models``).
from dent.models import shipped as _shipped  # noqa: E402,F401  isort: skip
from dent.models import robustbench as _robustbench  # noqa: E402,F401  isort: skip
from dent.models import reference as _reference  # noqa: E402,F401  isort: skip
from dent.models.reference import register_reference, save_reference  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CheckpointNotFoundError",
    "ModelInfo",
    "ModelVariant",
    "Normalize",
    "Normalized",
    "PRETRAINED",
    "PerImageStandardize",
    "PretrainedModel",
    "build_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "read_state_dict",
    "register_reference",
    "resolve_model_dir",
    "save_reference",
    "save_safetensors",
]
