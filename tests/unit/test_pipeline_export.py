"""`trip export` in the diffusers layout and `TRIPPipeline`: what a user of diffusers gets.

The checkpoints are written the way training ranks write them (`tests.unit.checkpoints`),
for the tiny CPU model of tiny_cpu.yaml; nothing is trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.checkpoints import fake_checkpoint
from trip.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint dir, diffusers export, trip-format export) of the same weights: a fresh tiny
    model whose TNF output projection is not zero (so the fusion does more than TRIP^W's mix)."""
    tmp = tmp_path_factory.mktemp("export")
    _, root, diffusers_dir, trip_dir = _export_both(tmp, load_config(TINY), step=3)
    return root, diffusers_dir, trip_dir


def _export_both(tmp: Path, cfg, step: int):
    """A checkpoint of a fresh model of `cfg` (seed 0, TNF output projection not zero) under
    tmp/runs/r, exported to tmp/diffusers and tmp/trip: (model, checkpoint dir, diffusers, trip)."""
    from trip.model import TRIPModel
    from trip.train.export import export_checkpoint

    torch.manual_seed(0)
    model = TRIPModel(cfg.model, cfg.diffusion)
    with torch.no_grad():
        model.fusion.proj_out.weight.normal_(std=0.05)
    root = fake_checkpoint(tmp / "runs" / "r", step=step, cfg=cfg, state=model.state_dict())
    export_checkpoint(str(root), str(tmp / "diffusers"), use_ema=False)
    export_checkpoint(str(root), str(tmp / "trip"), use_ema=False, format="trip")
    return model, root, tmp / "diffusers", tmp / "trip"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_export_writes_a_unet_diffusers_loads_strictly_with_the_checkpoints_weights(exported):
    from diffusers import UNet3DConditionModel
    from safetensors.torch import load_file

    from trip.model.fusion import TemporalNoiseFusion

    _, out, trip_dir = exported
    unet, info = UNet3DConditionModel.from_pretrained(str(out), subfolder="unet", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    ckpt_weights = load_file(str(trip_dir / "model.safetensors"))  # the consolidated partitions
    theirs = unet.state_dict()
    assert set(theirs) == {k.removeprefix("unet.") for k in ckpt_weights if k.startswith("unet.")}
    for k, v in theirs.items():
        assert torch.equal(v, ckpt_weights[f"unet.{k}"]), k
    fusion = TemporalNoiseFusion.from_pretrained(str(out), subfolder="fusion")
    for k, v in fusion.state_dict().items():
        assert torch.equal(v, ckpt_weights[f"fusion.{k}"]), k
    assert unet.config.sample_size == 4 and fusion.config.num_frames == 8


def test_export_layout_model_index_card_and_run_record(exported):
    from trip.pipeline import TRIPPipeline

    root, out, _ = exported
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "fusion", "scheduler", "vae",
                                              "trip.json", "README.md"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet3DConditionModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["vae"] == ["trip.codec", "LosslessCodec"] and index["text_encoder"] == [None, None]
    # what diffusers itself writes for the loaded pipeline is what export wrote
    again = out.parent / "resaved"
    TRIPPipeline.from_pretrained(str(out)).save_pretrained(str(again))
    resaved = json.loads((again / "model_index.json").read_text())
    assert {k: v for k, v in resaved.items() if not k.startswith("_")} == \
        {k: v for k, v in index.items() if not k.startswith("_")}
    record = json.loads((out / "trip.json").read_text())
    assert record["step"] == 3 and record["weights"] == "weights" and record["checkpoint"].endswith("step-000000003")
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "TRIPPipeline.from_pretrained" in card
    assert "steps trained | 3" in card and "block_out_channels" in card  # figures and the training config
    assert "No validation figures recorded: the run did not validate (`train.validate_every` = 0)." in card


def _card(root: Path, out: Path) -> str:
    from trip.train.export import export_checkpoint

    export_checkpoint(str(root), str(out), use_ema=False)
    return (out / "README.md").read_text()


def test_the_card_shows_the_latest_validation_the_run_recorded_up_to_the_checkpoint(tmp_path):
    from trip.train import checkpoint as ckpt
    from trip.train.validation import RESULT

    cfg = load_config(TINY, ["data.validation=/data/held-out", "train.checkpoint_every=2",
                             "train.validate_every=2"])
    root = fake_checkpoint(tmp_path / "runs" / "r", step=4, cfg=cfg)
    run = ckpt.RunDir(str(tmp_path / "runs"), "r")
    none = _card(root, tmp_path / "none")  # validating, but nothing finished yet
    assert "No validation figures recorded: none had completed by step 4 (`train.validate_every` = 2)." in none
    assert run.latest_validation() is None

    def result(step: int, figures: dict | None) -> None:  # what `validate_checkpoint` writes
        out = tmp_path / "runs" / "r" / "validation" / ckpt.step_name(step)
        out.mkdir(parents=True, exist_ok=True)
        (out / "contact_sheet.png").write_bytes(b"png")
        if figures is not None:
            (out / RESULT).write_text(json.dumps(figures))

    clips = {"000000000": {"psnr": 27.5}, "000000001": {"psnr": 26.5}}
    result(2, {"loss": 0.04321, "loss_rises": 0, "samples": 3, "psnr": 27.5, "ssim": 0.8125,
               "displacement_ratio": 0.625, "displacement_ratio_min": 0.5, "per_clip": clips})
    result(4, None)  # under way (or cut off): no result.json, not a validation
    result(6, {"loss": 0.9876, "samples": 3})  # after the exported checkpoint: not its figures
    assert run.latest_validation()[0] == 6 and run.latest_validation(at_most=5)[0] == 2
    card = _card(root, tmp_path / "at2")
    assert "The run's latest validation is of step 2 (not of this checkpoint, step 4" in card
    for row in ("| step | 2 |", "| held-out samples in the loss | 3 |", "| sample videos scored | 2 |",
                "| validation loss (noise MSE, fixed noise and timesteps) | 0.04321 |",
                "| PSNR of the sample videos vs their clips (dB) | 27.5 |",
                "| SSIM of the sample videos vs their clips | 0.8125 |",
                "| motion: displacement ratio (1 = moves as far as the clip) | 0.625 |",
                "| motion: worst clip's displacement ratio | 0.5 |"):
        assert row in card, row
    assert "0.9876" not in card  # step 6's loss is nowhere
    assert "direction error" not in card  # a figure the validation did not have gets no row

    result(4, {"loss": 0.03125, "samples": 3, "per_clip": {}})  # its own validation, without videos
    card = _card(root, tmp_path / "at4")
    assert "The run's latest validation is of step 4: its EMA weights on" in card
    assert "not of this checkpoint" not in card
    assert "| validation loss (noise MSE, fixed noise and timesteps) | 0.03125 |" in card
    assert "| sample videos scored | 0 |" in card and "PSNR" not in card
    assert "No validation figures recorded" not in card


def _reference_frames(model, codec, images: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """The trained model in a plain DDIM loop: what the pipeline must reproduce."""
    from trip.diffusion import sample_scheduler

    sched = sample_scheduler(model.diffusion_cfg)
    sched.set_timesteps(steps)
    c, f, s = model.cfg.latent_channels, model.cfg.num_frames, model.cfg.latent_size
    z = torch.randn((images.shape[0], c, f, s, s), generator=torch.Generator().manual_seed(seed))
    z = z * sched.init_noise_sigma
    lat = codec.encode(images)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(z, lat, torch.full((images.shape[0],), int(t)), None).noise.float()
            z = sched.step(eps, t, z, eta=0.0).prev_sample
    return torch.stack([codec.decode(z[i].permute(1, 0, 2, 3)) for i in range(z.shape[0])])


def test_pipeline_equals_the_trained_model_and_trip_sample_bit_for_bit(exported, tmp_path):
    from trip.cli import main as trip_main
    from trip.codec import LosslessCodec
    from trip.model import TRIPModel
    from trip.pipeline import TRIPPipeline
    from trip.video import read_frames, to_uint8, write_png_strip

    _, out, trip_dir = exported
    pipe = _quiet(TRIPPipeline.from_pretrained(str(out)))
    images = _images()
    frames = pipe(image=images, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                  output_type="pt").frames
    assert frames.shape == (2, 8, 3, 32, 32)
    model = TRIPModel.from_pretrained(str(trip_dir)).eval()  # the checkpoint's weights, the other format
    assert torch.equal(frames, _reference_frames(model, LosslessCodec(8), images, steps=4, seed=5))

    write_png_strip(images[:1], str(tmp_path / "first.png"))  # one exact 32x32 frame as the input image
    first = read_frames(str(tmp_path / "first.png"))[0]
    for model_dir, name in ((out, "d"), (trip_dir, "t")):  # both formats sample the same
        assert trip_main(["sample", "--model", str(model_dir), "--image", str(tmp_path / "first.png"), "--steps",
                          "4", "--seed", "5", "--png", "--out", str(tmp_path / name)]) == 0
    expected = pipe(image=first, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                    output_type="pt").frames[0]
    strip = np.concatenate(list(to_uint8(expected)), axis=1)
    for name in ("d", "t"):
        written = np.array(__import__("PIL.Image").Image.open(tmp_path / name / "first.png"))
        np.testing.assert_array_equal(written, strip)
        assert (tmp_path / name / "first.mp4").is_file() and (tmp_path / name / "first.gif").is_file()


def test_output_types_hold_the_same_frames_in_export_to_video_form(exported):
    from PIL import Image

    from trip.pipeline import TRIPPipeline
    from trip.video import to_uint8

    pipe = _quiet(TRIPPipeline.from_pretrained(str(exported[1])))
    image = Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))

    def run(kind):
        return pipe(image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                    num_frames=5, output_type=kind).frames

    pt, arr, pil, lat = run("pt"), run("np"), run("pil"), run("latent")
    assert pt.shape == (1, 5, 3, 32, 32) and lat.shape == (1, 192, 5, 4, 4)
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 5, 32, 32, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, pt.permute(0, 1, 3, 4, 2).numpy())
    assert 0.0 <= arr.min() and arr.max() <= 1.0  # export_to_video's float frames
    assert len(pil) == 1 and len(pil[0]) == 5 and all(isinstance(f, Image.Image) for f in pil[0])
    np.testing.assert_array_equal(np.stack([np.array(f) for f in pil[0]]), to_uint8(pt[0]))


