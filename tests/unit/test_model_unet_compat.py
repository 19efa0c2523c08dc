"""The residual UNet is key-for-key diffusers' UNet3DConditionModel."""

import pytest
import torch
from diffusers import UNet3DConditionModel

from trip.model import TRIPModel
from trip.model.unet import ResidualUNet3D, diffusers_unet_kwargs


def _diffusers_unet(cfg, tmp_path):
    torch.manual_seed(1)
    ref = UNet3DConditionModel(**diffusers_unet_kwargs(cfg.unet, cfg.latent_channels, cfg.latent_channels))
    ref.save_pretrained(tmp_path / "unet")
    return ref


def test_pretrained_unet_dir_loads_with_no_missing_or_unexpected_keys_and_same_output(tmp_path, tiny_model_config):
    cfg = tiny_model_config()
    ref = _diffusers_unet(cfg, tmp_path).eval()
    ours = ResidualUNet3D(cfg.unet, cfg.latent_channels)
    assert set(ours.state_dict()) == set(ref.state_dict())
    model = TRIPModel(tiny_model_config(pretrained_unet=str(tmp_path / "unet"))).eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.unet.state_dict()[k], v), k

    torch.manual_seed(2)
    video = torch.randn(2, 4, 5, 8, 8)  # image slot + 4 frames, as the UNet sees them
    t = torch.tensor([10, 700])
    text = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = ref(video, t, encoder_hidden_states=text).sample
        got = model.unet(video[:, :, 1:], video[:, :, 0], t, text)
    torch.testing.assert_close(got, expected[:, :, 1:], rtol=1e-4, atol=1e-5)


def test_channel_conditioning_loads_a_four_channel_unet_with_zero_image_weights(tmp_path, tiny_model_config):
    cfg = tiny_model_config(image_conditioning="channel")
    _diffusers_unet(cfg, tmp_path)
    model = TRIPModel(tiny_model_config(image_conditioning="channel", pretrained_unet=str(tmp_path / "unet")))
    w = model.unet.conv_in.weight
    assert w.shape[1] == 8 and torch.count_nonzero(w[:, 4:]) == 0


def test_missing_pretrained_path_raises_clear_error(tmp_path, tiny_model_config):
    with pytest.raises(FileNotFoundError, match="pretrained UNet not found: .*nope"):
        TRIPModel(tiny_model_config(pretrained_unet=str(tmp_path / "nope")))


def test_mismatched_pretrained_config_names_both_sides(tmp_path, tiny_model_config):
    cfg = tiny_model_config()
    _diffusers_unet(cfg, tmp_path)
    other = tiny_model_config()
    other.unet.cross_attention_dim = 8
    other.pretrained_unet = str(tmp_path / "unet")
    with pytest.raises(ValueError, match="does not match model.unet"):
        TRIPModel(other)
