"""The differentiable Gaussian blur (dent's input adaptation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dent.defenses.blur import gaussian_blur, kernel_radius


def images(batch=3, size=9, seed=0):
    torch.manual_seed(seed)
    return torch.rand(batch, 3, size, size, dtype=torch.float64)


def reference_blur(image, sigma, max_kernel_size=15):
    """Direct 2-D convolution with the truncated, normalized Gaussian (not separable), replicate borders."""
    radius = min(math.ceil(3 * sigma), max_kernel_size // 2)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    kernel = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)


@pytest.mark.parametrize("sigma, radius", [(0.1, 1), (0.5, 2), (1.0, 3), (1.01, 4), (10.0, 7)])
def test_kernel_size_follows_sigma_and_is_capped(sigma, radius):
    assert kernel_radius(torch.tensor([sigma]), max_kernel_size=15).item() == radius


def test_kernel_cap_follows_max_kernel_size():
    assert kernel_radius(torch.tensor([10.0]), max_kernel_size=5).item() == 2


@pytest.mark.parametrize("sigma", [0.4, 0.9, 2.0, 4.0])
def test_matches_direct_2d_convolution(sigma):
    x = images()
    out = gaussian_blur(x, torch.tensor([sigma], dtype=torch.float64), max_kernel_size=15)
    torch.testing.assert_close(out, reference_blur(x, sigma), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1e-8, 1e-3, 0.05])
def test_vanishing_sigma_is_the_identity(sigma):
    x = images()
    out = gaussian_blur(x, torch.tensor([sigma], dtype=torch.float64), max_kernel_size=15)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-30)


def test_float32_small_sigma_is_exactly_the_identity():
    x = images().float()
    assert torch.equal(gaussian_blur(x, torch.tensor([1e-3]), 15), x)


def test_constant_images_are_unchanged_even_when_the_kernel_exceeds_the_image():
    x = torch.full((2, 3, 3, 3), 0.3, dtype=torch.float64)
    out = gaussian_blur(x, torch.tensor([3.0, 0.7], dtype=torch.float64), max_kernel_size=15)  # radius 7 > 3 px
    torch.testing.assert_close(out, x, rtol=0, atol=1e-14)


def test_per_input_sigma_blurs_each_input_independently():
    x = images(batch=3)
    sigma = torch.tensor([0.3, 1.7, 0.9], dtype=torch.float64)
    together = gaussian_blur(x, sigma, max_kernel_size=15)
    for i in range(3):
        alone = gaussian_blur(x[i : i + 1], sigma[i : i + 1], max_kernel_size=15)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-15)
        torch.testing.assert_close(alone, reference_blur(x[i : i + 1], sigma[i].item()), rtol=0, atol=1e-12)


def test_gradient_wrt_sigma_is_nonzero_and_correct():
    x = images(batch=2, size=5)
    sigma = torch.tensor([0.8, 1.3], dtype=torch.float64, requires_grad=True)  # away from kernel-size jumps
    (grad,) = torch.autograd.grad(gaussian_blur(x, sigma, 15).square().sum(), sigma)
    assert torch.isfinite(grad).all() and (grad.abs() > 1e-6).all()
    assert torch.autograd.gradcheck(lambda s: gaussian_blur(x, s, 15).square().sum(), (sigma,))


def test_gradient_wrt_images_flows():
    x = images(batch=1, size=4).requires_grad_()
    weights = torch.rand_like(x)

    def weighted_blur(im):
        return (gaussian_blur(im, torch.tensor([0.7], dtype=torch.float64), 15) * weights).sum()

    assert torch.autograd.gradcheck(weighted_blur, (x,))
