"""`trip export`: a training checkpoint -> a model directory for diffusers, `trip sample` and sharing.

Two formats. `diffusers` (the default) writes a `TRIPPipeline` directory: `model_index.json`,
`unet/` (a `UNet3DConditionModel` that diffusers loads strictly), `fusion/`, `scheduler/`,
the codec in `vae/`, `text_encoder/` + `tokenizer/` when the run embedded captions with
one, `trip.json` (the run config and the checkpoint it came from) and a model card
(`README.md`); `trip.model.diffusers_layout` names the parts. `trip` writes the older
`config.json` + `model.safetensors` that only this project reads.

A checkpoint holds the weights and their EMA as per-rank partitions (one safetensors file
per rank, see `trip.train.partitions`). Export consolidates them offline, tensor by tensor,
so its peak memory is about one tensor, not the model: a 1.4B-parameter model exports on a
machine that could not hold it twice. Only our own files are read (JSON + safetensors),
never DeepSpeed's pickled optimizer state, and an incomplete checkpoint is refused. Given a
run directory instead of one checkpoint, export takes its newest complete one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from typing import Any

from trip import storage
from trip.log import get_logger
from trip.model import diffusers_layout as layout
from trip.train import checkpoint as ckpt

log = get_logger(__name__)


def resolve(url: str) -> ckpt.Found:
    """The checkpoint at `url`, or the newest complete checkpoint of the run directory `url`."""
    run, step = ckpt.RunDir.of_checkpoint(url)
    if step is not None:
        rec, why = run.check(step)
        if rec is None:
            raise ValueError(f"{url}: incomplete checkpoint ({why}; the save was interrupted)")
        return ckpt.Found(step, run.checkpoint_url(step), rec)
    if not run.steps():
        raise FileNotFoundError(f"checkpoint not found: {url} (neither a checkpoint nor a run directory with "
                                f"checkpoints/step-*)")
    found = run.latest()
    if found is None:
        raise FileNotFoundError(f"{url}: no complete checkpoint ({ckpt.RECORD} and all its files) in it")
    return found


FORMATS = ("diffusers", "trip")


def export_checkpoint(checkpoint: str, out: str, use_ema: bool = True, format: str = "diffusers",
                      merge_lora: bool = False) -> str:
    """Write the model directory `out` in `format` (see the module docstring); returns the
    checkpoint URL used. A LoRA run's checkpoint exports its adapters in diffusers' LoRA
    format, or with `merge_lora` the base model with the adapters merged into it."""
    import torch

    from trip.config import config_from_dict, to_dict
    from trip.model import TRIPModel
    from trip.model.trip import WEIGHTS_NAME
    from trip.train import partitions

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r} (one of {', '.join(FORMATS)})")
    found = resolve(checkpoint)
    rec = found.record
    cfg = config_from_dict(rec["config"], storage.join(found.url, ckpt.RECORD))
    lora = cfg.train.lora
    if merge_lora and not lora.enabled:
        raise ValueError(f"{found.url}: --merge-lora, but this run trained no LoRA adapters (train.lora.rank = 0)")
    if lora.enabled and format == "trip" and not merge_lora:
        raise ValueError(f"{found.url} holds LoRA adapters only: export them in diffusers' LoRA format "
                         f"(--format diffusers) or merged into the base model (--merge-lora)")
    world = int(rec["world_size"])
    kind = "ema" if use_ema and ckpt.partition_file("ema", 0, world) in rec["files"] else "weights"
    rels = [ckpt.partition_file(kind, r, world) for r in range(world)]
    run, _ = ckpt.RunDir.of_checkpoint(found.url)
    plain = replace(cfg.model, pretrained_unet=None, pretrained_model=None)
    with tempfile.TemporaryDirectory(prefix="trip-export-") as tmp:
        run.download(found.step, rels, tmp)
        files = [os.path.join(tmp, rel) for rel in rels]
        with torch.device("meta"):  # names and shapes only: nothing allocated
            model = TRIPModel(plain, cfg.diffusion)
            if lora.enabled:
                from trip.model.lora import add_adapters, is_adapter

                add_adapters(model, lora)
                expected = {n: tuple(p.shape) for n, p in model.named_parameters() if is_adapter(n)}
            else:
                expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        rank0 = partitions.read_partition_file(files[0])  # rank 0's file lists every tensor
        _check_names({n: t.shape for n, t in rank0.tensors.items()}, expected, found.url)
        with storage.local_dir_for_upload(out) as local:
            if lora.enabled:
                _export_lora(files, tmp, local, cfg, kind, merge_lora, format)
                write_run_files(local, cfg, found, kind, run, adapter=not merge_lora)
            elif format == "trip":
                target = os.path.join(local, f".{WEIGHTS_NAME}.tmp")
                partitions.consolidate(files, target, dtype=torch.float32, kind=kind)
                os.replace(target, os.path.join(local, WEIGHTS_NAME))
                model.write_config(local, extra={"codec": to_dict(cfg.codec), "sample": to_dict(cfg.sample)})
            else:
                for comp in layout.WEIGHTED:
                    if any(n.startswith(f"{comp}.") for n in rank0.tensors):  # a weightless fusion has none
                        _consolidate_component(files, local, comp, kind)
                write_pipeline_files(local, cfg)
                write_run_files(local, cfg, found, kind, run)
    what = "LoRA adapters" if lora.enabled and not merge_lora else "merged model" if merge_lora else "model"
    log.info(f"exported the {what} ({kind}) of step {found.step} from {found.url} -> {out} ({format} format)")
    return found.url


def _export_lora(files: list[str], tmp: str, local: str, cfg: Any, kind: str, merge_lora: bool, format: str) -> None:
    """The adapters as diffusers' LoRA file, or merged into the base (read from the run's
    model.pretrained_model / pretrained_unet) as a whole model directory."""
    import torch
    from safetensors.torch import load_file, save_file

    from trip.config import to_dict
    from trip.model import TRIPModel
    from trip.model import lora as lora_mod
    from trip.model.trip import WEIGHTS_NAME
    from trip.pipeline import LORA_WEIGHTS
    from trip.train import partitions

    staged = os.path.join(tmp, "adapters.safetensors")
    partitions.consolidate(files, staged, dtype=torch.float32, kind=kind, rename=lora_mod.to_file_key)
    adapters = load_file(staged)  # adapters are small: rank x (in + out) per adapted layer
    if not merge_lora:
        lora_mod.save_adapters(os.path.join(local, LORA_WEIGHTS), adapters, cfg.train.lora)
        return
    base = TRIPModel(cfg.model, cfg.diffusion)  # reads the frozen base the run adapted
    merged = lora_mod.merge(base.state_dict(), adapters, cfg.train.lora)
    if format == "trip":
        save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(local, WEIGHTS_NAME))
        base.write_config(local, extra={"codec": to_dict(cfg.codec), "sample": to_dict(cfg.sample)})
        return
    for comp in layout.WEIGHTED:
        part = {k[len(comp) + 1:]: v.contiguous() for k, v in merged.items() if k.startswith(f"{comp}.")}
        if part:
            os.makedirs(os.path.join(local, comp), exist_ok=True)
            save_file(part, os.path.join(local, comp, layout.WEIGHTS))
    write_pipeline_files(local, cfg)


def _consolidate_component(files: list[str], local: str, comp: str, kind: str) -> None:
    """One component's tensors (`<comp>.<key>` in the checkpoint) -> `<comp>/` weights, streamed."""
    import torch

    from trip.train import partitions

    os.makedirs(os.path.join(local, comp), exist_ok=True)
    target = os.path.join(local, comp, f".{layout.WEIGHTS}.tmp")
    prefix = f"{comp}."
    partitions.consolidate(files, target, dtype=torch.float32, kind=kind,
                           rename=lambda n: n[len(prefix):] if n.startswith(prefix) else None)
    os.replace(target, os.path.join(local, comp, layout.WEIGHTS))


