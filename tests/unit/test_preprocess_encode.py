"""Batched encoding: same latents as the codec frame by frame; identities from configs alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tools.encode import ClipEncoder, codec_identity, latent_shape, text_encoder_identity
from data_tools.models import save_random_clip_text, save_random_vae
from trip.codec import LosslessCodec, VAECodec
from trip.config import CodecConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-models"))
    save_random_vae(path, block_out_channels=(8, 16), latent_channels=4)
    save_random_clip_text(path, hidden_size=16)
    return path


def _clips(n: int = 3, f: int = 4, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, f, size, size, 3), dtype=np.uint8)


def test_lossless_batches_equal_the_codec() -> None:
    clips = _clips()
    enc = ClipEncoder(CodecConfig(kind="lossless", downscale=2), batch_size=5, device="cpu")
    lat = enc.encode_frames(clips)
    assert lat.shape == (3, 4, 12, 8, 8) and lat.dtype == np.float16
    direct = LosslessCodec(2).encode(torch.from_numpy(clips[1]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_array_equal(lat[1], direct.numpy().astype(np.float16))
    assert enc.encode_text(["x"]) is None


def test_vae_batches_match_unbatched_and_identity_from_config(model_dir: str) -> None:
    cfg = CodecConfig(kind="vae", path=model_dir)
    clips = _clips()
    lat = ClipEncoder(cfg, batch_size=5, device="cpu").encode_frames(clips)
    assert lat.shape == (3, 4, 4, 8, 8) and lat.dtype == np.float16
    vae = VAECodec(model_dir)
    direct = vae.encode(torch.from_numpy(clips[2]).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_allclose(lat[2].astype(np.float32), direct, atol=2e-3, rtol=2e-3)
    assert codec_identity(cfg) == vae.identity()
    assert latent_shape(cfg, 4, 16) == [4, 4, 8, 8]
    with pytest.raises(ValueError, match="not divisible"):
        latent_shape(cfg, 4, 15)


def test_text_states_padded_to_max_length(model_dir: str) -> None:
    enc = ClipEncoder(CodecConfig(kind="lossless"), text_encoder=model_dir, max_text_length=12,
                      device="cpu")
    text = enc.encode_text(["a red circle moving left", "a blue square moving up"])
    assert text.shape == (2, 12, 16) and text.dtype == np.float16
    assert not np.allclose(text[0], text[1])
    again = enc.encode_text(["a blue square moving up"])
    np.testing.assert_array_equal(again[0], text[1])
    assert text_encoder_identity(model_dir, 12) == {
        "source": model_dir, "max_length": 12, "hidden_size": 16, "model_type": "clip_text_model"}
    assert text_encoder_identity(None, 12) is None


def test_missing_model_files_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        codec_identity(CodecConfig(kind="vae", path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        text_encoder_identity(str(tmp_path), 77)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_half_precision_on_gpu_matches_cpu(model_dir: str) -> None:
    clips = _clips()
    cpu = ClipEncoder(CodecConfig(kind="vae", path=model_dir), text_encoder=model_dir,
                      max_text_length=8, device="cpu")
    gpu = ClipEncoder(CodecConfig(kind="vae", path=model_dir, dtype="float16"), text_encoder=model_dir,
                      max_text_length=8, device="cuda")
    assert next(gpu.text.model.parameters()).dtype == torch.float16
    np.testing.assert_allclose(gpu.encode_frames(clips).astype(np.float32),
                               cpu.encode_frames(clips).astype(np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(gpu.encode_text(["a red circle"]).astype(np.float32),
                               cpu.encode_text(["a red circle"]).astype(np.float32), atol=2e-2, rtol=2e-2)
