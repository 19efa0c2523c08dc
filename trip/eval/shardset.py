"""A latent shard set as an evaluation input: shards -> latents -> codec -> frames.

The reference clips of a training run usually exist only as latent shards (the shard
contract in trip/data/shards.py). Decoding them through the codec that wrote them
(named in index.json; a VAE path can be overridden) gives the frames the model was
trained to reproduce, so FVD/FID can compare against exactly the training distribution
without keeping the source videos. Shards are read with the loader's own safe reader
and contract check (`.npy` only, no pickle) and decoded one clip at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from trip import storage
from trip.data.shards import (
    INDEX_NAME,
    BadSample,
    Sample,
    decode_sample,
    read_index,
    read_samples,
    shard_latent_shapes,
)


def is_shard_set(root: str) -> bool:
    """True when `root` holds a dataset index.json (a shard set, not a clip directory)."""
    return storage.exists(storage.join(root, INDEX_NAME))


def first_samples(prefix: str, index: dict, limit: int | None = None) -> Iterator[Sample]:
    """The first `limit` samples of a shard set, in index order, decoded and checked against
    index.json (each shard against its own latent shape: a bucketed set holds several); a
    corrupt shard or sample is an error naming the shard (and the member)."""
    n = 0
    for entry, shape in zip(index["shards"], shard_latent_shapes(index), strict=True):
        url = storage.join(prefix, entry["name"])
        samples, error = read_samples(storage.read_bytes(url), url)
        if error:
            raise ValueError(f"shard {url} is corrupt: {error}")
        for sample in samples:
            if limit is not None and n >= limit:
                return
            try:
                decoded = decode_sample(sample, url, latent_shape=shape,
                                        text_shape=index.get("text_shape"))
            except BadSample as e:
                raise ValueError(f"shard {e}") from None
            n += 1
            yield decoded


def load_shard_clips(prefix: str, limit: int | None = None, codec_path: str | None = None,
                     num_frames: int | None = None) -> dict[str, np.ndarray]:
    """{sample key: uint8 frames [T, H, W, 3]} for the first `limit` samples of a shard set."""
    from data_tools.check import build_codec_from_index

    index = read_index(prefix)
    codec = build_codec_from_index(index, codec_path)
    clips: dict[str, np.ndarray] = {}
    for sample in first_samples(prefix, index, limit):
        latents = sample.latents[:num_frames]
        frames = codec.decode(torch.from_numpy(latents.astype(np.float32)))  # [T, 3, H, W] in [0, 1]
        clips[sample.key] = (frames * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if not clips:
        raise ValueError(f"shard set {prefix} has no samples")
    return clips
