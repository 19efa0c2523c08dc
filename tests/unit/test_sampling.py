"""Sampling through the pipeline: shapes, range, determinism, and files that decode back."""

import av
import pytest
import torch

from trip.codec import LosslessCodec
from trip.config import SampleConfig
from trip.model import TRIPModel
from trip.pipeline import TRIPPipeline
from trip.sampling import generate, prepare_image
from trip.video import read_frames, write_gif, write_mp4


def _model_and_codec(tiny_model_config):
    torch.manual_seed(0)
    cfg = tiny_model_config(latent_channels=12)  # lossless x2: 3 * 2 * 2 channels, 16 px frames
    model = TRIPModel(cfg)
    with torch.no_grad():
        model.fusion.proj_out.weight.normal_(std=0.05)
    return model, LosslessCodec(2)


def _pipe(tiny_model_config):
    return TRIPPipeline.from_trip_model(*_model_and_codec(tiny_model_config))


def test_generate_returns_frames_in_unit_range_and_is_seed_deterministic(tiny_model_config):
    pipe = _pipe(tiny_model_config)
    images = torch.rand(2, 3, 16, 16)
    cfg = SampleConfig(steps=4, seed=3)
    a = generate(pipe, images, cfg)
    b = generate(pipe, images, cfg)
    c = generate(pipe, images, SampleConfig(steps=4, seed=4))
    assert a.shape == (2, 4, 3, 16, 16)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_classifier_free_guidance_with_text_runs_and_differs_from_unguided(tiny_model_config):
    pipe = _pipe(tiny_model_config)
    images, text = torch.rand(1, 3, 16, 16), torch.randn(1, 2, 16)

    def run(scale):
        return pipe(image=images, prompt_embeds=text, num_inference_steps=3, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames

    plain, guided = run(1.0), run(5.0)
    assert plain.shape == guided.shape and not torch.equal(plain, guided)


def test_mp4_and_gif_decode_back_with_the_right_frame_count(tmp_path, tiny_model_config):
    video = generate(_pipe(tiny_model_config), torch.rand(1, 3, 16, 16), SampleConfig(steps=2))[0]
    mp4 = write_mp4(video, str(tmp_path / "v.mp4"), fps=4)
    gif = write_gif(video, str(tmp_path / "v.gif"), fps=4, scale=2)
    with av.open(mp4) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    assert read_frames(gif).shape == (4, 3, 32, 32)
    assert not list(tmp_path.glob(".*partial"))


def test_prepare_image_centre_crops_and_resizes():
    img = torch.zeros(3, 20, 40)
    img[:, :, 10:30] = 1.0  # the centre square is white
    out = prepare_image(img, 8)
    assert out.shape == (3, 8, 8) and out.min() > 0.99


def test_trip_sample_cli_writes_an_mp4_and_a_gif_per_image(tmp_path, tiny_model_config):
    from PIL import Image

    from trip.cli import main as trip_main

    model, codec = _model_and_codec(tiny_model_config)
    model.save_pretrained(str(tmp_path / "model"), extra={"codec": {"kind": "lossless", "downscale": 2},
                                                          "sample": {"steps": 3, "fps": 4}})
    Image.new("RGB", (24, 20), (200, 30, 30)).save(tmp_path / "first.png")
    assert trip_main(["sample", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "first.png"),
                      "--out", str(tmp_path / "out"), "--seed", "1"]) == 0
    assert read_frames(str(tmp_path / "out" / "first.mp4")).shape == (4, 3, 16, 16)
    assert read_frames(str(tmp_path / "out" / "first.gif")).shape[0] == 4
    assert trip_main(["sample", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "first.png"),
                      "--out", str(tmp_path / "wide"), "--height", "16", "--width", "24"]) == 0
    assert read_frames(str(tmp_path / "wide" / "first.mp4")).shape == (4, 3, 16, 24)
    assert trip_main(["sample", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "first.png"),
                      "--out", str(tmp_path / "short"), "--height", "24", "--width", "16", "--num-frames", "2"]) == 0
    assert read_frames(str(tmp_path / "short" / "first.mp4")).shape == (2, 3, 24, 16)  # a portrait bucket's shape


def test_trip_sample_cli_names_a_missing_image(tmp_path, tiny_model_config, capsys):
    from trip.cli import main as trip_main

    model, _ = _model_and_codec(tiny_model_config)
    model.save_pretrained(str(tmp_path / "model"), extra={"codec": {"kind": "lossless", "downscale": 2}})
    assert trip_main(["sample", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "missing.png"),
                      "--steps", "2"]) == 2
    assert "image not found:" in capsys.readouterr().err


def test_prepare_image_to_a_height_width_pair_keeps_the_largest_centred_crop_of_that_aspect():
    img = torch.zeros(3, 20, 60)
    img[:, :, 15:45] = 1.0  # the centre 20 x 30 (2:3) is white
    out = prepare_image(img, (8, 12))
    assert out.shape == (3, 8, 12) and out.min() > 0.99
    tall = torch.rand(3, 30, 10)
    assert prepare_image(tall, (12, 4)).shape == (3, 12, 4)
    assert torch.equal(prepare_image(tall, 8), prepare_image(tall, (8, 8)))


def test_a_non_square_model_samples_frames_of_its_height_and_width(tiny_model_config):
    torch.manual_seed(0)
    model = TRIPModel(tiny_model_config(latent_channels=12, latent_size=(8, 12)))
    pipe = TRIPPipeline.from_trip_model(model, LosslessCodec(2))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.frame_size == (16, 24) and pipe.image_size == (16, 24)
    videos = generate(pipe, torch.rand(2, 3, 16, 24), SampleConfig(steps=2, seed=1))
    assert videos.shape == (2, 4, 3, 16, 24) and 0.0 <= videos.min() and videos.max() <= 1.0
    from PIL import Image

    frames = pipe(image=Image.new("RGB", (90, 40)), num_inference_steps=2, output_type="np").frames
    assert frames.shape == (1, 4, 16, 24, 3)
    other = pipe(image=torch.rand(1, 3, 24, 16), height=24, width=16, num_inference_steps=2, output_type="pt")
    assert other.frames.shape == (1, 4, 3, 24, 16)  # the same model, another aspect


def test_a_square_model_samples_a_non_square_size_when_asked(tiny_model_config):
    pipe = _pipe(tiny_model_config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=torch.rand(1, 3, 16, 24), height=16, width=24, num_inference_steps=2, output_type="pt")
    assert out.frames.shape == (1, 4, 3, 16, 24)
    with pytest.raises(ValueError, match=r"height x width = 16 x 18 \(latents 8 x 9\): 9 is not divisible"):
        pipe(image=torch.rand(1, 3, 16, 18), height=16, width=18, num_inference_steps=2)
