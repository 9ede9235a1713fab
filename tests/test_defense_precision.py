"""Precision and memory-format fast paths of Dent: outputs agree with float32 within the documented
tolerances, ``autocast='auto'`` resolves by the hardware, and a unit's key records the precision used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dent import runtime
from dent.defenses import Dent, DentConfig
from dent.evaluation.config import EvaluateConfig
from dent.evaluation.runner import measured_identity, plan

from test_bench import tiny_net

CPU = torch.device("cpu")


def small_resnet():
    """The small BN convnet of the bench tests, in float32 (the fast paths are for float32 models)."""
    return tiny_net(dtype=torch.float32)


def images(n=8, seed=1):
    torch.manual_seed(seed)
    return torch.rand(n, 3, 8, 8)


@pytest.fixture
def bf16_native(monkeypatch):
    """Pretend the CPU has (or lacks) native bf16."""

    def set_to(value: bool):
        monkeypatch.setattr(runtime, "native_bf16", lambda device: (value, f"pretended {value}"))

    return set_to


def test_auto_resolves_by_native_bf16_support(bf16_native):
    config = DentConfig(autocast="auto", autocast_prediction=True)
    bf16_native(True)
    assert config.resolved(CPU).autocast == "bfloat16" and config.resolved(CPU).autocast_prediction
    bf16_native(False)
    plain = config.resolved("cpu")
    assert plain.autocast == "none" and not plain.autocast_prediction
    assert plain == DentConfig()  # so an fp32 result resumes under auto where auto means fp32
    assert DentConfig(autocast="bfloat16").resolved(CPU).autocast == "bfloat16"  # explicit values stay


def test_native_bf16_reports_why():
    supported, why = runtime.native_bf16(CPU)
    cpu = runtime.cpu_capability()
    assert supported == cpu["bf16"] and cpu["capability"] in why
    assert not runtime.native_bf16(torch.device("meta"))[0]


def test_prediction_autocast_needs_autocast():
    with pytest.raises(ValueError, match="autocast_prediction=True .* needs autocast"):
        DentConfig(autocast_prediction=True)


def unit_keys(defense: dict, device=CPU) -> set[str]:
    cfg = EvaluateConfig.model_validate({"defenses": {"d": defense}, "data": {"n_images": 4, "batch_size": 4},
                                         "attack": {"attacks": []}})
    return {u.key for u in plan(cfg, measured_identity(cfg), 4, device=device)}


def test_unit_key_records_the_resolved_precision(bf16_native):
    fp32, bf16 = unit_keys({"steps": 1}), unit_keys({"steps": 1, "autocast": "bfloat16"})
    assert fp32 != bf16
    bf16_native(True)
    assert unit_keys({"steps": 1, "autocast": "auto"}) == bf16  # a bf16 result never resumes an fp32 run
    bf16_native(False)
    assert unit_keys({"steps": 1, "autocast": "auto"}) == fp32  # auto on a machine without native bf16
    assert unit_keys({"steps": 1, "autocast": "bfloat16", "autocast_prediction": True}) != bf16
    assert unit_keys({"steps": 1, "memory_format": "channels_last"}) == fp32  # a layout, not a result


def test_default_config_keeps_its_unit_key_shape():
    tree = DentConfig(steps=1).to_dict()
    assert not {"autocast", "autocast_prediction", "memory_format"} & set(tree)


def agreement(config: DentConfig, net: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    full = Dent(net, config.replace(autocast="none", autocast_prediction=False, memory_format="contiguous"))(x)
    fast = Dent(net, config)(x)
    assert fast.dtype == torch.float32
    return (fast - full).abs().max().item(), (fast.argmax(1) == full.argmax(1)).float().mean().item()


#: Each fast path and its documented tolerance on a small model (docs/performance.md, "Accuracy"):
#: channels-last changes only the summation order; bf16 rounds activations to 8 bits of mantissa.
FAST_PATHS = {
    "channels_last": (dict(memory_format="channels_last"), 1e-5),
    "channels_last dent+": (dict(preset="dent_plus_official", memory_format="channels_last"), 1e-5),
    "bf16 steps": (dict(autocast="bfloat16"), 1e-3),
    "bf16 steps+prediction": (dict(autocast="bfloat16", autocast_prediction=True), 1e-2),
    "bf16 dent+ channels_last": (dict(preset="dent_plus_bsi", autocast="bfloat16", memory_format="channels_last"), 5e-2),
    "auto layout": (dict(memory_format="auto"), 1e-5),
}


@pytest.mark.parametrize("name", list(FAST_PATHS))
def test_fast_path_agrees_with_float32(name):
    overrides, tolerance = FAST_PATHS[name]
    config = DentConfig(**{"steps": 3, "lr": 0.01, **overrides})
    if "preset" in overrides:
        config = config.replace(steps=3)
    diff, agree = agreement(config, small_resnet(), images())
    assert diff <= tolerance and agree == 1.0
    assert diff > 0 or "bf16" not in name  # bf16 really ran in bf16


def test_auto_layout_is_measured_once_per_shape():
    dent = Dent(small_resnet(), DentConfig(steps=1, memory_format="auto"))
    x = images()
    dent(x), dent(x), dent(x[:4])
    assert sorted(k[0] for k in dent.measured_formats) == [(4, 3, 8, 8), (8, 3, 8, 8)]
    for measured in dent.measured_formats.values():
        faster = min(("contiguous", "channels_last"), key=lambda f: measured[f + "_s"])
        assert measured["format"] == faster


def test_channels_last_leaves_the_model_alone():
    net, x = small_resnet(), images()
    before = {k: (v.clone(), v.stride()) for k, v in net.state_dict().items()}
    Dent(net, DentConfig(steps=2, memory_format="channels_last", affine="sample"))(x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1]


def test_differentiable_dent_predicts_like_dent_under_autocast():
    from dent.defenses.differentiable import DifferentiableDent

    net, x = small_resnet(), images()
    dent = Dent(net, DentConfig(steps=2, lr=0.01, autocast="bfloat16", autocast_prediction=True))
    plain = dent(x)
    through = DifferentiableDent(dent)(x.clone().requires_grad_())
    assert through.dtype == torch.float32
    torch.testing.assert_close(through, plain, rtol=0, atol=2e-2)


def test_cached_weight_copies_follow_in_place_changes_of_the_model():
    net, x = small_resnet(), images()
    dent = Dent(net, DentConfig(steps=1, autocast="bfloat16", memory_format="channels_last"))
    before = dent(x)
    with torch.no_grad():
        net[0].weight.mul_(0.5)  # a changed model must not be served from stale bf16 copies
    after = dent(x)
    fresh = Dent(net, DentConfig(steps=1, autocast="bfloat16", memory_format="channels_last"))(x)
    assert not torch.allclose(before, after) and torch.equal(after, fresh)


def test_a_pipeline_resolves_the_precision_of_its_dent_stages():
    """`autocast: auto` inside a pipeline is fixed per device like a bare dent entry, so keys record it."""
    from dent.defenses.kinds import resolved_defense
    from dent.evaluation.config import EvaluateConfig

    cfg = EvaluateConfig.load(None, ["defenses.p={kind: pipeline, stages: [jpeg, {autocast: auto}]}"])
    resolved = resolved_defense(cfg.defenses["p"], "cpu")
    stage = resolved.stages[1]
    assert stage.autocast in ("none", "bfloat16")
    assert stage == cfg.defenses["p"].stages[1].resolved("cpu")
    assert resolved.stages[0] == cfg.defenses["p"].stages[0]
