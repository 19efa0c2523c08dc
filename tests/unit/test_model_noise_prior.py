"""The image noise prior: exact on frame 1, the paper's formula elsewhere."""

import pytest
import torch

from trip.config import DiffusionConfig
from trip.model.noise_prior import image_noise_prior
from trip.model.trip import alphas_cumprod_for


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    abar = alphas_cumprod_for(DiffusionConfig())
    z0 = torch.randn(3, 4, 5, 8, 8)
    eps = torch.randn_like(z0)
    t = torch.tensor([0, 500, 999])
    a = abar[t].view(3, 1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    return abar, z0, eps, t, zt


def test_first_frame_reference_noise_is_the_true_noise(setup):
    abar, z0, eps, t, zt = setup
    ref = image_noise_prior(zt, z0[:, :, 0], abar, t)
    torch.testing.assert_close(ref[:, :, 0], eps[:, :, 0], rtol=1e-4, atol=1e-4)


def test_other_frames_match_an_independent_computation(setup):
    abar, z0, eps, t, zt = setup
    ref = image_noise_prior(zt, z0[:, :, 0], abar, t)
    for b in range(3):
        a = float(abar[t[b]].double())
        for i in range(1, 5):
            expected = (zt[b, :, i].double() - a ** 0.5 * z0[b, :, 0].double()) / (1 - a) ** 0.5
            torch.testing.assert_close(ref[b, :, i].double(), expected, rtol=1e-5, atol=1e-5)


def test_shape_and_float32_output_from_half_inputs(setup):
    abar, z0, _, t, zt = setup
    ref = image_noise_prior(zt.half(), z0[:, :, 0].half(), abar, t)
    assert ref.shape == zt.shape and ref.dtype == torch.float32


@pytest.mark.parametrize("noisy,image,timesteps,match", [
    ((3, 4, 8, 8), (3, 4, 8, 8), (3,), r"noisy_latents must be \[B, C, F, H, W\], got shape \(3, 4, 8, 8\)"),
    ((3, 4, 5, 8, 8), (3, 4, 5, 8, 8), (3,), r"image_latents must be \[B, C, H, W\] = \(3, 4, 8, 8\), got"),
    ((3, 4, 5, 8, 8), (3, 4, 8, 8), (2,), r"timesteps must be \[B\] = \[3\], got shape \(2,\)"),
])
def test_bad_shapes_raise_value_error_naming_expected_and_got(noisy, image, timesteps, match):
    with pytest.raises(ValueError, match=match):
        image_noise_prior(torch.zeros(noisy), torch.zeros(image), torch.rand(10), torch.zeros(timesteps, dtype=torch.long))
