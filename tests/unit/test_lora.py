"""LoRA: the adapters on the model, their config, and the export of a LoRA run's checkpoint as
diffusers' LoRA file or merged into the base. The checkpoints are written the way training
ranks write a LoRA run's (adapters only, `tests.unit.checkpoints`); the Ray + ZeRO-3 run is
tests/integration/test_train_lora.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.unit.checkpoints import fake_checkpoint
from trip.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


def test_adapters_are_the_only_trainable_parameters_and_start_as_the_base(tiny_model_config):
    from trip.config import LoraConfig
    from trip.model import TRIPModel
    from trip.model.lora import add_adapters, is_adapter

    torch.manual_seed(0)
    model = TRIPModel(tiny_model_config()).eval()  # no dropout
    x = (torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500]))
    before = model(*x).noise
    add_adapters(model, LoraConfig(rank=2, alpha=4.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) and n.startswith("unet.") for n in trainable)
    assert any(".to_out.0.lora_A." in n for n in trainable) and any("transformer_in." in n for n in trainable)
    # B = 0: the adapted model is the base until it trains (up to float reassociation in peft's layer)
    torch.testing.assert_close(model(*x).noise, before, rtol=1e-5, atol=1e-5)
    with_tnf = TRIPModel(tiny_model_config())
    add_adapters(with_tnf, LoraConfig(rank=2, fusion=True))
    assert any(n.startswith("fusion.blocks.0.cross_attn.kv.lora_A") for n, p in with_tnf.named_parameters()
               if p.requires_grad)


def test_lora_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.pretrained_model"):
        load_config(TINY, ["train.lora.rank=4"])
    with pytest.raises(ConfigError, match="train.lora.fusion"):
        load_config(TINY, ["train.lora.rank=4", "model.pretrained_unet=x", "train.lora.fusion=true",
                           "model.fusion.mode=linear"])
    with pytest.raises(ConfigError, match="train.lora.rank must be >= 0"):
        load_config(TINY, ["train.lora.rank=-1"])
    with pytest.raises(ConfigError, match="at most one of model.pretrained_unet and model.pretrained_model"):
        load_config(TINY, ["model.pretrained_unet=a", "model.pretrained_model=b"])
    with pytest.raises(ConfigError, match="unknown key 'train.lora.ranks'"):
        load_config(TINY, ["train.lora.ranks=4"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(base export dir, LoRA run dir, lora config): a base model exported from a checkpoint, and
    a LoRA run on it whose checkpoint holds rank-4 adapters with non-zero B."""
    from trip.model import TRIPModel
    from trip.model.lora import add_adapters, is_adapter
    from trip.train.export import export_checkpoint

    tmp = tmp_path_factory.mktemp("lora")
    base_cfg = load_config(TINY)
    torch.manual_seed(0)
    base = TRIPModel(base_cfg.model, base_cfg.diffusion)
    export_checkpoint(str(fake_checkpoint(tmp / "runs" / "base", step=5, cfg=base_cfg, state=base.state_dict())),
                      str(tmp / "base"), use_ema=False)
    cfg = load_config(TINY, [f"model.pretrained_model={tmp / 'base'}", "train.lora.rank=4", "train.lora.alpha=8",
                             "train.lora.fusion=true"])
    torch.manual_seed(1)
    adapted = TRIPModel(cfg.model, cfg.diffusion)
    add_adapters(adapted, cfg.train.lora)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.05)
    adapters = {n: p.detach().clone() for n, p in adapted.named_parameters() if is_adapter(n)}
    fake_checkpoint(tmp / "runs" / "lora", step=2, cfg=cfg, state=adapters)
    return tmp / "base", tmp / "runs" / "lora", cfg, adapted


def _frames(pipe, seed: int = 3) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return pipe(image=image, num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                output_type="latent").frames


