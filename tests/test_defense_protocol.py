"""The defense protocol (declared traits, BPDA surrogates) and the registry of defense kinds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dent.defenses import Dent, DentConfig
from dent.defenses.detection import rejects
from dent.defenses.kinds import DEFENSE_KINDS, build_defense, kind_name, parse_defense
from dent.defenses.protocol import Identity, Preprocessed, StraightThrough, Traits, bpda_surrogate, traits_of
from dent.defenses.transforms import JPEG, BitDepth
from dent.confbase import validated
from dent.errors import ConfigError, InvalidInputError
from dent.evaluation.config import EvaluateConfig
from dent.identity import result_tree

from eval_support import tiny_net

#: The traits each built-in kind declares at its default config.
EXPECTED_TRAITS = {
    "dent": Traits(differentiable=True, randomized=False, adaptive=True, cost=21.0),
    "jpeg": Traits(differentiable=False, randomized=False, adaptive=False, cost=1.1),
    "bit_depth": Traits(differentiable=False, randomized=False, adaptive=False, cost=1.0),
    "median": Traits(differentiable=True, randomized=False, adaptive=False, cost=1.05),
    "tvm": Traits(differentiable=False, randomized=True, adaptive=False, cost=1.5),
    "resize_pad": Traits(differentiable=True, randomized=True, adaptive=False, cost=1.05),
    "sap": Traits(differentiable=True, randomized=True, adaptive=False, cost=1.1),
    # the classifier (1) + the detector: the model on the input and on 2 squeezed copies (3) + the median (0.05)
    "feature_squeezing": Traits(differentiable=False, randomized=False, adaptive=False, cost=4.05),
    # the classifier (1) + a trained subnetwork detector reading it (1)
    "detector": Traits(differentiable=True, randomized=False, adaptive=False, cost=2.0),
    # the classifier (1) + the pixel-by-pixel PixelCNN purification (40)
    "pixeldefend": Traits(differentiable=False, randomized=False, adaptive=False, cost=41.0),
}

#: The keys a kind cannot build without: a pipeline's stages, a detector's calibrated threshold (a trained
#: file, a detector or a density model: the fixture ``stored_files``).
REQUIRED_KEYS = {"pipeline": {"stages": ["jpeg", "dent"]}, "feature_squeezing": {"threshold": 0.5}}

#: The kinds that answer K + 1 logits, the last one "rejected" (dent.defenses.detection).
REJECTING = {"feature_squeezing", "detector"}


@pytest.fixture(scope="module")
def stored_detector(tmp_path_factory) -> str:
    """A subnetwork detector fitted around ``tiny_net()`` and stored like ``dent train --export`` stores one."""
    from dent.defenses.detection import SubnetworkDetector
    from dent.defenses.detection.stored import save_detector

    torch.manual_seed(0)
    detector = SubnetworkDetector(tiny_net(), "2", width=4).fit(batch(8), batch(8).flip(-1), epochs=2)
    path = tmp_path_factory.mktemp("detector") / "tiny.safetensors"
    save_detector(detector, "subnetwork", {"layer": "2", "width": 4}, path)
    return str(path)


@pytest.fixture(scope="module")
def stored_density_model(tmp_path_factory) -> str:
    """An (untrained) PixelCNN stored like ``dent train --export`` stores a trained one."""
    from dent.defenses.purification import DENSITY_MODELS, save_density_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("purifier") / "pixelcnn.safetensors"
    return str(save_density_model(DENSITY_MODELS.get("pixelcnn")(), "pixelcnn", path))


@pytest.fixture(scope="module")
def stored_files(stored_detector, stored_density_model) -> dict[str, dict[str, str]]:
    """The keys of the kinds that need a trained file."""
    return {"detector": {"checkpoint": stored_detector}, "pixeldefend": {"density_model": stored_density_model}}


def default_entry(kind: str, stored_files: dict[str, dict[str, str]]):
    return {"kind": kind, **{**REQUIRED_KEYS, **stored_files}.get(kind, {})}


def batch(n=4):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", DEFENSE_KINDS.names())
def test_every_kind_builds_from_its_default_config_and_answers_a_batch(kind, stored_files):
    config = parse_defense(default_entry(kind, stored_files))
    assert kind_name(config) == kind
    defense = build_defense(tiny_net(), config)
    x = batch()
    with torch.no_grad():
        logits = defense(x)
    assert rejects(defense) == (kind in REJECTING)
    assert logits.shape == (4, 10 + (kind in REJECTING)) and torch.isfinite(logits).all()
    traits = traits_of(defense)
    if kind == "pipeline":  # JPEG then dent: not differentiable (JPEG), adaptive (dent), costs add (0.1 + 21)
        assert traits == Traits(differentiable=False, randomized=False, adaptive=True, cost=21.1)
    else:
        assert traits.to_dict() == pytest.approx(EXPECTED_TRAITS[kind].to_dict())
    # every non-differentiable defense has a differentiable surrogate with a gradient
    surrogate = bpda_surrogate(defense)
    assert traits_of(surrogate).differentiable
    xg = x.clone().requires_grad_(True)
    surrogate(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_every_kind_is_covered_by_the_expected_traits():
    assert set(DEFENSE_KINDS.names()) == set(EXPECTED_TRAITS) | {"pipeline"}


@pytest.mark.parametrize("transform", [JPEG(50), BitDepth(3)])
def test_straight_through_keeps_the_forward_and_passes_the_gradient(transform):
    x = batch().requires_grad_(True)
    out = StraightThrough(transform)(x)
    assert torch.equal(out.detach(), transform(x.detach()))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_plain_module_traits_and_bad_declarations():
    assert traits_of(nn.Linear(2, 2)) == Traits()

    class Bad(nn.Module):
        randomized = "yes"

    with pytest.raises(InvalidInputError, match=r"Bad\.randomized must be True or False, got 'yes'"):
        traits_of(Bad())

    class Costly(nn.Module):
        cost = -1

    with pytest.raises(InvalidInputError, match=r"Costly\.cost must be a number >= 0, got -1"):
        traits_of(Costly())


def test_non_differentiable_defense_without_surrogate_is_refused():
    class Opaque(nn.Module):
        differentiable = False

    with pytest.raises(InvalidInputError, match="no bpda_surrogate"):
        bpda_surrogate(Opaque())

    class Lying(nn.Module):
        differentiable = False

        def bpda_surrogate(self):
            return Opaque()

    with pytest.raises(InvalidInputError, match="not differentiable"):
        bpda_surrogate(Lying())


def test_preprocessed_surrogate_replaces_only_the_non_differentiable_part():
    net = tiny_net()
    surrogate = Preprocessed(JPEG(), net).bpda_surrogate()
    assert isinstance(surrogate.transform, StraightThrough) and surrogate.model is net
    assert isinstance(surrogate.transform.approximation, Identity)


def test_pipeline_applies_stages_in_input_order():
    config = parse_defense({"kind": "pipeline", "stages": ["jpeg", {"steps": 2}]})
    defense = build_defense(tiny_net(), config)
    assert isinstance(defense, Preprocessed) and isinstance(defense.transform, JPEG)
    assert isinstance(defense.model, Dent) and defense.model.config.steps == 2


def test_entry_without_kind_or_with_kind_dent_is_the_same_dent_config():
    bare = parse_defense({"steps": 3, "lr": 0.01})
    named = parse_defense({"kind": "dent", "steps": 3, "lr": 0.01})
    assert bare == named == DentConfig(steps=3, lr=0.01)
    assert result_tree(named) == result_tree(DentConfig(steps=3, lr=0.01))  # no `kind` key: unit keys unchanged


def evaluate_config(defenses):
    return validated(EvaluateConfig, {"defenses": defenses})


@pytest.mark.parametrize("entry, message", [
    ({"kind": "jpg"}, r"'defenses\.d'.*unknown defense kind 'jpg' \(did you mean jpeg\?\); valid names: dent, jpeg"),
    ({"kind": "jpeg", "quality": 0}, r"'defenses\.d\.quality'.*greater than or equal to 1"),
    ({"kind": "jpeg", "quality": 96}, r"'defenses\.d\.quality'.*less than or equal to 95"),
    ({"kind": "bit_depth", "bits": 9}, r"'defenses\.d\.bits'.*less than or equal to 8"),
    ({"kind": "bit_depth", "bits": 0}, r"'defenses\.d\.bits'.*greater than or equal to 1"),
    ({"kind": "median", "size": 0}, r"'defenses\.d\.size'.*greater than or equal to 1"),
    ({"kind": "median", "size": 16}, r"'defenses\.d\.size'.*less than or equal to 15"),
    ({"kind": "tvm", "keep": 0}, r"'defenses\.d\.keep'.*greater than 0"),
    ({"kind": "tvm", "keep": 1.5}, r"'defenses\.d\.keep'.*less than or equal to 1"),
    ({"kind": "tvm", "weight": 0}, r"'defenses\.d\.weight'.*greater than 0"),
    ({"kind": "tvm", "iterations": 0}, r"'defenses\.d\.iterations'.*greater than or equal to 1"),
    ({"kind": "tvm", "lr": -1}, r"'defenses\.d\.lr'.*greater than 0"),
    ({"kind": "resize_pad", "min_scale": 0}, r"'defenses\.d\.min_scale'.*greater than 0"),
    ({"kind": "resize_pad", "min_scale": 1.2}, r"'defenses\.d\.min_scale'.*less than or equal to 1"),
    ({"kind": "sap", "fraction": 0}, r"'defenses\.d\.fraction'.*greater than 0"),
    ({"kind": "pipeline", "stages": []}, r"'defenses\.d\.stages'.*at least one stage"),
    ({"kind": "pipeline", "stages": ["jpeg", "blur"]}, r"'defenses\.d\.stages\.1'.*unknown defense kind 'blur'"),
    ({"kind": "pipeline", "stages": [{"kind": "jpeg", "quality": 200}]}, r"'defenses\.d\.stages\.0\.quality'"),
    ({"kind": "jpeg", "qualty": 50}, r"unknown config key 'defenses\.d\.qualty'"),
    ({"kind": "nowhere.at_all:Defense"}, r"cannot import module 'nowhere\.at_all'"),
    ({"kind": "torch.nn:NotThere"}, r"'torch\.nn:NotThere' is not an nn\.Module class"),
    ({"kind": "torch.nn:Dropout", "params": {"bogus": 1}}, r"cannot be built as Dropout\(model, \*\*params\)"),
    ({"kind": "dent", "steps": -1}, r"'defenses\.d\.steps'.*greater than or equal to 0"),
    (3, r"'defenses\.d'.*expected a defense: a mapping of its keys or a kind name, got 3"),
])
def test_bad_defense_entries_name_the_key_and_what_was_expected(entry, message):
    with pytest.raises(ConfigError, match=message):
        evaluate_config({"d": entry})


def test_defense_class_by_import_path_gets_its_params_and_traits():
    config = evaluate_config({"own": {"kind": "eval_support:NoisyDefense", "params": {"std": 0.05}}})
    defense = build_defense(tiny_net(), config.defenses["own"])
    assert defense.std == 0.05
    assert traits_of(defense) == Traits(differentiable=True, randomized=True, adaptive=False, cost=1.0)
    assert result_tree(config)["defenses"]["own"] == {"kind": "eval_support:NoisyDefense", "params": {"std": 0.05}}
