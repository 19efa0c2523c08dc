"""TRIPModel: fusion and conditioning modes, checkpointing, persistence, learning."""

import pytest
import torch

from trip.config import FusionConfig
from trip.diffusion import TRIPObjective
from trip.model import TRIPModel


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, cfg.latent_channels, cfg.num_frames, cfg.latent_size, cfg.latent_size, generator=g)
    text = torch.randn(b, 3, cfg.unet.cross_attention_dim, generator=g)
    return lat, lat[:, :, 0], text


@pytest.mark.parametrize("fusion", ["tnf", "linear", "none"])
@pytest.mark.parametrize("conditioning", ["temporal", "channel"])
def test_every_fusion_and_conditioning_mode_runs_forward_and_backward(fusion, conditioning, tiny_model_config):
    cfg = tiny_model_config(image_conditioning=conditioning, fusion=FusionConfig(mode=fusion, dim=32, heads=4,
                                                                                 timestep_dim=32))
    model = TRIPModel(cfg)
    lat, img, text = _batch(cfg)
    out = model(lat, img, torch.tensor([5, 900]), text)
    assert out.noise.shape == out.residual.shape == out.reference.shape == lat.shape
    loss = TRIPObjective(model)(lat, img, text)
    loss.backward()
    grads = [p.grad for p in model.unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_linear_fusion_weights_fall_linearly_over_frames(tiny_model_config):
    cfg = tiny_model_config(fusion=FusionConfig(mode="linear", linear_start=1.0, linear_end=0.25))
    fusion = TRIPModel(cfg).fusion
    residual, reference = torch.zeros(1, 4, 4, 8, 8), torch.ones(1, 4, 4, 8, 8)
    out = fusion(residual, reference, torch.tensor([3]))
    torch.testing.assert_close(out[0, 0, :, 0, 0], torch.tensor([1.0, 0.75, 0.5, 0.25]))


def test_untrained_tnf_is_the_linear_fusion(tiny_model_config):
    cfg = tiny_model_config()
    tnf, linear = TRIPModel(cfg), TRIPModel(tiny_model_config(fusion=FusionConfig(mode="linear")))
    linear.load_state_dict(tnf.state_dict(), strict=False)
    lat, img, text = _batch(cfg)
    t = torch.tensor([1, 800])
    a, b = tnf(lat, img, t, text), linear(lat, img, t, text)
    # the schedule is clamped to [0.01, 0.99] inside TNF (finite gate logits)
    lam = torch.linspace(1.0, 0.0, cfg.num_frames).clamp(0.01, 0.99).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(a.noise, lam * a.reference + (1 - lam) * a.residual, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.residual, b.residual)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model_config):
    torch.manual_seed(0)
    plain = TRIPModel(tiny_model_config())
    ckpt = TRIPModel(tiny_model_config(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    lat, img, text = _batch(plain.cfg)
    t, noise = torch.tensor([100, 600]), torch.randn_like(lat)
    # give the TNF non-zero output weights so its gradients are not trivially zero
    with torch.no_grad():
        for m in (plain, ckpt):
            torch.manual_seed(3)
            m.fusion.proj_out.weight.normal_(std=0.02)
            m.fusion.gate_time.weight.normal_(std=0.02)
    losses = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(7)  # diffusers' temporal convs use dropout: same masks for both
        loss = TRIPObjective(m)(lat, img, text, timesteps=t, noise=noise)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_save_and_load_round_trip_is_bit_exact(tmp_path, tiny_model_config):
    model = TRIPModel(tiny_model_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "m"))
    loaded = TRIPModel.from_pretrained(str(tmp_path / "m"))
    assert loaded.cfg == model.cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_from_pretrained_on_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="TRIP model directory not found: .*absent"):
        TRIPModel.from_pretrained(str(tmp_path / "absent"))


def test_tiny_model_overfits_one_batch(tiny_model_config):
    torch.manual_seed(0)
    model = TRIPModel(tiny_model_config())
    objective = TRIPObjective(model)
    lat, img, text = _batch(model.cfg, b=2)
    t, noise = torch.tensor([300, 700]), torch.randn_like(lat)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        loss = objective(lat, img, text, timesteps=t, noise=noise)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_two_parameter_groups_cover_every_parameter_once(tiny_model_config):
    model = TRIPModel(tiny_model_config())
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["unet"] and groups["fusion"]


@pytest.mark.parametrize("which,shape,match", [
    ("noisy", (2, 4, 8, 8), r"noisy_latents: expected \[B, 4, F, 8, 8\], got \(2, 4, 8, 8\)"),
    ("image", (2, 4, 4, 8, 8), r"image_latents: expected \[2, 4, 8, 8\], got \(2, 4, 4, 8, 8\)"),
    ("text", (2, 3, 7), r"text_states: expected \[2, L, 16\], got \(2, 3, 7\)"),
])
def test_wrong_input_shapes_raise_value_error_naming_expected_and_got(which, shape, match, tiny_model_config):
    model = TRIPModel(tiny_model_config())
    lat, img, text = _batch(model.cfg)
    args = {"noisy": lat, "image": img, "text": text}
    args[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        model(args["noisy"], args["image"], torch.tensor([1, 2]), args["text"])


@pytest.mark.parametrize("fusion", ["tnf", "none"])
def test_residual_loss_weight_adds_the_unets_own_error(fusion, tiny_model_config):
    cfg = tiny_model_config(fusion=FusionConfig(mode=fusion, dim=32, heads=4, timestep_dim=32))
    model = TRIPModel(cfg).eval()  # no dropout: the same forward three times
    lat, img, text = _batch(cfg)
    t, noise = torch.tensor([100, 600]), torch.randn_like(lat)
    with torch.no_grad():
        out = model(TRIPObjective(model).scheduler.add_noise(lat, noise, t), img, t, text)
        fused = (out.noise - noise).pow(2).mean()
        residual = (out.residual - noise).pow(2).mean()
        plain = TRIPObjective(model)(lat, img, text, timesteps=t, noise=noise)
        weighted = TRIPObjective(model, residual_weight=0.5)(lat, img, text, timesteps=t, noise=noise)
    torch.testing.assert_close(plain, fused)
    # TRIP^- has no shortcut: its residual is its prediction, so nothing is added
    torch.testing.assert_close(weighted, fused + 0.5 * residual if fusion == "tnf" else fused)
