"""Streaming latent data for training: the exactly-once `LatentLoader` (see loader.py)."""

from trip.data.loader import CorruptDataError, LatentLoader

__all__ = ["CorruptDataError", "LatentLoader"]