def test_adapter_export_is_diffusers_lora_format_and_loads_into_the_pipeline(lora_run, tmp_path):
    from safetensors import safe_open

    from trip.pipeline import TRIPPipeline
    from trip.train.export import export_checkpoint

    base_dir, run_dir, cfg, adapted = lora_run
    export_checkpoint(str(run_dir), str(tmp_path / "adapter"), use_ema=False)
    f = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        keys, meta = list(fh.keys()), json.loads(fh.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith(("unet.", "fusion.")) and ".lora_" in k and ".default." not in k for k in keys)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8 and meta["fusion.target_modules"] == ["q", "kv", "out"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "pytorch_lora_weights.safetensors",
                                                                        "trip.json"]
    assert "load_lora_weights" in (tmp_path / "adapter" / "README.md").read_text()

    pipe = TRIPPipeline.from_pretrained(str(base_dir))
    plain = _frames(pipe)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    assert pipe.lora_adapters() == ["default_0"]
    adapted_frames = _frames(pipe)
    assert not torch.allclose(plain, adapted_frames)
    # the pipeline with the adapters computes what the training model with them computes
    from tests.unit.test_pipeline_export import _reference_frames
    from trip.codec import LosslessCodec

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = _reference_frames(adapted.eval(), LosslessCodec(8), image, steps=3, seed=3)
    torch.testing.assert_close(pipe(image=image, num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                                    output_type="pt").frames, ref, rtol=0, atol=1e-6)
    pipe.unload_lora_weights()
    assert pipe.lora_adapters() == []
    # `trip sample` takes the base as --model and the adapters as --lora, and says so when mixed up
    from trip.cli import main as trip_main
    from trip.video import write_png_strip

    write_png_strip(image, str(tmp_path / "first.png"))
    assert trip_main(["sample", "--model", str(base_dir), "--lora", str(tmp_path / "adapter"), "--image",
                      str(tmp_path / "first.png"), "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "first.mp4").is_file()
    assert trip_main(["sample", "--model", str(tmp_path / "adapter"), "--image", str(tmp_path / "first.png"),
                      "--out", str(tmp_path / "out")]) == 2
    torch.testing.assert_close(_frames(pipe), plain, rtol=1e-5, atol=1e-5)


def test_merged_export_is_base_plus_scaled_adapters_and_samples_like_the_adapters(lora_run, tmp_path):
    from safetensors.torch import load_file

    from trip.pipeline import TRIPPipeline
    from trip.train.export import export_checkpoint

    base_dir, run_dir, cfg, adapted = lora_run
    export_checkpoint(str(run_dir), str(tmp_path / "adapter"), use_ema=False)
    export_checkpoint(str(run_dir), str(tmp_path / "merged"), use_ema=False, merge_lora=True)
    base = load_file(str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    lora = load_file(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = lora[f"unet.{name}.lora_A.weight"], lora[f"unet.{name}.lora_B.weight"]
    assert torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"] + (b @ a) * (8 / 4))
    untouched = "conv_in.weight"
    assert torch.equal(merged[untouched], base[untouched])

    with_adapters = TRIPPipeline.from_pretrained(str(base_dir))
    with_adapters.load_lora_weights(str(tmp_path / "adapter"))
    torch.testing.assert_close(_frames(TRIPPipeline.from_pretrained(str(tmp_path / "merged"))),
                               _frames(with_adapters), rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "merged" / "trip.json").read_text())["contents"] == "model"


def test_lora_export_refuses_what_it_cannot_write(lora_run, tmp_path):
    from trip.train.export import export_checkpoint

    _, run_dir, _, _ = lora_run
    with pytest.raises(ValueError, match="LoRA adapters only.*--merge-lora"):
        export_checkpoint(str(run_dir), str(tmp_path / "x"), format="trip")
    plain_run = fake_checkpoint(tmp_path / "runs" / "plain", step=1)
    with pytest.raises(ValueError, match="trained no LoRA adapters"):
        export_checkpoint(str(plain_run), str(tmp_path / "y"), merge_lora=True)
