"""Trained detectors on disk, like the reference models: ``<name>.safetensors`` and its card ``<name>.md``.

The file holds the detector's own state (fitted features, regression or subnetwork weights, threshold), not the
weights of the model it watches: its metadata names the detector class (:data:`DETECTOR_CLASSES`), the
parameters that rebuild it around a model, and the weights digest of the model it was trained on. Loading it
around any other model is refused: a detector's features, density and threshold belong to one model.
``dent train`` writes these files (recipes ``kde_detector`` and ``subnetwork_detector``, ``--export NAME``
into :data:`DETECTOR_DIR`); the defense kind ``detector`` loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from dent.defenses.detection.base import Detector, NotFittedError
from dent.defenses.detection.kde import KernelDensityUncertainty
from dent.defenses.detection.subnetwork import SubnetworkDetector
from dent.errors import CorruptFileError, InvalidInputError
from dent.identity import model_identity
from dent.registry import Registry

#: Where the project's trained detectors and their cards live (inside the package).
DETECTOR_DIR = Path(__file__).resolve().parent / "checkpoints"
KIND_KEY, PARAMS_KEY, WATCHED_KEY = "dent.detector", "dent.detector_params", "dent.watched_digest"

#: The detector classes a file may name, each built as ``cls(model, **params)``.
DETECTOR_CLASSES: Registry[Callable[..., Detector]] = Registry("detector class")
DETECTOR_CLASSES.register("kde_uncertainty", KernelDensityUncertainty)
DETECTOR_CLASSES.register("subnetwork", SubnetworkDetector)


def stored_detectors(directory: Path = DETECTOR_DIR) -> list[str]:
    """The names of the detectors stored in ``directory``."""
    from dent.models.checkpoints import stored_names

    return stored_names(directory)


def detector_path(checkpoint: str, directory: Path = DETECTOR_DIR) -> Path:
    """The file of a stored detector's name, or ``checkpoint`` itself as a path to a ``.safetensors`` file."""
    from dent.models.checkpoints import stored_file

    return stored_file(checkpoint, directory, "detector", "train one with `dent train` (recipes kde_detector, "
                       "subnetwork_detector; docs/training.md)")


def save_detector(detector: Detector, kind: str, params: Mapping[str, Any], path: Path,
                  metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``detector`` (trained or calibrated), built as ``DETECTOR_CLASSES[kind](model, **params)``, to
    ``path`` in float32, with the digest of the model it watches."""
    from dent.models.checkpoints import save_safetensors

    detector.require_calibrated()
    state = {key: value for key, value in detector.state_dict().items() if not key.startswith("model.")}
    meta = {KIND_KEY: DETECTOR_CLASSES.canonical(kind), PARAMS_KEY: json.dumps(dict(params)),
            WATCHED_KEY: model_identity(detector.model)["digest"], **(metadata or {})}
    return save_safetensors(state, path, meta, dtype=None)


def load_detector(model: nn.Module, checkpoint: str, directory: Path = DETECTOR_DIR) -> Detector:
    """The stored detector ``checkpoint`` (a name or a path, :func:`detector_path`) around ``model``, which must
    be the model it was trained on (same weights digest)."""
    from dent.models.checkpoints import read_safetensors_metadata, read_state_dict

    path = detector_path(checkpoint, directory)
    meta = read_safetensors_metadata(path)
    if KIND_KEY not in meta or PARAMS_KEY not in meta or WATCHED_KEY not in meta:
        raise CorruptFileError(f"{path} is not a dent detector file: its metadata lacks {KIND_KEY}, {PARAMS_KEY} "
                               f"or {WATCHED_KEY} (a detector is written by `dent train --export`)")
    digest = model_identity(model)["digest"]
    if digest != meta[WATCHED_KEY]:
        raise InvalidInputError(
            f"detector {checkpoint!r} was trained on a model with weights digest {meta[WATCHED_KEY]}, not on this "
            f"{type(model).__name__} (digest {digest}): a detector's features and threshold belong to its model; "
            "train one for this model"
        )
    try:
        params = json.loads(meta[PARAMS_KEY])
        detector = DETECTOR_CLASSES.get(meta[KIND_KEY])(model, **params)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptFileError(f"{path}: cannot rebuild its detector {meta[KIND_KEY]!r}: {exc}") from None
    missing, unexpected = detector.load_state_dict(read_state_dict(path), strict=False)
    missing = [key for key in missing if not key.startswith("model.")]
    if missing or unexpected:
        raise CorruptFileError(f"{path}: its tensors do not fit a {meta[KIND_KEY]} detector (missing "
                               f"{missing[:4]}, unexpected {unexpected[:4]})")
    if not bool(detector.trained) or not detector.calibrated:
        raise NotFittedError(f"{path} holds a detector that was not trained and calibrated; train it with "
                             "`dent train` (recipes kde_detector, subnetwork_detector)")
    return detector.eval()
