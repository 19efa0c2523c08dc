"""Small synthetic latent datasets written through the real shard contract.

Tests and `bench/loader.py` need datasets of chosen shapes and (uneven) shard sizes on
local disk or object storage; writing them with `trip.data.shards.ShardWriter` keeps
the loader honest against the very bytes preprocessing produces. No binary test data
lives in git: everything is generated on the fly from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trip.data.shards import ShardWriter, build_index, write_index


def sample_key(shard: int, ordinal: int) -> str:
    return f"s{shard:04d}_{ordinal:05d}"


def write_synthetic_dataset(prefix: str, shard_sizes: Sequence[int], *,
                            latent_shape: Sequence[int] = (4, 3, 4, 4),
                            text_shape: Sequence[int] | None = (5, 8), seed: int = 0) -> dict[str, Any]:
    """Write shards of random latents (+ text states) and index.json under `prefix`.

    Sample `sample_key(s, i)` carries its identity in its latents: frame 0, channel 0 holds
    s at pixel (0, 0) and i at pixel (0, 1) (exact in float16 below 2048), so a test can
    check that every delivered tensor belongs to its key.
    Returns the index dict.
    """
    rng = np.random.default_rng(seed)
    infos = []
    for s, n in enumerate(shard_sizes):
        writer = ShardWriter(prefix, s)
        for i in range(n):
            lat = rng.standard_normal(tuple(latent_shape)).astype(np.float16)
            lat[0, 0, 0, 0], lat[0, 0, 0, 1] = s, i
            text = rng.standard_normal(tuple(text_shape)).astype(np.float16) if text_shape else None
            key = sample_key(s, i)
            writer.add(key, lat, {"videoid": key, "caption": f"caption {key}"}, f"caption {key}", text)
        infos.append(writer.commit())
    index = build_index(infos, latent_shape=list(latent_shape),
                        text_shape=list(text_shape) if text_shape else None,
                        codec={"kind": "synthetic", "scaling_factor": 1.0}, text_encoder=None)
    write_index(prefix, index)
    return index
