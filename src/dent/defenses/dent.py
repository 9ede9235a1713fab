"""The dent wrapper: adapt to each test batch by a few gradient steps, predict, then reset."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from dent.defenses.blur import gaussian_blur
from dent.defenses.fastpath import converted_weights, faster_memory_format
from dent.defenses.bn import AdaptiveBatchNorm, batch_norm_slots, swapped
from dent.defenses.config import AffineMode, BNArithmetic, DentConfig, InputMode, SampleGrad, StatsMode
from dent.defenses.objectives import OBJECTIVES
from dent.defenses.optim import OPTIMIZERS
from dent.confbase import as_section
from dent.errors import InvalidInputError
from dent.models.inputs import check_channels, input_channels

#: How far outside [0, 1] a pixel may be (float rounding in attacks and data pipelines) before it is an error.
PIXEL_TOLERANCE = 1e-5

Affine = list[tuple[Tensor, Tensor]]


@dataclass
class _Adaptation:
    """What dent adapts for one kind of batch: affine values of the adapted BatchNorms, the blur width, their optimizer.

    The affine values live in flat 1-D leaf tensors (``flats``: one per dtype and device among the adapted
    norms, usually one), laid out as the weight then the bias of each of its norms in turn (``sizes``): C
    values each, or, per input, a contiguous block of B*C (input-major, viewed as [B, C]). A forward splits
    them into per-norm views: one autograd node per flat tensor, whose backward concatenates the per-norm
    gradients into the flat gradient. So restarting, snapshotting and each optimizer step touch a few tensors
    instead of two per BatchNorm (fewer kernel launches and less Python per step; optimizers act
    element-wise, so the updates are the same), and no per-input view needs a copy to be flattened.

    ``key`` is what the tensors were built for (batch size when they are per input, device, dtype).
    """

    flats: list[Tensor]
    sizes: list[list[int]]  # per flat tensor: the lengths of its pieces (weight, bias, weight, bias, ...)
    layout: list[tuple[int, int]]  # per adapted norm: (its flat tensor, its (weight, bias) pair in that tensor)
    raw_sigma: Tensor | None  # sigma = softplus(raw_sigma), which keeps the width positive
    optimizer: Optimizer | None  # None when there is nothing to learn
    key: tuple
    batch: int | None = None  # per-input affine values: the batch size B
    sources: list[Tensor | None] | None = None  # per flat tensor, per input: where each value starts from

    @property
    def affine(self) -> Affine:
        """Per adapted norm, its (weight, bias): views of the flat tensors, differentiable into them."""
        return self._pairs(self.flats)

    def _pairs(self, flats: list[Tensor]) -> Affine:
        pairs = []
        for flat, sizes in zip(flats, self.sizes):
            pieces = flat.split(sizes)
            if self.batch is not None:
                pieces = [piece.view(self.batch, -1) for piece in pieces]
            pairs.append(list(zip(pieces[0::2], pieces[1::2])))
        return [pairs[i][j] for i, j in self.layout]

    def sigma(self) -> Tensor | None:
        return None if self.raw_sigma is None else F.softplus(self.raw_sigma)

    def snapshot(self) -> tuple[Affine, Tensor | None]:
        """Detached copies for the final prediction.

        Detached: attacks differentiate through the adapted model, not through the adaptation steps.
        Copies: a later call updates the live tensors in place, which would invalidate any graph still
        holding them (e.g. an attack summing the losses of several calls before one backward pass).
        """
        affine = self._pairs([flat.detach().clone() for flat in self.flats])
        sigma = self.sigma()
        return affine, None if sigma is None else sigma.detach()


class Dent(nn.Module):
    """Defensive entropy minimization (Wang et al., 2021): a dynamic defense around ``model``.

    Called like the model, on images in [0, 1] of shape [B, C, H, W]. Each call starts from the initial
    state (``config.episodic``, the default) or from the state the previous call left; takes
    ``config.steps`` optimizer steps on ``config.objective`` of this batch's predictions w.r.t. the adapted
    tensors, i.e. the BatchNorm scales and shifts (Delta: ``config.affine``) and the width of a Gaussian
    blur applied to the input (Sigma: ``config.input``); then returns the adapted model's logits.
    ``config`` is a :class:`DentConfig` or a dict of its keys.

    The wrapped model is never modified. For the duration of a call it is put in eval mode, its parameters
    stop requiring grad (so steps compute no weight gradients), and its BatchNorms are swapped for
    :class:`~dent.defenses.bn.AdaptiveBatchNorm` stand-ins; all of this is undone before returning.
    BatchNorm statistics are the running ones (``stats='fixed'``) or estimated on the batch
    (``stats='batch'``); running buffers are never written.

    The returned logits are differentiable w.r.t. the input when grad is enabled: the adapted tensors are
    constants of that final forward (gradients do not flow through the adaptation steps), as are the
    wrapped model's weights. Adaptation itself runs with grad enabled even under ``torch.no_grad()``.

    With ``steps=0``, or with nothing to adapt (``affine='none'`` and ``input`` 'none' or 'static'), a
    call is a plain forward in eval mode, through the static blur if any; with ``stats='fixed'`` and
    ``input='none'`` that is exactly the wrapped model's eval-mode logits. ``stats='batch'`` still
    normalizes with the batch's statistics at ``steps=0`` (test-time normalization without updates).

    Cost: each step is a forward and a backward pass that computes activation gradients only (the wrapped
    model's weights do not require grad during the call, so no convolution or linear weight gradient is
    computed) and frees its graph; with the final prediction, about 2K + 1 forward passes. No copy of the
    model is made: the adapted values live in a few flat tensors that are restored in place, and per-input
    values are applied by broadcasting or one BatchNorm over B*C planes, never by looping over inputs.
    Fast paths (docs/performance.md): ``config.autocast`` runs the steps under bf16 autocast (``'auto'``:
    where the device has native bf16), ``config.autocast_prediction`` the final prediction too, and
    ``config.memory_format`` the convolutions channels-last (``'auto'``: where one step measures faster, per
    input shape). ``dent bench`` measures all of this against the static forward, a naive implementation
    and the official one, and each fast path's agreement with float32.
    """

    # Traits of the defense protocol (dent.defenses.protocol): the final prediction is differentiable and
    # deterministic; the defense adapts to its batch unless it is the static model.
    @property
    def adaptive(self) -> bool:
        return self.config.steps > 0 or self.config.stats is StatsMode.BATCH

    @property
    def cost(self) -> float:
        return 2.0 * self.config.steps + 1  # forward passes per call (see Cost above)

    def __init__(self, model: nn.Module, config: DentConfig = DentConfig()):
        super().__init__()
        config = as_section(DentConfig, config, "Dent(config)")
        self._in_channels = input_channels(model, "Dent(model)")
        self.model = model
        self.config = config
        self.objective = OBJECTIVES.get(config.objective)
        self.make_optimizer = OPTIMIZERS.get(config.optimizer)
        self._slots = batch_norm_slots(self)  # searched from self so that a bare BatchNorm model counts
        norms = list(dict.fromkeys(norm for _, _, norm in self._slots))
        affine_norms = [norm for norm in norms if norm.weight is not None]
        if config.affine is not AffineMode.NONE and not affine_norms:
            raise InvalidInputError(
                f"affine={config.affine.value!r} adapts the scale and shift of BatchNorm layers, but the model "
                "has no BatchNorm layer with affine parameters (nn.BatchNorm1d/2d/3d or SyncBatchNorm with "
                "affine=True); use affine='none' to adapt only the input"
            )
        if config.stats is StatsMode.BATCH and not norms:
            raise InvalidInputError(
                "stats='batch' normalizes BatchNorm layers with test-batch statistics, but the model has no "
                "BatchNorm layer (nn.BatchNorm1d/2d/3d or SyncBatchNorm); use stats='fixed'"
            )
        learns = config.steps > 0
        self._adapted_norms = affine_norms if learns and config.affine is not AffineMode.NONE else []
        self._learns_sigma = learns and config.input in (InputMode.BATCH, InputMode.SAMPLE)
        self._per_input = config.affine is AffineMode.SAMPLE or config.input is InputMode.SAMPLE
        self._swaps_norms = bool(self._adapted_norms) or config.stats is StatsMode.BATCH
        folded = config.bn_arithmetic is BNArithmetic.FOLDED
        self._replacements = {norm: AdaptiveBatchNorm(norm, config.stats is StatsMode.BATCH, folded) for norm in norms}
        sigma = config.sigma_init
        self._raw_sigma_init = sigma + math.log(-math.expm1(-sigma))  # softplus^-1, stable for any sigma > 0
        self._state: _Adaptation | None = None
        self._weights: dict[tuple, tuple[tuple, Tensor]] = {}  # converted weight copies: see converted_weights
        #: memory_format='auto': (input shape, device, dtype) -> the faster format and the timings that chose it
        self.measured_formats: dict[tuple, dict] = {}

    @classmethod
    def tent_style(cls, model: nn.Module, optimizer: str = "adam", steps: int = 1, episodic: bool = False,
                   **config: Any) -> "Dent":
        """tent's constructor, ``Tent(model, optimizer, steps=1, episodic=False)``, for users who know it.

        tent takes an optimizer built on the BatchNorm parameters it collects; dent builds its optimizer on the
        tensors it adapts in every call, so ``optimizer`` is a name of :data:`dent.defenses.optim.OPTIMIZERS`
        and its settings (``lr``, ``betas``, ``momentum``, ...) are keys of :class:`DentConfig` in ``config``,
        with the other keys (``affine``, ``objective``, ``input``, ...). Defaults are tent's: one step, not
        episodic (each call starts from the state the previous one left; :meth:`reset` restores the initial).
        """
        keys = {**config, "optimizer": optimizer, "steps": steps, "episodic": episodic}
        return cls(model, as_section(DentConfig, keys, "Dent.tent_style"))

    def reset(self) -> None:
        """Return to the initial state: the wrapped model's own parameters, ``sigma_init``, fresh optimizer."""
        if self._state is not None:
            self._restart(self._state)

    def adapted_sigma(self) -> Tensor | None:
        """The blur width(s) of the last call's final prediction (detached; shape [1], or [B] per input), or
        ``None`` without an input blur or before any call."""
        if self._state is None or self._state.raw_sigma is None:
            return None
        return self._state.sigma().detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if torch.is_inference_mode_enabled():
            # Adaptation needs autograd, which inference mode turns off even inside enable_grad().
            with torch.inference_mode(False):
                return self._adapt_and_predict(x.clone())
        return self._adapt_and_predict(x)

    def _adapt_and_predict(self, x: Tensor) -> Tensor:
        state = self._state_for(x)
        with self._model_prepared():
            channels_last = self._channels_last(x, state)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            dtype = self._autocast(x.device)
            if state.optimizer is not None:
                # Adapt on a detached input: an attacker's x.grad must hold only the final prediction's gradient.
                inputs = x.detach()
                with torch.enable_grad(), converted_weights(self.model, self._weights, channels_last, dtype):
                    for _ in range(self.config.steps):
                        loss = self._step_loss(inputs, state.affine, state.sigma())
                        state.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        state.optimizer.step()
            dtype = dtype if self.config.autocast_prediction else None
            with converted_weights(self.model, self._weights, channels_last, dtype):
                return self._predict(x, *state.snapshot())

    def _autocast(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the steps on ``device`` (``None``: none), ``autocast='auto'`` resolved."""
        return torch.bfloat16 if self.config.resolved(device).autocast == "bfloat16" else None

    def _step_loss(self, x: Tensor, affine: Affine, sigma: Tensor | None) -> Tensor:
        """The objective one adaptation step minimizes, for the adapted tensors ``affine`` and ``sigma``.

        Shared with the differentiable adaptation (:mod:`dent.defenses.differentiable`), so both take the
        same steps. Call inside :meth:`_model_prepared`.
        """
        dtype = self._autocast(x.device)
        with torch.autocast(x.device.type, dtype) if dtype is not None else nullcontext():
            logits = self._logits(x, affine, sigma)
        if logits.dtype == torch.bfloat16:
            logits = logits.float()  # the objective in full precision
        return self.objective(logits, self.config)

    def _predict(self, x: Tensor, affine: Affine, sigma: Tensor | None) -> Tensor:
        """The final prediction: in the model's precision, or with ``autocast_prediction`` under the steps'
        autocast (bf16 logits returned in float32, as attacks and accuracies expect)."""
        dtype = self._autocast(x.device) if self.config.autocast_prediction else None
        if dtype is None:
            return self._logits(x, affine, sigma)
        with torch.autocast(x.device.type, dtype):
            logits = self._logits(x, affine, sigma)
        return logits.float() if logits.dtype == dtype else logits

    def _channels_last(self, x: Tensor, state: _Adaptation) -> bool:
        """Whether this call runs channels-last: as configured, or for ``memory_format='auto'`` the faster
        format for ``x``'s shape, measured on the first call with that shape (:func:`faster_memory_format`)."""
        choice = self.config.memory_format
        if choice != "auto":
            return choice == "channels_last"
        key = (tuple(x.shape), x.device, x.dtype)
        if key not in self.measured_formats:
            sigma = state.sigma()
            step = lambda inputs: self._step_loss(inputs, state.affine, sigma)  # noqa: E731
            self.measured_formats[key] = faster_memory_format(step, self.model, self._weights, x.detach(),
                                                              state.optimizer is not None, self._autocast(x.device))
        return self.measured_formats[key]["format"] == "channels_last"

    def _logits(self, x: Tensor, affine: Affine, sigma: Tensor | None) -> Tensor:
        if sigma is not None:
            x = gaussian_blur(x, sigma, self.config.max_kernel_size)
        for norm, (weight, bias) in zip(self._adapted_norms, affine):
            replacement = self._replacements[norm]
            replacement.weight, replacement.bias = weight, bias
        return self.model(x)

    @contextmanager
    def _model_prepared(self) -> Iterator[None]:
        """Eval mode, no parameter gradients and (when needed) adaptive BatchNorms, restored afterwards."""
        modes = [(module, module.training) for module in self.model.modules()]
        grads = [(param, param.requires_grad) for param in self.model.parameters()]
        try:
            self.model.eval()
            self.model.requires_grad_(False)
            with swapped(self._slots, self._replacements) if self._swaps_norms else nullcontext():
                yield
        finally:
            for param, requires_grad in grads:
                param.requires_grad_(requires_grad)
            for module, training in modes:
                module.training = training

    def _state_for(self, x: Tensor) -> _Adaptation:
        """The state to adapt from: initial for an episodic call, the last call's otherwise.

        Tensors are (re)built, at the initial state, for a first call and whenever the batch's device or dtype,
        or its size where tensors are per input, differs from the last call's.
        """
        key = (len(x) if self._per_input else None, x.device, x.dtype)
        if self._state is None or self._state.key != key:
            self._state = self._build(x, key)
        elif self.config.episodic:
            self._restart(self._state)
        return self._state

    def _build(self, x: Tensor, key: tuple) -> _Adaptation:
        cfg = self.config
        flats, sizes, layout = [], [], []
        where: dict[tuple, int] = {}  # (dtype, device) -> index in flats
        batch = len(x) if cfg.affine is AffineMode.SAMPLE else None
        for norm in self._adapted_norms:
            i = where.setdefault((norm.weight.dtype, norm.weight.device), len(where))
            if i == len(sizes):
                sizes.append([])
            layout.append((i, len(sizes[i]) // 2))
            sizes[i] += [norm.num_features * (batch or 1)] * 2
        sources = []  # per input: index of each flat value in the concatenated initial values (see _restart)
        for (dtype, device), i in where.items():
            flats.append(torch.empty(sum(sizes[i]), dtype=dtype, device=device, requires_grad=True))
            if batch is not None:  # piece of C values starting at `start` -> B copies of them, input-major
                index, start = [], 0
                for size in sizes[i]:
                    index.append(torch.arange(start, start + size // batch, device=device).repeat(batch))
                    start += size // batch
                sources.append(torch.cat(index))
        raw_sigma = None
        if cfg.input is not InputMode.NONE:
            shape = (len(x),) if cfg.input is InputMode.SAMPLE else (1,)
            raw_sigma = torch.empty(shape, dtype=x.dtype, device=x.device, requires_grad=self._learns_sigma)
        # The objective is a batch mean, so a per-input tensor's gradient is 1/B of its own input's term's:
        # with sample_grad='own_term', undo that, so that per-input steps do not depend on the batch size
        # (for any optimizer, not only for the nearly scale-invariant Adam/AdaMod).
        if cfg.sample_grad is SampleGrad.OWN_TERM:
            per_input = list(flats) if cfg.affine is AffineMode.SAMPLE else []
            if self._learns_sigma and cfg.input is InputMode.SAMPLE:
                per_input.append(raw_sigma)
            for tensor in per_input:
                tensor.register_hook(lambda grad, batch=len(x): grad * batch)
        groups = []
        if flats:
            groups.append({"params": flats})
        if self._learns_sigma:
            groups.append({"params": [raw_sigma], "lr": cfg.sigma_lr})
        optimizer = self.make_optimizer(groups, cfg) if groups else None
        state = _Adaptation(flats, sizes, layout, raw_sigma, optimizer, key, batch, sources or None)
        self._restart(state)
        return state

    def _restart(self, state: _Adaptation) -> None:
        """Back to the initial values, in place, and forget the optimizer's moments."""
        with torch.no_grad():
            initial: list[list[Tensor]] = [[] for _ in state.flats]
            for norm, (i, _) in zip(self._adapted_norms, state.layout):
                initial[i] += [norm.weight, norm.bias]
            for i, (flat, values) in enumerate(zip(state.flats, initial)):
                values = torch.cat(values)
                flat.copy_(values if state.sources is None else values[state.sources[i]])  # [C] -> [B, C] blocks
            if state.raw_sigma is not None:
                state.raw_sigma.fill_(self._raw_sigma_init)
        if state.optimizer is not None:
            state.optimizer.state.clear()

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise InvalidInputError(f"Dent expects a tensor of images, got {type(x).__name__}")
        if x.dim() != 4:
            raise InvalidInputError(
                f"Dent expects a batch of images of shape [B, C, H, W], got a {x.dim()}-D tensor of shape "
                f"{list(x.shape)}"
            )
        if not x.is_floating_point():
            raise InvalidInputError(f"Dent expects floating-point pixel values in [0, 1], got dtype {x.dtype}")
        if x.numel() == 0:
            raise InvalidInputError(f"Dent expects a non-empty batch, got shape {list(x.shape)}")
        check_channels(self._in_channels, x, "Dent")
        low, high = torch.stack(torch.aminmax(x.detach())).tolist()  # one device sync; NaN propagates
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(x)).sum())
            raise InvalidInputError(f"Dent expects finite pixel values, got {bad} NaN/Inf value(s) in {list(x.shape)}")
        if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
            raise InvalidInputError(
                f"Dent expects pixel values in [0, 1], got values in [{low:.4g}, {high:.4g}]; pass unnormalized "
                "images (any normalization belongs inside the model)"
            )