def test_callback_on_step_end_sees_and_replaces_the_latents(exported):
    from trip.pipeline import TRIPPipeline

    pipe = _quiet(TRIPPipeline.from_pretrained(str(exported[1])))
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, int(t), kw["latents"].shape))
        return {"latents": torch.zeros_like(kw["latents"])} if i == 2 else {}

    out = pipe(image=_images(1), num_inference_steps=3, callback_on_step_end=cb, output_type="latent").frames
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 192, 8, 4, 4)
    assert torch.count_nonzero(out) == 0


def test_bad_inputs_raise_errors_that_name_the_problem(exported, tmp_path):
    from trip.pipeline import TRIPPipeline

    out = exported[1]
    pipe = _quiet(TRIPPipeline.from_pretrained(str(out)))
    with pytest.raises(ValueError, match=r"expected a tensor \[B, 3, 32, 32\].*got \(1, 3, 24, 24\)"):
        pipe(image=torch.rand(1, 3, 24, 24), num_inference_steps=1)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(image=_images(1), prompt="a red square moving right", num_inference_steps=1)
    with pytest.raises(ValueError, match=r"num_frames must lie in \[1, 8\]"):
        pipe(image=_images(1), num_frames=9, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(image=_images(1), num_inference_steps=1, output_type="gif")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / "fusion")
    with pytest.raises(FileNotFoundError, match=r"component 'fusion'.*fusion/ is missing"):
        TRIPPipeline.from_pretrained(str(broken))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        TRIPPipeline.from_pretrained(str(exported[2]))  # the trip format: `trip sample` reads it, diffusers cannot
    with pytest.raises(FileNotFoundError, match="not found"):
        TRIPPipeline.from_pretrained(str(tmp_path / "absent"))


