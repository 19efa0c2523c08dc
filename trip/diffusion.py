"""Diffusion math around the model: schedulers and the training objective.

`TRIPObjective` is the training wrapper: given a batch of clean latents it samples a
timestep per clip and independent noise per frame with a diffusers scheduler, runs the
model, and returns the paper's plain MSE between the fused prediction and the true noise.
It is an `nn.Module` so a DeepSpeed engine can wrap it whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DDPMScheduler

from trip.config import DiffusionConfig
from trip.model import TRIPModel


def scheduler_kwargs(cfg: DiffusionConfig) -> dict:
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(**scheduler_kwargs(cfg))


def sample_scheduler(cfg: DiffusionConfig) -> DDIMScheduler:
    # set_alpha_to_one=False: the last step lands on abar_0 of the training schedule.
    return DDIMScheduler(**scheduler_kwargs(cfg), clip_sample=False, set_alpha_to_one=False)


class TRIPObjective(nn.Module):
    """model + noise/timestep sampling -> scalar MSE loss."""

    def __init__(self, model: TRIPModel, text_dropout: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.scheduler = train_scheduler(model.diffusion_cfg)
        self.text_dropout = text_dropout

    def forward(self, latents: torch.Tensor, image_latents: torch.Tensor,
                text_states: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one batch.

        Args:
            latents: clean video latents [B, C, F, H, W].
            image_latents: clean conditioning latent [B, C, H, W].
            text_states: [B, L, D] or None.
            valid: [B] bool; padded samples (False) do not count.
            timesteps, noise: fixed instead of sampled (tests).
        """
        b = latents.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=latents.device)
        if noise is None:
            noise = torch.randn_like(latents, dtype=torch.float32)
        noisy = self.scheduler.add_noise(latents.float(), noise, timesteps)
        if text_states is not None and self.training and self.text_dropout > 0:
            keep = (torch.rand(b, device=latents.device) >= self.text_dropout).view(b, 1, 1)
            text_states = text_states * keep.to(text_states.dtype)
        out = self.model(noisy.to(latents.dtype), image_latents, timesteps, text_states)
        err = (out.noise.float() - noise).pow(2).mean(dim=(1, 2, 3, 4))
        if valid is not None:
            w = valid.float()
            return (err * w).sum() / w.sum().clamp(min=1.0)
        return err.mean()
