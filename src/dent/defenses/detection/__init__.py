"""Detection: defenses that may reject an input as adversarial (issue #15).

A detecting defense answers K + 1 logits, the last one the reject class (:mod:`.reject`, Carlini & Wagner's
combined model); detectors (:mod:`.base`) score inputs, higher = more adversarial, and fire above a threshold
set on clean inputs: feature squeezing (:mod:`.squeezing`), kernel density + MC-dropout uncertainty
(:mod:`.kde`) and a detector subnetwork on a hidden layer (:mod:`.subnetwork`), the trained ones stored on
disk with cards (:mod:`.stored`). Metrics:
:mod:`dent.evaluation.detection`.
"""

from dent.defenses.detection.base import Detector, NotFittedError, threshold_at_fpr
from dent.defenses.detection.kde import KernelDensityUncertainty
from dent.defenses.detection.layers import layer_names
from dent.defenses.detection.logistic import LogisticRegression
from dent.defenses.detection.reject import (
    Rejecting, detection_notes, predictions_with_reject, reject_logits, reject_margin, rejects,
)
from dent.defenses.detection.squeezing import FeatureSqueezing
from dent.defenses.detection.subnetwork import SubnetworkDetector

__all__ = [
    "Detector", "NotFittedError", "threshold_at_fpr", "KernelDensityUncertainty", "layer_names", "LogisticRegression",
    "Rejecting", "detection_notes", "predictions_with_reject", "reject_logits", "reject_margin", "rejects", "FeatureSqueezing", "SubnetworkDetector",
]
