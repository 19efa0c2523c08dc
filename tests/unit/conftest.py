"""Fixtures for the model tests: tiny configs that run in milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from trip.config import FusionConfig, ModelConfig, UNetConfig


def _tiny(**overrides) -> ModelConfig:
    base = dict(
        num_frames=4, latent_channels=4, latent_size=8,
        unet=UNetConfig(block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                        attention_head_dim=4, layers_per_block=1),
        fusion=FusionConfig(mode="tnf", patch_size=2, dim=32, heads=4, timestep_dim=32),
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture()
def tiny_model_config() -> Callable[..., ModelConfig]:
    """Factory: tiny_model_config(**ModelConfig overrides)."""
    return _tiny
