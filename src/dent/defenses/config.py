"""The one config object that holds every knob of the dynamic defense."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field, field_validator, model_validator

from dent import runtime
from dent.confbase import NON_RESULT, OMITTED_AT_DEFAULT, Section
from dent.defenses.objectives import OBJECTIVES, per_input
from dent.defenses.optim import OPTIMIZERS
from dent.defenses.presets import PRESETS


class AffineMode(str, Enum):
    """Which BatchNorm affine parameters (gamma, beta) are adapted."""

    NONE = "none"  # not adapted
    BATCH = "batch"  # one set per channel shared by the batch: the paper's "dent"
    SAMPLE = "sample"  # one set per input, shape [B, C]: the paper's "dent+"


class StatsMode(str, Enum):
    """Which normalization statistics BatchNorm uses while adapting and predicting."""

    FIXED = "fixed"  # the model's training (running) statistics
    BATCH = "batch"  # estimated on the test batch (never written back to the running buffers)


class InputMode(str, Enum):
    """Input adaptation (Sigma): a Gaussian blur before the model."""

    NONE = "none"
    STATIC = "static"  # a fixed sigma, not adapted: the paper's "STAT." baseline
    BATCH = "batch"  # one sigma learned per batch: the paper's "DYNA."
    SAMPLE = "sample"  # one sigma learned per input


class SampleGrad(str, Enum):
    """The gradient that per-input (sample-wise) tensors step on.

    The objective is a mean over the batch, so the gradient of a per-input tensor is 1/B of what its own
    input contributes: with Adam or AdaMod the step still depends on B through eps, with SGD it shrinks
    as 1/B.
    """

    OWN_TERM = "own_term"  # B times the batch objective's gradient: steps do not depend on the batch size
    BATCH_MEAN = "batch_mean"  # the gradient of the batch-mean objective itself, as the official dent+ code


class BNArithmetic(str, Enum):
    """How per-input BatchNorm affine values are applied on fixed statistics (the same function).

    dent+'s steps amplify float rounding (measured on the shipped ResNet-18 and 32 CIFAR-10 images: the
    official dent+'s float32 and float64 logits differ by up to 0.8; with the fused kernel instead of the
    folded arithmetic, float32 logits differ from the official code's by 4e-4 at batch 128, 8e-6 with
    it), so reproducing a computation to 1e-4 needs its arithmetic.
    """

    FUSED = "fused"  # one BatchNorm kernel over the B*C planes of the batch (the project's; fewer passes)
    FOLDED = "folded"  # x * scale + shift with the statistics folded into scale and shift (the official code)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class DentConfig(Section):
    """Settings of :class:`dent.defenses.Dent`. Defaults are the paper's batch-wise dent (Table 1).

    ``preset`` names a setting of :data:`dent.defenses.presets.PRESETS`: its values replace the defaults,
    and keys given beside it override them. It is not a result-affecting key (the values it expands to
    are): it is kept in saved configs but marked non-result, so run hashes and unit keys depend on values only.
    """

    preset: Annotated[Optional[str], NON_RESULT, OMITTED_AT_DEFAULT] = None
    steps: Annotated[int, Field(ge=0, le=10_000)] = 10
    affine: AffineMode = AffineMode.BATCH
    stats: StatsMode = StatsMode.FIXED
    objective: str = "entropy"  # a name in dent.defenses.objectives.OBJECTIVES
    diversity_weight: NonNegativeFloat = 1.0  # weight of the info-max diversity term, when used
    optimizer: str = "adam"  # a name in dent.defenses.optim.OPTIMIZERS
    lr: PositiveFloat = 1e-3
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    beta3: Beta = 0.999  # AdaMod's momental-bound smoothing
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0  # SGD
    weight_decay: NonNegativeFloat = 0.0
    input: InputMode = InputMode.NONE
    sigma_init: PositiveFloat = 0.5  # initial / static blur width, in pixels
    sigma_lr: PositiveFloat = 0.25
    max_kernel_size: Annotated[int, Field(ge=1)] = 15  # cap on 2*ceil(3 sigma)+1; must be odd
    episodic: bool = True  # reset to the initial state after every call (the paper's default)
    sample_grad: Annotated[SampleGrad, OMITTED_AT_DEFAULT] = SampleGrad.OWN_TERM  # see SampleGrad; only per-input tensors are concerned
    bn_arithmetic: Annotated[BNArithmetic, OMITTED_AT_DEFAULT] = BNArithmetic.FUSED  # see BNArithmetic; "folded" needs affine sample, stats fixed
    # Precision of the adaptation steps: "bfloat16" (bf16 autocast), "none" (the model's own precision) or
    # "auto": bfloat16 where the device computes bf16 natively (dent.runtime.native_bf16: CPUs with AVX-512
    # BF16 or AMX, CUDA GPUs with bf16), else none. The objective is always computed in float32. An
    # evaluation resolves "auto" (DentConfig.resolved) before it keys its units, so a stored result records
    # the precision it was computed in. bf16 is a different defense (logits differ, see docs/performance.md).
    autocast: Annotated[Literal["none", "bfloat16", "auto"], OMITTED_AT_DEFAULT] = "none"  # (keeps earlier unit keys)
    autocast_prediction: Annotated[bool, OMITTED_AT_DEFAULT] = False  # the final prediction under autocast too
    # Memory format of the convolutions during a call: "channels_last" (inputs, and a channels-last copy of
    # the 4-D weights), "contiguous", or "auto": the faster of the two for each input shape, measured by
    # Dent on its first call with that shape. Not a result key: like the thread count, it changes only
    # the float summation order (so "auto" trades bit-for-bit reruns for speed; name a format to keep them).
    memory_format: Annotated[Literal["contiguous", "channels_last", "auto"], NON_RESULT, OMITTED_AT_DEFAULT] = (
        "contiguous")

    def resolved(self, device: Any) -> "DentConfig":
        """This config with ``autocast='auto'`` replaced by what it means on ``device`` (a torch.device or name)."""
        if self.autocast != "auto":
            return self
        if runtime.native_bf16(torch.device(device))[0]:
            return self.replace(autocast="bfloat16")
        return self.replace(autocast="none", autocast_prediction=False)

    @property
    def learns(self) -> bool:
        """Whether a call takes steps on anything (BatchNorm affine values or the blur width)."""
        return self.steps > 0 and (self.affine is not AffineMode.NONE
                                   or self.input in (InputMode.BATCH, InputMode.SAMPLE))

    @property
    def carries_state(self) -> bool:
        """Whether a call starts from the state the previous call left (so answers depend on earlier calls)."""
        return self.learns and not self.episodic

    def batch_couplings(self) -> list[str]:
        """Why an input's answer depends on the other inputs of its call (their values or their number), one
        reason each; empty for a sample-wise defense. A state carried between calls is :attr:`carries_state`."""
        reasons = []
        if self.stats is StatsMode.BATCH:
            reasons.append("stats='batch' normalizes every input with its batch's statistics")
        if not self.learns:
            return reasons
        if self.affine is AffineMode.BATCH:
            reasons.append("affine='batch' adapts one BatchNorm scale and shift shared by the batch")
        if self.input is InputMode.BATCH:
            reasons.append("input='batch' adapts one blur width shared by the batch")
        if not per_input(self.objective, self):
            reasons.append(f"objective {self.objective!r} with diversity_weight {self.diversity_weight} is not a mean "
                           "of per-input terms (its diversity term is the entropy of the batch-mean prediction); "
                           "set diversity_weight 0 or objective 'entropy'")
        per_input_tensors = self.affine is AffineMode.SAMPLE or self.input is InputMode.SAMPLE
        if self.sample_grad is SampleGrad.BATCH_MEAN and per_input_tensors:
            reasons.append("sample_grad='batch_mean' scales each input's gradient by 1/B, so its steps depend on the "
                           "batch size B (through the optimizer's eps; directly for SGD); use sample_grad 'own_term'")
        return reasons

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """The named preset's values under the keys given (an unknown name is left to ``_known_preset``)."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS.get(data["preset"]), **data}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in PRESETS:
            raise ValueError(PRESETS.unknown_message(value))
        return None if value is None else PRESETS.canonical(value)

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(OBJECTIVES.unknown_message(value))
        return OBJECTIVES.canonical(value)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(OPTIMIZERS.unknown_message(value))
        return OPTIMIZERS.canonical(value)

    @field_validator("max_kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd so the blur kernel has a center tap, e.g. {value - 1} or {value + 1}")
        return value

    @model_validator(mode="after")
    def _episodic_if_per_input(self) -> "DentConfig":
        # Per-input tensors belong to the inputs of one batch; carrying them over to the next batch, whose
        # i-th input is unrelated, has no meaning.
        if not self.episodic and (self.affine is AffineMode.SAMPLE or self.input is InputMode.SAMPLE):
            raise ValueError("episodic=False needs affine and input other than 'sample' (per-input state)")
        return self

    @model_validator(mode="after")
    def _prediction_autocast_needs_autocast(self) -> "DentConfig":
        if self.autocast_prediction and self.autocast == "none":
            raise ValueError("autocast_prediction=True runs the final prediction under the steps' autocast, so it "
                             "needs autocast 'bfloat16' or 'auto' (got 'none')")
        return self

    @model_validator(mode="after")
    def _folded_needs_per_input_fixed_stats(self) -> "DentConfig":
        if self.bn_arithmetic is BNArithmetic.FOLDED and (
            self.affine is not AffineMode.SAMPLE or self.stats is not StatsMode.FIXED
        ):
            raise ValueError(
                f"bn_arithmetic='folded' applies per-input affine values on fixed statistics, so it needs "
                f"affine='sample' and stats='fixed' (got affine={self.affine.value!r}, stats={self.stats.value!r})"
            )
        return self
