"""The threat model: the norm of the perturbation ball, its radius epsilon, and how both are written.

One enum (:class:`ThreatModel`) serves the attacks, the training adversaries and the model zoo (which picks
RobustBench checkpoints by it); epsilons are in the [0, 1] pixel scale and may be written as fractions
(``8/255``) in configs and on the command line.
"""

from __future__ import annotations

import math
from enum import Enum
from fractions import Fraction
from typing import Annotated, Any, Optional

from pydantic import BeforeValidator


class ThreatModel(str, Enum):
    """The norm of the perturbation ball (also RobustBench's name for a model's training threat model)."""

    LINF = "Linf"
    L2 = "L2"

    @classmethod
    def _missing_(cls, value: object) -> Optional["ThreatModel"]:
        """Names are case-insensitive: ``linf`` and ``LINF`` are ``Linf``."""
        for member in cls:
            if str(value).lower() == member.value.lower():
                return member
        return None

    @classmethod
    def parse(cls, value: object) -> "ThreatModel":
        """``value`` as a threat model; ``ValueError`` naming the valid ones otherwise."""
        try:
            return cls(getattr(value, "value", value))
        except ValueError:
            raise ValueError(
                f"unknown threat model {value!r}; valid: {', '.join(m.value for m in cls)}"
            ) from None


#: Values of a CIFAR-sized input image (3 x 32 x 32), which bound the L2 radius (the diameter of the [0, 1] box).
CIFAR_INPUT_DIM = 3 * 32 * 32


def check_eps(norm: ThreatModel | str, eps: float, dim: Optional[int] = None) -> None:
    """Raise ``ValueError`` when ``eps`` is outside the meaningful range for ``norm`` (and input size ``dim``)."""
    norm = ThreatModel.parse(norm)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"epsilon must be > 0, got {eps!r}")
    if norm is ThreatModel.LINF and eps > 1:
        raise ValueError(
            f"Linf epsilon {eps:g} is out of range (0, 1]: pixels are in [0, 1], so write e.g. 8/255, not 8"
        )
    limit = math.sqrt(dim) if dim else None
    if norm is ThreatModel.L2 and limit is not None and eps > limit:
        raise ValueError(f"L2 epsilon {eps:g} is out of range (0, {limit:.4g}] for inputs of {dim} values")


def format_eps(eps: float, norm: ThreatModel | str) -> str:
    """``8/255`` for Linf epsilons on the 1/255 grid (or half steps, e.g. ``1.5/255``), else the number."""
    if ThreatModel.parse(norm) is ThreatModel.LINF:
        scaled = eps * 255
        if abs(scaled - round(scaled * 2) / 2) < 1e-6:
            value = round(scaled * 2) / 2
            return f"{value:g}/255"
    return f"{eps:g}"


def parse_fraction(value: Any) -> Any:
    """Accept "8/255" style strings for pixel-scale quantities (epsilons, step sizes)."""
    if isinstance(value, str) and "/" in value:
        try:
            text = value.replace(" ", "")
            if "." in text:  # e.g. 1.5/255, which Fraction does not parse
                numerator, denominator = text.split("/")
                return float(numerator) / float(denominator)
            return float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like '8/255', got {value!r}") from None
    return value


#: A float in the [0, 1] pixel scale that may be written as a fraction, e.g. ``8/255``.
PixelFloat = Annotated[float, BeforeValidator(parse_fraction)]


def parse_threat(value: Any) -> Any:
    """Accept ``"Linf:8/255"`` / ``"L2:0.5"`` shorthands for a threat (norm and epsilon)."""
    if isinstance(value, str):
        if ":" not in value:
            raise ValueError(f"expected NORM:EPS like 'Linf:8/255' or 'L2:0.5', got {value!r}")
        norm, eps = value.split(":", 1)
        return {"norm": norm.strip(), "eps": eps.strip()}
    return value