def test_pipeline_moves_to_bf16_and_still_samples(exported):
    from trip.pipeline import TRIPPipeline

    pipe = _quiet(TRIPPipeline.from_pretrained(str(exported[1]))).to("cpu", torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.fusion.dtype == torch.bfloat16
    frames = pipe(image=_images(1), num_inference_steps=2, output_type="pt").frames
    assert frames.shape == (1, 8, 3, 32, 32) and torch.isfinite(frames).all()


def test_a_captioned_run_exports_its_text_encoder_and_the_prompt_steers_the_video(tmp_path):
    from data_tools.models import save_random_clip_text
    from trip.pipeline import TRIPPipeline
    from trip.train.export import export_checkpoint

    text_dir = tmp_path / "clip"
    save_random_clip_text(str(text_dir), hidden_size=64)  # tiny_cpu.yaml: cross_attention_dim 64
    cfg = load_config(TINY, [f"preprocess.text_encoder={text_dir}", "preprocess.max_text_length=8"])
    root = fake_checkpoint(tmp_path / "runs" / "r", step=1, cfg=cfg)
    export_checkpoint(str(root), str(tmp_path / "m"))
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["max_text_length"] == 8
    pipe = _quiet(TRIPPipeline.from_pretrained(str(tmp_path / "m")))

    def run(**kw):
        return pipe(image=_images(1), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="latent", **kw).frames

    plain, red, guided = run(), run(prompt="red"), run(prompt="red", guidance_scale=4.0)
    assert not torch.equal(plain, red) and not torch.equal(red, guided)


def test_a_vae_run_exports_its_vae_and_samples_through_it(tmp_path):
    from data_tools.models import save_random_vae
    from trip.pipeline import TRIPPipeline
    from trip.train.export import export_checkpoint

    vae = tmp_path / "sd"
    save_random_vae(str(vae), block_out_channels=(8, 16), latent_channels=4)  # downscale 2
    cfg = load_config(TINY, ["codec.kind=vae", f"codec.path={vae}", "model.latent_channels=4",
                             "preprocess.resolution=8"])
    root = fake_checkpoint(tmp_path / "runs" / "r", step=1, cfg=cfg)
    export_checkpoint(str(root), str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    pipe = _quiet(TRIPPipeline.from_pretrained(str(tmp_path / "m")))
    assert pipe.image_size == 8
    frames = pipe(image=_images(1, 8), num_inference_steps=2, output_type="pt").frames
    assert frames.shape == (1, 8, 3, 8, 8)


def test_a_non_square_model_exports_and_reloads_in_both_formats(tmp_path):
    from diffusers import UNet3DConditionModel

    from trip.model import TRIPModel
    from trip.pipeline import TRIPPipeline

    cfg = load_config(TINY, ["model.latent_size=[4, 6]", "preprocess.resolution=[32, 48]"])
    model, _, d, t = _export_both(tmp_path, cfg, step=2)
    assert UNet3DConditionModel.load_config(str(d), subfolder="unet")["sample_size"] == [4, 6]
    assert json.loads((d / "fusion" / "config.json").read_text())["latent_size"] == [4, 6]
    assert "8 frames of 4x6 (h x w) latents" in (d / "README.md").read_text()
    pipe = _quiet(TRIPPipeline.from_pretrained(str(d)))
    assert pipe.image_size == (32, 48) and pipe.trip_model().cfg.latent_size == (4, 6)
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(7))
    frames = pipe(image=images, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                  output_type="pt").frames
    assert frames.shape == (1, 8, 3, 32, 48)
    reloaded = TRIPModel.from_pretrained(str(t))
    assert reloaded.cfg.latent_size == (4, 6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    from trip.codec import LosslessCodec

    again = TRIPPipeline.from_trip_model(reloaded, LosslessCodec(8))
    assert torch.equal(frames, _quiet(again)(image=images, num_inference_steps=2, output_type="pt",
                                             generator=torch.Generator().manual_seed(5)).frames)
