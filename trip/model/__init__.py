"""The TRIP model (single-device code; parallelism is applied from trip/train)."""

from trip.model.fusion import LinearFusion, NoFusion, TemporalNoiseFusion, build_fusion
from trip.model.noise_prior import image_noise_prior
from trip.model.trip import TRIPModel, TRIPOutput
from trip.model.unet import ResidualUNet3D

__all__ = [
    "LinearFusion", "NoFusion", "ResidualUNet3D", "TRIPModel", "TRIPOutput", "TemporalNoiseFusion",
    "build_fusion", "image_noise_prior",
]
