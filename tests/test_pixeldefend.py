"""PixelDefend: the PixelCNN's causal masks and likelihood, purification within eps-defend (checked against a
slow reference), the density-model store and the ``pixeldefend`` kind."""

from __future__ import annotations

import math

import pytest
import torch

from dent.defenses.kinds import build_defense, parse_defense, resolved_defense
from dent.defenses.protocol import bpda_surrogate, traits_of
from dent.defenses.purification import PixelCNN, PixelDefend, bits_per_dim, load_density_model, save_density_model
from dent.defenses.purification.pixelcnn import LEVELS, levels
from dent.errors import ConfigError, CorruptFileError, InvalidInputError

from eval_support import tiny_net
from training_support import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def small_pixelcnn(layers: int = 2, seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    return PixelCNN(channels=8, layers=layers).eval()


def images(n: int = 2, size: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_logits_of_a_pixel_depend_only_on_the_pixels_before_it_in_raster_order():
    model = small_pixelcnn()
    x = images(1).requires_grad_(True)
    row, col = 8, 6  # below its receptive field (5 rows above it): rows 0-2 cannot matter
    model(x)[0, :, :, row, col].sum().backward()
    influence = x.grad.abs().sum(dim=1)[0]  # [H, W]
    position = torch.arange(influence.numel()).view_as(influence)
    assert influence[position >= row * x.shape[3] + col].max() == 0  # itself and everything after: nothing
    assert influence[position < row * x.shape[3] + col].max() > 0
    assert influence[: row - model.receptive_rows].max() == 0  # rows above its receptive field: nothing


@pytest.mark.parametrize("layers", [1, 3])
def test_pixel_logits_on_the_window_equal_the_full_forward_pass(layers):
    model = small_pixelcnn(layers)
    x = images(3, size=12)
    with torch.no_grad():
        full = model(x)
        for row in range(12):
            for col in range(12):
                torch.testing.assert_close(model.pixel_logits(x, row, col), full[..., row, col], rtol=0, atol=1e-5)


def test_bits_per_dim_is_the_mean_negative_log2_likelihood():
    x = images(2, size=4)
    uniform = torch.zeros(2, LEVELS, 3, 4, 4)
    assert bits_per_dim(uniform, x).item() == pytest.approx(8.0)
    logits = torch.randn(2, LEVELS, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    log_p = logits.log_softmax(dim=1).gather(1, levels(x).unsqueeze(1))
    assert bits_per_dim(logits, x).item() == pytest.approx(-log_p.mean().item() / math.log(2), rel=1e-5)


def reference_purification(model: PixelCNN, x: torch.Tensor, eps_defend: float) -> torch.Tensor:
    """Song et al.'s Algorithm 1 written plainly: the full forward pass for every pixel, one channel at a time."""
    radius = round(eps_defend * 255)
    original = levels(x)
    out = original.clone()
    with torch.no_grad():
        for row in range(x.shape[2]):
            for col in range(x.shape[3]):
                logits = model(out.float() / 255)[:, :, :, row, col]  # [B, 256, C]
                for b in range(len(x)):
                    for c in range(x.shape[1]):
                        lo, hi = max(0, original[b, c, row, col] - radius), min(255, original[b, c, row, col] + radius)
                        out[b, c, row, col] = lo + logits[b, lo : hi + 1, c].argmax()
    return out.float() / 255


def test_purification_is_song_et_al_s_greedy_decoding_and_stays_within_eps_defend():
    model = small_pixelcnn()
    x = images(2, size=6)
    purified = PixelDefend(model, 16 / 255)(x)
    torch.testing.assert_close(purified, reference_purification(model, x, 16 / 255), rtol=0, atol=0)
    assert (purified - x).abs().max() <= 16 / 255 + 0.5 / 255 + 1e-6  # the input's own 8-bit rounding
    on_grid = levels(x).float() / 255
    assert (PixelDefend(model, 16 / 255)(on_grid) - on_grid).abs().max() <= 16 / 255 + 1e-6
    assert torch.equal(purified * 255, (purified * 255).round())  # 8-bit values


def test_purification_moves_each_pixel_to_the_density_model_s_most_likely_value():
    model = small_pixelcnn()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():  # every subpixel's logits prefer low values: level k scores -k
        model.head.bias.copy_(-torch.arange(LEVELS).repeat_interleave(3).float())
    x = levels(images(1, size=5)).float() / 255
    expected = (levels(x) - 8).clamp(min=0).float() / 255
    torch.testing.assert_close(PixelDefend(model, 8 / 255)(x), expected, rtol=0, atol=0)
    assert torch.equal(PixelDefend(model, 0.0)(x), x)  # eps_defend 0: the input itself


def test_the_pixeldefend_kind_is_a_non_differentiable_transform_keyed_by_its_density_model(tmp_path):
    path = save_density_model(small_pixelcnn(), "pixelcnn", tmp_path / "p.safetensors")
    with pytest.raises(CorruptFileError, match="do not fit the density model"):  # a 2-layer net is not `pixelcnn`
        load_density_model(str(path))
    torch.manual_seed(0)
    stored = PixelCNN()
    path = save_density_model(stored, "pixelcnn", tmp_path / "p.safetensors")
    loaded = load_density_model(str(path))
    x = images(2, size=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), stored(x), rtol=0, atol=2e-2)  # fp16 weights
    config = parse_defense({"kind": "pixeldefend", "density_model": str(path), "eps_defend": "8/255"})
    resolved = resolved_defense(config, "cpu")
    assert resolved.digest is not None and resolved.eps_defend == pytest.approx(8 / 255)
    defense = build_defense(tiny_net(), resolved)
    traits = traits_of(defense)
    assert not traits.differentiable and not traits.randomized
    xg = x.clone().requires_grad_(True)
    bpda_surrogate(defense)(xg).sum().backward()  # BPDA: the identity's gradient through the purifier
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="digest"):
        resolved_defense(config.model_copy(update={"digest": "0" * 16}), "cpu")


def test_density_model_files_that_are_missing_or_foreign_are_refused_clearly(tmp_path):
    from dent.models.checkpoints import save_safetensors

    with pytest.raises(InvalidInputError, match="no trained density model 'nope'.*dent train"):
        load_density_model("nope")
    foreign = save_safetensors(tiny_net().state_dict(), tmp_path / "classifier.safetensors")
    with pytest.raises(CorruptFileError, match="not a dent density model file"):
        load_density_model(str(foreign))
    with pytest.raises(Exception, match="no trained density model"):
        parse_defense({"kind": "pixeldefend", "density_model": str(tmp_path / "missing.safetensors")})
    with pytest.raises(Exception, match="greater than or equal to 0"):
        parse_defense({"kind": "pixeldefend", "eps_defend": -1})