def write_pipeline_files(local: str, cfg: Any) -> None:
    """Everything of a TRIPPipeline directory but the UNet and fusion weights: the component
    configs, the scheduler, the codec, the text encoder (copied), `model_index.json`."""
    import diffusers
    import torch
    from diffusers import UNet3DConditionModel

    from trip.codec import LosslessCodec, vae_dir
    from trip.diffusion import sample_scheduler
    from trip.model.fusion import build_fusion

    m = cfg.model
    with torch.device("meta"):  # configs only: nothing allocated
        UNet3DConditionModel(**layout.unet_config(m)).save_config(os.path.join(local, layout.UNET))
        fusion = build_fusion(m.fusion, m.latent_channels, m.num_frames, m.latent_size)
        fusion.save_config(os.path.join(local, layout.FUSION))
    sample_scheduler(cfg.diffusion).save_pretrained(os.path.join(local, layout.SCHEDULER))
    index: dict[str, Any] = {
        "_class_name": "TRIPPipeline", "_diffusers_version": diffusers.__version__,
        layout.UNET: ["diffusers", "UNet3DConditionModel"],
        layout.FUSION: [type(fusion).__module__, type(fusion).__name__],
        layout.SCHEDULER: ["diffusers", "DDIMScheduler"],
        "max_text_length": cfg.preprocess.max_text_length,
    }
    vae_out = os.path.join(local, layout.VAE)
    if cfg.codec.kind == "lossless":
        LosslessCodec(cfg.codec.downscale).save_pretrained(vae_out)
        index[layout.VAE] = ["trip.codec", "LosslessCodec"]
    else:
        _copy_files(vae_dir(cfg.codec.path), vae_out)
        index[layout.VAE] = ["diffusers", "AutoencoderKL"]
    if cfg.preprocess.text_encoder:
        src = storage.local_copy(cfg.preprocess.text_encoder)
        for sub in (layout.TEXT_ENCODER, layout.TOKENIZER):
            if not os.path.isdir(os.path.join(src, sub)):
                raise FileNotFoundError(f"preprocess.text_encoder {cfg.preprocess.text_encoder} has no {sub}/")
            _copy_files(os.path.join(src, sub), os.path.join(local, sub))
        index[layout.TEXT_ENCODER] = ["transformers", "CLIPTextModel"]
        index[layout.TOKENIZER] = ["transformers", "CLIPTokenizer"]
    else:
        index[layout.TEXT_ENCODER] = index[layout.TOKENIZER] = [None, None]
    with open(os.path.join(local, layout.MODEL_INDEX), "w") as fh:
        json.dump(dict(sorted(index.items())), fh, indent=2)


