"""The image noise prior: TRIP's shortcut path.

One backward diffusion step from each noised frame towards the *first* frame's clean
latent gives that frame's reference noise:

    eps_ref^i = (z_t^i - sqrt(abar_t) * z_0^1) / sqrt(1 - abar_t)

For the first frame it is exactly the noise that was added; for later frames it is that
noise plus the (scaled) difference between frame i and the image, which is what the
residual UNet then only has to correct. It needs nothing but the image latent, so the
same function serves training and every sampling step.
"""

from __future__ import annotations

import torch


def image_noise_prior(
    noisy_latents: torch.Tensor,
    image_latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Reference noise of every frame, computed in float32.

    Args:
        noisy_latents: z_t, [B, C, F, H, W].
        image_latents: z_0^1, the clean latent of the given image, [B, C, H, W].
        alphas_cumprod: abar over the schedule, [T].
        timesteps: t per sample, integer, [B].

    Returns:
        eps_ref, [B, C, F, H, W], float32.
    """
    if noisy_latents.ndim != 5:
        raise ValueError(f"noisy_latents must be [B, C, F, H, W], got shape {tuple(noisy_latents.shape)}")
    b, c, _, h, w = noisy_latents.shape
    if tuple(image_latents.shape) != (b, c, h, w):
        raise ValueError(
            f"image_latents must be [B, C, H, W] = {(b, c, h, w)}, got {tuple(image_latents.shape)}"
        )
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be [T], got shape {tuple(alphas_cumprod.shape)}")
    if timesteps.ndim != 1 or timesteps.shape[0] != b:
        raise ValueError(f"timesteps must be [B] = [{b}], got shape {tuple(timesteps.shape)}")
    abar = alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps.long()]
    abar = abar.view(b, 1, 1, 1, 1)
    z_t = noisy_latents.float()
    z_0 = image_latents.float().unsqueeze(2)  # broadcast over frames
    return (z_t - abar.sqrt() * z_0) / (1.0 - abar).sqrt()
