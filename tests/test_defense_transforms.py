"""Input transforms and SAP: each one's defining property."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import median_filter
from torch import nn

from dent.defenses.sap import SAP, sap_factor
from dent.defenses.transforms import JPEG, BitDepth, MedianSmoothing, RandomResizePad, TotalVariationMin
from dent.defenses.transforms.tvm import total_variation
from dent.errors import InvalidInputError

from eval_support import tiny_net


def images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quality", [10, 75, 95])
def test_jpeg_equals_pil_encode_decode_of_the_same_uint8_image(quality):
    x = images()
    out = JPEG(quality)(x)
    for i in range(len(x)):
        u8 = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(u8).save(buffer, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        assert torch.equal((out[i] * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected.copy()))
    assert not torch.allclose(out, x, atol=1 / 255)  # JPEG changes random images


def test_jpeg_on_one_channel_images():
    x = images(2)[:, :1]
    out = JPEG(50)(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_bit_depth_takes_the_nearest_of_2_to_the_bits_levels(bits):
    x = images()
    out = BitDepth(bits)(x)
    levels = torch.arange(2 ** bits) / (2 ** bits - 1)
    nearest = levels[(x[..., None] - levels).abs().argmin(dim=-1)]
    assert torch.allclose(out, nearest, atol=1e-6)
    assert len(out.unique()) <= 2 ** bits


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_median_smoothing_equals_scipy_median_filter(size):
    """Borders included: scipy's default mode, as Xu et al.'s code (and ART's SpatialSmoothing) use it."""
    x = images(2, 9)
    out = MedianSmoothing(size)(x)
    for i in range(2):
        for c in range(3):
            expected = median_filter(x[i, c].numpy(), size=size)
            assert np.allclose(out[i, c].numpy(), expected, atol=1e-7)


def test_median_removes_salt_noise_and_has_a_gradient():
    x = torch.full((1, 1, 8, 8), 0.5)
    x[0, 0, 3, 4] = 1.0
    assert torch.equal(MedianSmoothing(3)(x), torch.full_like(x, 0.5))
    x = images(1).requires_grad_(True)
    MedianSmoothing(3)(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_total_variation_minimization_reduces_total_variation_and_keeps_range():
    torch.manual_seed(0)
    x = images()
    out = TotalVariationMin()(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert (total_variation(out) < 0.8 * total_variation(x)).all()
    torch.manual_seed(0)
    stronger = TotalVariationMin(weight=0.1)(x)
    assert (total_variation(stronger) < total_variation(out)).all()  # a larger TV weight removes more
    # a smooth image is (nearly) kept: the data term holds it where there is nothing to remove
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(TotalVariationMin()(flat), flat, atol=1e-3)


def test_total_variation_minimization_is_random_in_its_mask():
    x = images(1)
    torch.manual_seed(0)
    a = TotalVariationMin()(x)
    b = TotalVariationMin()(x)
    assert not torch.equal(a, b)


def test_random_resize_pad_keeps_shape_and_range_and_varies():
    torch.manual_seed(0)
    x = images(8, 32)
    outs = [RandomResizePad(0.8)(x) for _ in range(3)]
    for out in outs:
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        # zero padding: every image has a zero border row or column unless it kept full size
        assert out.dtype == x.dtype
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(RandomResizePad(1.0)(x), x)  # scale 1: resize to the same size, no padding


def test_transforms_refuse_inputs_out_of_range():
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        JPEG()(images() * 2)
    with pytest.raises(InvalidInputError, match=r"\[B, C, H, W\]"):
        BitDepth()(torch.rand(3, 8, 8))


def test_sap_factor_has_expectation_one_statistically():
    """E[h * factor] = h for every activation: SAP's rescaling by the inverse keep probability."""
    torch.manual_seed(0)
    h = 0.02 + torch.rand(1, 50) ** 3  # skewed magnitudes: small ones are kept in about 1 draw in 10
    draws = 10000
    factors = torch.stack([sap_factor(h, 0.2) for _ in range(draws)])
    mean = (h * factors).mean(dim=0)
    se = (h * factors).std(dim=0) / draws ** 0.5
    assert ((mean - h).abs() <= 5 * se + 1e-6).all()
    # and it does prune: a draw keeps far from all activations
    assert (factors[0] == 0).float().mean() > 0.3


def test_sap_prunes_only_inside_its_own_calls():
    net = tiny_net()
    x = images(4, 8)
    with torch.no_grad():
        plain = net(x)
        torch.manual_seed(0)
        sap = SAP(net, fraction=0.1)
        pruned = sap(x)
        after = net(x)
    assert not torch.allclose(pruned, plain)
    assert torch.equal(after, plain)  # the wrapped model serves other defenses unchanged


class FunctionalReLUNet(nn.Module):
    """Applies its activation as a function (as pyautoattack's ResNet-18 does): no activation module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_sap_on_a_model_with_functional_activations_prunes_the_inputs_of_its_later_layers():
    net = FunctionalReLUNet()
    x = images(4, 8)
    sap = SAP(net, fraction=0.05)
    assert sap.pruned.startswith("inputs of convolution and linear layers")
    seen = []
    net.fc.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    torch.manual_seed(0)
    with torch.no_grad():
        activation = torch.relu(net.conv(x)).flatten(1)
        sap(x)
    pruned = seen[-1]
    kept = pruned != 0
    assert (kept.float().mean() < 0.5) and kept.any()  # a draw of 5% of the map keeps few activations
    assert (pruned[~kept & (activation > 0)] == 0).all() and (pruned[kept] >= activation[kept]).all()  # rescaled up
    assert SAP(tiny_net()).pruned == "activation outputs"


def test_sap_needs_activations():
    with pytest.raises(InvalidInputError, match="activation module"):
        SAP(nn.Linear(3, 2))