def _copy_files(src: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)) and not name.startswith("."):
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))


def write_run_files(local: str, cfg: Any, found: ckpt.Found, kind: str, run: ckpt.RunDir,
                    adapter: bool = False) -> None:
    """`trip.json` (where the weights came from, the whole run config) and the model card
    (`adapter`: the directory holds LoRA adapters of the run's base model only), with the
    run's loss history and its latest validation up to this checkpoint."""
    from trip.config import to_dict
    from trip.train.report import summarize

    record = {"format": "trip-export/1", "checkpoint": found.url, "step": found.step, "weights": kind,
              "config_hash": found.record.get("config_hash"), "config": to_dict(cfg),
              "contents": "lora-adapters" if adapter else "model"}
    with open(os.path.join(local, layout.RUN_RECORD), "w") as fh:
        json.dump(record, fh, indent=2)
    figures = summarize(run.history(up_to=found.step))
    validation = run.latest_validation(at_most=found.step)
    with open(os.path.join(local, "README.md"), "w") as fh:
        fh.write(model_card(cfg, found, kind, figures, _dataset_size(cfg.data.dataset), adapter, validation))


def _dataset_size(dataset: str) -> int | None:
    try:
        return int(json.loads(storage.read_bytes(storage.join(dataset, "index.json")))["num_samples"])
    except Exception:  # the card is still useful without it (data moved, no credentials here)
        return None


