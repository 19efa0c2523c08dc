"""Diffusion math around the model: schedulers and the training objective.

`TRIPObjective` is the training wrapper: given a batch of clean latents it samples a
timestep per clip and independent noise per frame with a diffusers scheduler, runs the
model, and returns the paper's plain MSE between the fused prediction and the true noise.
It is an `nn.Module` so a DeepSpeed engine can wrap it whole.

`SampleDraws` gives each training sample its timestep, noise and text-dropout draw from
(seed, epoch, position in the epoch's order) alone. A sample therefore gets the same noise
on whichever rank trains it: runs at different world sizes train on the same targets, and a
resumed run continues exactly, with no RNG state to checkpoint.
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


class SampleDraws:
    """Per-sample random draws keyed by (seed, epoch, position), independent of rank and batch."""

    def __init__(self, seed: int, num_train_timesteps: int, text_dropout: float) -> None:
        self.seed, self.num_train_timesteps, self.text_dropout = int(seed), num_train_timesteps, text_dropout

    def __call__(self, positions: torch.Tensor, epoch: int, shape: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps int64 [B], noise float32 [B, *shape], keep_text bool [B]) on the CPU."""
        import numpy as np

        b = positions.numel()
        t = torch.empty(b, dtype=torch.int64)
        noise = torch.empty((b, *shape), dtype=torch.float32)
        keep = torch.empty(b, dtype=torch.bool)
        for i, p in enumerate(positions.tolist()):
            # the whole triple seeds the stream (numpy's SeedSequence keeps all of it; torch's
            # CPU generator would keep 32 bits, and 10.7M positions would share seeds)
            g = np.random.default_rng([self.seed, int(epoch), int(p)])
            t[i] = int(g.integers(0, self.num_train_timesteps))
            keep[i] = bool(g.random() >= self.text_dropout)
            noise[i] = torch.from_numpy(g.standard_normal(shape, dtype=np.float32))
        return t, noise, keep


class TRIPObjective(nn.Module):
    """model + noise/timestep sampling -> scalar MSE loss.

    The paper's loss is the MSE of the fused prediction alone. `residual_weight` > 0 adds
    that weight times the MSE of the residual UNet's own prediction: a UNet trained from
    scratch is at first a far worse noise estimate than the image noise prior, so the fusion
    learns to take the prior (lambda -> 1 on every frame), which leaves the UNet almost no
    gradient ((1 - lambda) times the loss's), so it never becomes the better estimate for the
    frames that move. The extra term keeps the UNet learning what a pretrained one already
    knows (`train.residual_loss_weight`; measured in `bench.ablation`)."""

    def __init__(self, model: TRIPModel, text_dropout: float = 0.0, residual_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.scheduler = train_scheduler(model.diffusion_cfg)
        self.text_dropout = text_dropout
        # with no shortcut (TRIP^-) the residual *is* the prediction: nothing to add
        self.residual_weight = residual_weight if model.cfg.fusion.mode != "none" else 0.0

    def forward(self, latents: torch.Tensor, image_latents: torch.Tensor,
                text_states: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                keep_text: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one batch.

        Args:
            latents: clean video latents [B, C, F, H, W].
            image_latents: clean conditioning latent [B, C, H, W].
            text_states: [B, L, D] or None.
            valid: [B] bool; padded samples (False) do not count.
            timesteps, noise: given instead of sampled ([B] int64, [B, C, F, H, W] float32).
            keep_text: [B] bool, which samples keep their text (default: drawn with text_dropout).
            weights: [B] float; when given the loss is sum(weights * per-sample MSE) instead of the
                mean over valid samples (the training loop weights every sample by 1/global batch).
        """
        b = latents.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=latents.device)
        if noise is None:
            noise = torch.randn_like(latents, dtype=torch.float32)
        noisy = self.scheduler.add_noise(latents.float(), noise, timesteps)
        if text_states is not None and keep_text is not None:
            text_states = text_states * keep_text.view(b, 1, 1).to(text_states.dtype)
        elif text_states is not None and self.training and self.text_dropout > 0:
            keep = (torch.rand(b, device=latents.device) >= self.text_dropout).view(b, 1, 1)
            text_states = text_states * keep.to(text_states.dtype)
        out = self.model(noisy.to(latents.dtype), image_latents, timesteps, text_states)
        err = (out.noise.float() - noise).pow(2).mean(dim=(1, 2, 3, 4))
        if self.residual_weight:
            err = err + self.residual_weight * (out.residual.float() - noise).pow(2).mean(dim=(1, 2, 3, 4))
        if weights is not None:
            return (err * weights.float()).sum()
        if valid is not None:
            w = valid.float()
            return (err * w).sum() / w.sum().clamp(min=1.0)
        return err.mean()
