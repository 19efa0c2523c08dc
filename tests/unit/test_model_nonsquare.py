"""Non-square latents: a [h, w] model builds, trains and keeps square models exactly as they were.

An int `model.latent_size` must give the parameter names, shapes and outputs of the code
before non-square support (existing checkpoints and exports load and sample exactly as
before): the expectations below were computed on main before the change. TNF's spatial
position embedding is stored for the configured token grid and resampled for any other,
so one model takes several latent sizes.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from trip.config import FusionConfig, load_config
from trip.diffusion import TRIPObjective
from trip.model import TRIPModel


def _batch(cfg, h: int, w: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, cfg.latent_channels, cfg.num_frames, h, w, generator=g)
    return lat, lat[:, :, 0], torch.randn(b, 3, cfg.unet.cross_attention_dim, generator=g)


def _randomise(model: TRIPModel, seed: int = 2) -> TRIPModel:
    """Every weight random: TNF's zero-initialised gates would otherwise hide its positions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("fusion", ["tnf", "linear", "none"])
def test_a_non_square_model_runs_forward_and_backward(fusion, tiny_model_config):
    cfg = tiny_model_config(latent_size=(8, 12), fusion=FusionConfig(mode=fusion, dim=32, heads=4, timestep_dim=32))
    model = TRIPModel(cfg)
    lat, img, text = _batch(cfg, 8, 12)
    out = model(lat, img, torch.tensor([5, 900]), text)
    assert out.noise.shape == out.residual.shape == out.reference.shape == (2, 4, 4, 8, 12)
    TRIPObjective(model)(lat, img, text).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if fusion == "tnf":
        assert model.fusion.space_embed.shape == (4 * 6, 32)  # the 4 x 6 token grid, row-major


def test_latent_size_pair_of_equal_sides_is_the_square_model(tiny_model_config):
    square, pair = tiny_model_config(latent_size=8), tiny_model_config(latent_size=[8, 8])
    assert pair.latent_size == 8 and pair == square
    a, b = TRIPModel(square), TRIPModel(pair)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_an_int_latent_size_keeps_the_parameters_and_outputs_of_before(tiny_model_config):
    torch.manual_seed(0)
    model = _randomise(TRIPModel(tiny_model_config())).eval()
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    assert hashlib.sha256(shapes.encode()).hexdigest()[:16] == "a86dafdf7369c3e3"  # names + shapes on main
    g = torch.Generator().manual_seed(1)
    lat, text = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    with torch.no_grad():
        out = model(lat, lat[:, :, 0], torch.tensor([5, 900]), text)
    # sums of the outputs on main (bit-identical there on the machine that made them; the
    # tolerance only absorbs other CPUs' float kernels)
    for t, total, magnitude in ((out.noise, 103.2813109755516, 6534.316050373949),
                                (out.residual, 10.131128856097348, 69.88593748502899)):
        assert t.double().sum().item() == pytest.approx(total, rel=1e-5, abs=1e-3)
        assert t.double().abs().sum().item() == pytest.approx(magnitude, rel=1e-6)


def test_one_model_takes_other_latent_sizes_through_resampled_positions(tiny_model_config):
    torch.manual_seed(0)
    model = _randomise(TRIPModel(tiny_model_config(latent_size=(8, 12)))).eval()
    tnf = model.fusion
    assert tnf.space_embedding((4, 6)) is tnf.space_embed  # the configured grid: the parameter itself
    for h, w in ((8, 8), (12, 8), (4, 16)):
        lat, img, text = _batch(model.cfg, h, w)
        with torch.no_grad():
            out = model(lat, img, torch.tensor([5, 900]), text)
        assert out.noise.shape == (2, 4, 4, h, w) and torch.isfinite(out.noise).all()
    with torch.no_grad():
        tnf.space_embed.copy_(torch.linspace(-1, 1, 6).repeat(4)[:, None].expand(-1, 32))  # varies along w only
    wide = tnf.space_embedding((2, 12)).reshape(2, 12, 32)
    assert torch.allclose(wide[0], wide[1]) and wide[0, 0, 0] < wide[0, 6, 0] < wide[0, 11, 0]


def test_latents_the_model_cannot_take_raise_naming_the_reason(tiny_model_config):
    model = TRIPModel(tiny_model_config(latent_size=(8, 12)))
    lat, img, text = _batch(model.cfg, 8, 9)
    with pytest.raises(ValueError, match=r"expected \[B, 4, F, 8, 12\], got \(2, 4, 4, 8, 9\) \(9 is not divisible"):
        model(lat, img, torch.tensor([1, 2]), text)
    lat, _, _ = _batch(model.cfg, 8, 12)
    with pytest.raises(ValueError, match=r"image_latents: expected \[2, 4, 8, 12\]"):
        model(lat, img, torch.tensor([1, 2]), text)


def test_a_trip_format_save_and_load_round_trips_a_non_square_model(tmp_path, tiny_model_config):
    torch.manual_seed(0)
    model = _randomise(TRIPModel(tiny_model_config(latent_size=(8, 12)))).eval()
    model.save_pretrained(str(tmp_path / "m"))
    again = TRIPModel.from_pretrained(str(tmp_path / "m")).eval()
    assert again.cfg.latent_size == (8, 12)
    lat, img, text = _batch(model.cfg, 8, 12)
    with torch.no_grad():
        assert torch.equal(model(lat, img, torch.tensor([3, 7]), text).noise,
                           again(lat, img, torch.tensor([3, 7]), text).noise)


def test_tiny_cpu_config_takes_a_non_square_size_for_model_and_preprocessing():
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(tiny, ["model.latent_size=[4, 6]", "preprocess.resolution=[32, 48]"])
    assert cfg.model.latent_hw == (4, 6) and cfg.preprocess.resolution == (32, 48)