def model_card(cfg: Any, found: ckpt.Found, kind: str, figures: dict[str, Any], samples: int | None,
               adapter: bool = False, validation: tuple[int, dict[str, Any]] | None = None) -> str:
    """A diffusers-style model card: how to load it, the model, the data, the training figures
    and `validation`, the (step, figures) of the run's latest validation (`RunDir.latest_validation`)."""
    import yaml

    from trip.config import to_dict

    m, t = cfg.model, cfg.train
    lora = t.lora
    base = m.pretrained_model or m.pretrained_unet
    load = ('pipe = TRIPPipeline.from_pretrained("path/to/the/base/model")  # ' + str(base) + '\n'
            'pipe.load_lora_weights("path/to/this/directory")') if adapter else \
        'pipe = TRIPPipeline.from_pretrained("path/to/this/directory")'
    what = (f"LoRA adapters (rank {lora.rank}, alpha {lora.alpha}, on {', '.join(lora.target_modules)}"
            f"{' and the TNF attention' if lora.fusion else ''}) of the base model `{base}`") if adapter else \
        (f"A model fine-tuned with LoRA (rank {lora.rank}) on `{base}`, adapters merged" if lora.enabled else "A model")
    text = "with captions (" + cfg.preprocess.text_encoder + ")" if cfg.preprocess.text_encoder else "without captions"
    loss = figures.get("final_loss")
    rows = [("steps trained", found.step), ("final training loss", _fmt(loss)),
            ("mean training loss, last 10% of steps", _fmt(figures.get("mean_loss_last_10pct"))),
            ("throughput at the end (samples/s)", _fmt(figures.get("samples_per_second")))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: diffusers
pipeline_tag: image-to-video
tags: [trip, image-to-video, video-diffusion]
---

# TRIP image-to-video model `{cfg.run.name}`

{what}: [TRIP](https://arxiv.org/abs/2403.17005), exported by `trip export` from
`{found.url}` (step {found.step}, {"EMA" if kind == "ema" else "raw"} weights).

## Use

```python
import torch
from diffusers.utils import export_to_video
from PIL import Image

from trip.pipeline import TRIPPipeline  # the pipeline and its fusion/codec classes

{load}
frames = pipe(image=Image.open("first_frame.png"), num_inference_steps={cfg.sample.steps},
              generator=torch.Generator().manual_seed(0)).frames[0]
export_to_video(frames, "clip.mp4", fps={cfg.sample.fps})
```

or `trip sample --model path/to/this/directory --image first_frame.png`.

## Model

- {m.num_frames} frames of {m.latent_hw[0]}x{m.latent_hw[1]} (h x w) latents ({m.latent_channels} channels), codec
  `{cfg.codec.kind}`; image conditioning `{m.image_conditioning}`; fusion `{m.fusion.mode}`
- 3D-UNet (diffusers `UNet3DConditionModel`): block widths {list(m.unet.block_out_channels)},
  {m.unet.layers_per_block} layer(s) per block, cross-attention width {m.unet.cross_attention_dim}
- trained {text}

## Training

- data: `{cfg.data.dataset}`{f" ({samples} clips)" if samples is not None else ""}
- {found.step} steps of {t.global_batch_size} clips, learning rates {t.lr_unet} (UNet) / {t.lr_fusion}
  (fusion), {t.precision}, EMA decay {t.ema_decay}

What the run recorded (its training loss history up to this checkpoint):

| figure | value |
|---|---|
{table}

## Validation

{validation_section(cfg, found.step, validation)}

## Training config

```yaml
{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```
"""


# what a validation's result.json holds (`trip.train.validation`), in the card's words
VALIDATION_ROWS = (
    ("loss", "validation loss (noise MSE, fixed noise and timesteps)"),
    ("psnr", "PSNR of the sample videos vs their clips (dB)"),
    ("ssim", "SSIM of the sample videos vs their clips"),
    ("displacement_ratio", "motion: displacement ratio (1 = moves as far as the clip)"),
    ("displacement_ratio_min", "motion: worst clip's displacement ratio"),
    ("direction_error_deg", "motion: direction error (degrees)"),
)


def validation_section(cfg: Any, step: int, validation: tuple[int, dict[str, Any]] | None) -> str:
    """The card's validation figures: those of the run's latest validation at or before
    `step`, or a plain statement that it recorded none."""
    every = cfg.train.validate_every
    if validation is None:
        why = ("the run did not validate (`train.validate_every` = 0)" if not every else
               f"none had completed by step {step} (`train.validate_every` = {every})")
        return f"No validation figures recorded: {why}."
    at, fig = validation
    head = f"The run's latest validation is of step {at}"
    if at != step:
        why = "its validation had not completed" if step % max(cfg.train.validate_every, 1) == 0 else \
            f"validation runs every {cfg.train.validate_every} steps"
        head += f" (not of this checkpoint, step {step}: {why})"
    rows = [("step", str(at)), ("held-out samples in the loss", str(fig.get("samples", "n/a"))),
            ("sample videos scored", str(len(fig.get("per_clip", {}))))]
    rows += [(label, _fmt(fig[key])) for key, label in VALIDATION_ROWS if key in fig]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    weights = "EMA" if cfg.train.ema_decay > 0 else "raw"  # what `validate_checkpoint` exports
    return (f"{head}: its {weights} weights on the first samples of `{cfg.data.validation}` "
            f"(motion figures only when the clips show one moving object):\n\n"
            f"| figure | value |\n|---|---|\n{table}")


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.4g}"


def _check_names(shapes: dict[str, Any], want: dict[str, tuple[int, ...]], where: str) -> None:
    """The checkpoint's tensors are exactly the model's parameters (or adapters), shape for shape."""
    got = {k: tuple(v) for k, v in shapes.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or bad:
        raise ValueError(f"{where}: checkpoint tensors do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shape {bad[:3]}")


def cli(args: argparse.Namespace) -> int:
    try:
        export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema, format=args.format,
                          merge_lora=args.merge_lora)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
