"""The evaluation networks load by path through the real code paths, with tiny random weights.

CLIP: a tiny random `CLIPVisionModelWithProjection` / `CLIPModel` saved with save_pretrained.
I3D / Inception: our architectures saved as state dicts (torch.save, loaded weights-only),
and tiny TorchScript modules with the StyleGAN-style `forward(x, rescale, resize,
return_features)` signature. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trip.eval.fconsistency import ClipImageEncoder, video_f_consistency
from trip.eval.features import clip_features, frame_features, load_feature_net
from trip.eval.frechet import frechet_distance_features
from trip.eval.i3d import InceptionI3d
from trip.eval.inception import FIDInceptionV3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: OpenMP threads spinning against other
    processes made one Inception forward 50x slower than a single thread. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8, projection_dim=16)


class StyleGanLikeDetector(nn.Module):
    """Returns per-channel [mean, max] of its input; insists on the flags we must pass."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        assert return_features and not rescale and not resize
        flat = x.flatten(2)
        return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)


class PlainDetector(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)


class NotWeights:
    """An arbitrary object: a weights-only load must refuse to unpickle it."""


def _video(rng: np.random.Generator, t: int = 8, h: int = 32, w: int = 32) -> np.ndarray:
    return rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def _blend_video(rng: np.random.Generator, t: int = 10) -> np.ndarray:
    """Frames fading from one random image to another: content changes steadily with time."""
    a, b = rng.uniform(0, 255, (2, 32, 32, 3))
    w = np.linspace(0.0, 1.0, t)[:, None, None, None]
    return ((1 - w) * a + w * b).round().astype(np.uint8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip_vision")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**_VISION)).save_pretrained(path)
    return str(path)


def test_eval_static_video_scores_100_and_changing_videos_lower(clip_dir: str) -> None:
    rng = np.random.default_rng(0)
    enc = ClipImageEncoder(clip_dir)
    static = np.repeat(_video(rng, 1), 8, axis=0)
    scores = video_f_consistency(enc, static)
    assert scores["f_consistency_4"] == pytest.approx(100.0, abs=1e-4)
    assert scores["f_consistency_all"] == pytest.approx(100.0, abs=1e-4)

    smooth = _blend_video(rng)
    smooth_scores = video_f_consistency(enc, smooth)
    assert smooth_scores["f_consistency_4"] < 100.0 - 1e-3
    # Shuffling the later frames brings the far end of the fade next to frame 1.
    shuffled = np.concatenate([smooth[:1], smooth[1:][::-1]])
    shuffled_scores = video_f_consistency(enc, shuffled)
    assert shuffled_scores["f_consistency_4"] < smooth_scores["f_consistency_4"]
    # F-Consistency_all averages over the same set of frames either way.
    assert shuffled_scores["f_consistency_all"] == pytest.approx(smooth_scores["f_consistency_all"], abs=1e-4)
    noise = video_f_consistency(enc, _video(rng))
    assert noise["f_consistency_all"] < 100.0 - 1e-3


def test_eval_clip_encoder_loads_full_clip_model_with_its_preprocessor(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=99, bos_token_id=0, eos_token_id=1, projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=mean, image_std=std).save_pretrained(tmp_path)
    enc = ClipImageEncoder(str(tmp_path))
    frames = _video(np.random.default_rng(1), t=3)
    # At the crop size preprocessing is only scaling and the processor's normalisation.
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels)
    expected = expected if torch.is_tensor(expected) else expected.pooler_output
    torch.testing.assert_close(enc(frames), nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-4)
    # Non-square frames of another size go through resize + center crop.
    assert enc(_video(np.random.default_rng(2), t=2, h=48, w=80)).shape == (2, 16)


def test_eval_clip_encoder_rejects_a_directory_without_a_model(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipImageEncoder(str(tmp_path))


def test_eval_i3d_state_dict_gives_fvd_features_and_zero_fvd_for_identical_sets(tmp_path) -> None:
    torch.manual_seed(2)
    ref_net = InceptionI3d(num_classes=7).eval()
    path = tmp_path / "i3d.pt"
    torch.save(ref_net.state_dict(), path)
    net = load_feature_net(str(path), "i3d")
    net.size = 32  # the real size is 224; the architecture is size-agnostic
    clips = [_video(np.random.default_rng(i)) for i in range(3)]
    feats = clip_features(net, clips, batch_size=2)
    assert feats.shape == (3, 7)
    # Same as feeding [B, 3, T, H, W] in [-1, 1] to the network directly.
    direct = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255 * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(feats, ref_net(direct).double().numpy(), rtol=1e-4, atol=1e-5)
    assert frechet_distance_features(feats, clip_features(net, clips)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal length"):
        clip_features(net, [clips[0], clips[1][:4]])


def test_eval_inception_state_dict_gives_fid_features_and_zero_fid_for_identical_sets(tmp_path) -> None:
    torch.manual_seed(3)
    ref_net = FIDInceptionV3(num_classes=5).eval()
    path = tmp_path / "inception.pt"
    torch.save(ref_net.state_dict(), path)
    net = load_feature_net(str(path), "inception")
    net.size = 75  # the smallest input Inception-v3 accepts; the real size is 299
    # One frame per clip keeps this full-width network's CPU time to a few seconds.
    clips = [_video(np.random.default_rng(i), t=1, h=75, w=75) for i in range(2)]
    feats = frame_features(net, clips)
    assert feats.shape == (2, 2048)
    direct = torch.from_numpy(np.concatenate(clips)).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(feats, ref_net(direct).double().numpy(), rtol=1e-4, atol=1e-5)
    assert frechet_distance_features(feats, feats.copy()) == pytest.approx(0.0, abs=1e-6)


def test_eval_torchscript_detectors_get_their_flags_and_value_ranges(tmp_path) -> None:
    path = tmp_path / "detector.pt"
    torch.jit.script(StyleGanLikeDetector()).save(str(path))
    white = [np.full((4, 40, 40, 3), 255, dtype=np.uint8)]
    i3d = load_feature_net(str(path), "i3d")
    assert i3d.flags == {"rescale": False, "resize": False, "return_features": True}
    np.testing.assert_allclose(clip_features(i3d, white), [[1.0] * 6])  # [-1, 1] range
    inception = load_feature_net(str(path), "inception")
    np.testing.assert_allclose(frame_features(inception, white), [[255.0] * 6] * 4)  # raw pixels
    plain = tmp_path / "plain.pt"
    torch.jit.script(PlainDetector()).save(str(plain))
    net = load_feature_net(str(plain), "inception")
    assert net.flags == {} and net.value_range == (-1.0, 1.0)
    np.testing.assert_allclose(frame_features(net, white), [[1.0] * 3] * 4)


def test_eval_weight_files_that_are_not_weights_are_refused(tmp_path) -> None:
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"net": NotWeights()}, unsafe)
    with pytest.raises(ValueError, match="unsafe.pt"):
        load_feature_net(str(unsafe), "i3d")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not an I3D state dict"):
        load_feature_net(str(wrong), "i3d")
    with pytest.raises(ValueError, match="not an Inception-v3 state dict"):
        load_feature_net(str(wrong), "inception")
    partial = tmp_path / "partial.pt"
    state = InceptionI3d(num_classes=3).state_dict()
    state.pop("Mixed_5c.b0.conv3d.weight")
    torch.save(state, partial)
    with pytest.raises(ValueError, match="Mixed_5c.b0.conv3d.weight"):
        load_feature_net(str(partial), "i3d")
    with pytest.raises(FileNotFoundError):
        load_feature_net(str(tmp_path / "missing.pt"), "i3d")
