"""TRIPPipeline: a trained TRIP model as a diffusers `DiffusionPipeline` (image [+ prompt] -> video).

    pipe = TRIPPipeline.from_pretrained("models/trip-256")          # a `trip export` directory
    frames = pipe(image=PIL.Image.open("first.png"), generator=torch.Generator().manual_seed(0)).frames[0]
    diffusers.utils.export_to_video(frames, "clip.mp4", fps=4)

This is the one sampling implementation: `trip sample` and the demo call it too. Its
components are diffusers models: `unet` (a `UNet3DConditionModel`), `fusion` (TNF / linear /
none, `trip.model.fusion`), `scheduler` (DDIM over the training schedule), `vae` (an
`AutoencoderKL` or the lossless codec) and, for models trained with captions,
`text_encoder` + `tokenizer`. At sampling time they are assembled into a `TRIPModel` that
shares their weights, so every denoising step runs exactly the training forward pass: the
UNet's residual noise, the image noise prior recomputed from the image latent at that step,
and their fusion. Classifier-free guidance mixes predictions with and without the caption
(the "no caption" condition of training: all-zero text states).

Determinism: the initial noise (and DDIM's noise when eta > 0) comes from `generator`; on a
CPU the same seed gives the same frames bit for bit.

LoRA: `load_lora_weights` reads diffusers' LoRA file format (`pytorch_lora_weights.safetensors`,
keys `unet.<module>.lora_A.weight`, the peft `LoraConfig` per component in the file's
metadata) and injects the adapters with peft. diffusers' own LoRA mixins cannot be used:
`UNet3DConditionModel` has no PEFT adapter support in diffusers.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet3DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

import trip.codec  # noqa: F401 -- diffusers resolves our component classes from loaded modules only
import trip.model.fusion  # noqa: F401
from trip.codec import LatentCodec, LosslessCodec, VAECodec
from trip.config import latent_size_problem, size_hw
from trip.model import TRIPModel
from trip.model import diffusers_layout as layout
from trip.sampling import prepare_image

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
LORA_COMPONENTS = (layout.UNET, layout.FUSION)


@dataclass
class TRIPPipelineOutput(BaseOutput):
    """`frames`: per `output_type`, "pil": a list (one per video) of lists of PIL images; "np":
    float32 [B, F, H, W, 3] in [0, 1]; "pt": float32 [B, F, 3, H, W] in [0, 1]; "latent":
    [B, C, F, h, w]. `frames[i]` goes to `diffusers.utils.export_to_video` as it is (pil, np)."""

    frames: Any


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str], max_length: int,
                   device: torch.device | str) -> torch.Tensor:
    """Captions -> last hidden states [N, max_length, D] (padded), as preprocessing encodes them."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return text_encoder(input_ids=tokens.input_ids.to(device)).last_hidden_state


class TRIPPipeline(DiffusionPipeline):
    """Image (+ caption) to video with a trained TRIP model."""

    model_cpu_offload_seq = "text_encoder->unet->fusion->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet3DConditionModel, fusion: Any, scheduler: Any, vae: Any,
                 text_encoder: Any = None, tokenizer: Any = None, max_text_length: int = 77) -> None:
        super().__init__()
        self.register_modules(unet=unet, fusion=fusion, scheduler=scheduler, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(max_text_length=max_text_length)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> TRIPPipeline:
        """Load a `trip export` directory (local path or fsspec URL; nothing is fetched from a hub).

        Raises FileNotFoundError naming the missing folder or file before diffusers reads anything."""
        from trip.storage import local_copy

        path = str(pretrained_model_name_or_path)
        try:
            local = local_copy(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"TRIP model directory not found: {path}") from e
        index_path = os.path.join(local, layout.MODEL_INDEX)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{path}: no {layout.MODEL_INDEX} (not a diffusers-format export; "
                                    f"`trip export --format diffusers` writes one)")
        with open(index_path) as fh:
            index = json.load(fh)
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name in kwargs:
                continue
            folder = os.path.join(local, name)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{path}: {layout.MODEL_INDEX} names the component {name!r} "
                                        f"({spec[0]}.{spec[1]}) but its folder {name}/ is missing")
            if not os.listdir(folder):
                raise FileNotFoundError(f"{path}: the folder {name}/ of component {name!r} is empty")
        kwargs.setdefault("low_cpu_mem_usage", False)  # accelerate is not a dependency
        return super().from_pretrained(local, **kwargs)

    @classmethod
    def from_trip_model(cls, model: TRIPModel, codec: LatentCodec) -> TRIPPipeline:
        """A pipeline of an in-memory TRIPModel (e.g. a `--format trip` directory); copies the UNet."""
        from trip.diffusion import sample_scheduler

        unet = UNet3DConditionModel(**layout.unet_config(model.cfg))
        unet.load_state_dict(model.unet.state_dict(), strict=True)
        vae = codec if isinstance(codec, LosslessCodec) else codec.vae
        param = next(model.parameters())
        pipe = cls(unet=unet, fusion=model.fusion, scheduler=sample_scheduler(model.diffusion_cfg), vae=vae)
        pipe = pipe.to(param.device)
        return pipe if param.dtype == torch.float32 else pipe.to(dtype=param.dtype)

    # ------------------------------------------------------------------ the parts, assembled

    def trip_model(self) -> TRIPModel:
        """The TRIPModel of the components; shares their weights (nothing is copied)."""
        from trip.model.unet import ResidualUNet3D

        fusion_cfg = {**self.fusion.config, "_class_name": type(self.fusion).__name__}
        cfg = layout.model_config(dict(self.unet.config), fusion_cfg, "TRIPPipeline")
        diffusion = layout.diffusion_config(self.scheduler.config)
        unet = ResidualUNet3D(cfg.unet, cfg.latent_channels, cfg.image_conditioning, reference=self.unet)
        model = TRIPModel(cfg, diffusion, unet=unet, fusion=self.fusion)
        return model.to(self.unet.device)

    def codec(self) -> LatentCodec:
        return self.vae if isinstance(self.vae, LosslessCodec) else VAECodec.of(self.vae)

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Size of the frames this model was trained on (latent size x the codec's downscale): the
        side S of a square model, (H, W) of a non-square one. `__call__` makes other sizes too."""
        h, w = self.frame_size
        return h if h == w else (h, w)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the frames this model was trained on."""
        down = self.codec().downscale
        h, w = size_hw(self.fusion.config.latent_size)
        return h * down, w * down

    # ------------------------------------------------------------------ inputs

    def _images(self, image: Any, size: tuple[int, int]) -> torch.Tensor:
        """PIL image(s) -> [B, 3, H, W], centre-cropped to the aspect of `size` and resized;
        tensors must already be [B, 3, H, W]."""
        from PIL import Image

        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list) and image and all(isinstance(i, Image.Image) for i in image):
            frames = [torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1).float() / 255.0 for i in image]
            return torch.stack([prepare_image(f, size) for f in frames])
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a PIL.Image, a list of them or a tensor, got {type(image).__name__}")
        if image.ndim == 3:
            image = image[None]
        h, w = size
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, h, w):
            raise ValueError(f"image: expected a tensor [B, 3, {h}, {w}] (or [3, {h}, {w}]) in [0, 1], "
                             f"got {tuple(image.shape)}; PIL images are centre-cropped and resized, tensors are not")
        return image.float()

    def _text(self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None, batch: int,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt is not None:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("this model has no text encoder (it was trained without captions): leave prompt "
                                 "unset or pass prompt_embeds")
            prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
            if len(prompts) != batch:
                raise ValueError(f"{len(prompts)} prompts for {batch} images")
            prompt_embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts,
                                           int(self.config.max_text_length), device)
        if prompt_embeds is None:
            return None
        width = int(self.unet.config.cross_attention_dim)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != batch or prompt_embeds.shape[2] != width:
            raise ValueError(f"prompt_embeds: expected [{batch}, L, {width}], got {tuple(prompt_embeds.shape)}")
        return prompt_embeds.to(device, dtype)

    # ------------------------------------------------------------------ LoRA

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
                          adapter_name: str | None = None, **kwargs: Any) -> None:
        """Add LoRA adapters from diffusers' LoRA format (a directory holding
        `pytorch_lora_weights.safetensors`, that file, or its state dict) to `unet` / `fusion`.

        `kwargs` go to diffusers' reader (`weight_name=...`). Each component's peft `LoraConfig`
        comes from the file's metadata (what `trip export` writes); without it the rank is read
        off the tensors and alpha = rank. Adapters of one name add up with those of other names."""
        from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, str) and not os.path.exists(source):
            raise FileNotFoundError(f"LoRA weights not found: {source}")
        state, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(source, return_lora_metadata=True,
                                                                            **kwargs)
        metadata = metadata or {}
        unknown = sorted({k.split(".", 1)[0] for k in state} - set(LORA_COMPONENTS))
        if unknown or not state:
            raise ValueError(f"{source}: not TRIP LoRA weights (keys must start with one of {LORA_COMPONENTS}; "
                             f"found {unknown or 'no tensors'})")
        name = adapter_name or f"default_{len(self.lora_adapters())}"
        for comp in LORA_COMPONENTS:
            sd = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(f"{comp}.")}
            if not sd:
                continue
            meta = {k[len(comp) + 1:]: v for k, v in metadata.items() if k.startswith(f"{comp}.")}
            if not meta:
                rank = next(v.shape[1] for k, v in sd.items() if ".lora_B." in k)
                modules = sorted({k.split(".lora_")[0] for k in sd})
                meta = {"r": rank, "lora_alpha": rank, "target_modules": modules}
            module = getattr(self, comp)
            inject_adapter_in_model(LoraConfig(**meta), module, adapter_name=name)
            result = set_peft_model_state_dict(module, sd, adapter_name=name)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ValueError(f"{source}: {len(unexpected)} {comp} LoRA tensors match no layer, "
                                 f"e.g. {unexpected[:3]}")
            module.to(self.unet.device)

    def lora_adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded into any component."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        names: set[str] = set()
        for comp in LORA_COMPONENTS:
            for m in getattr(self, comp).modules():
                if isinstance(m, BaseTunerLayer):
                    names.update(m.lora_A.keys())
        return sorted(names)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter: the components are their base models again."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        for comp in LORA_COMPONENTS:
            recurse_remove_peft_layers(getattr(self, comp))

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(self, image: Any, prompt: str | list[str] | None = None, *, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None) -> TRIPPipelineOutput | tuple:
        """Generate videos whose first frame is `image`.

        Args:
            image: a PIL image or a list of them (centre-cropped to the aspect of height x width
                and resized to it), or a float tensor [B, 3, height, width] / [3, height, width]
                in [0, 1].
            prompt: a caption (or one per image); needs a text encoder. Or `prompt_embeds`
                [B, L, D], text-encoder hidden states.
            num_frames: frames per video (default: the number the model was trained on; a TNF
                model makes at most that many).
            height, width: frame size in pixels (default: `frame_size`, what the model was
                trained on). Other sizes work when their latents' sides divide by the UNet's
                downsampling and the TNF patch size (TNF resamples its position embeddings).
            num_inference_steps: scheduler steps (paper: 50 DDIM steps).
            guidance_scale: classifier-free guidance on the caption; 1 disables it.
            eta: DDIM's eta (0: deterministic DDIM).
            generator: a torch.Generator for the initial noise (and DDIM noise when eta > 0).
            latents: initial noise [B, C, F, h, w] instead of drawing it.
            output_type: "pil", "np", "pt" or "latent" (see `TRIPPipelineOutput`).
            callback_on_step_end: called as f(pipe, i, t, {name: tensor}) after each step with the
                tensors named in `callback_on_step_end_tensor_inputs` ("latents"); a returned
                "latents" replaces the current ones.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        inputs = callback_on_step_end_tensor_inputs or ["latents"]
        bad = [k for k in inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {self._callback_tensor_inputs}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        model = self.trip_model().eval()
        cfg = model.cfg
        frames = cfg.num_frames if num_frames is None else int(num_frames)
        if frames < 1 or (cfg.fusion.mode == "tnf" and frames > cfg.num_frames):
            raise ValueError(f"num_frames must lie in [1, {cfg.num_frames}] for this model (its TNF was built "
                             f"for {cfg.num_frames} frames), got {frames}")
        device, dtype = self.unet.device, self.unet.dtype
        codec = self.codec()
        size = (height or self.frame_size[0], width or self.frame_size[1])
        if size[0] % codec.downscale or size[1] % codec.downscale:
            raise ValueError(f"height x width = {size[0]} x {size[1]} must divide by the codec's downscale "
                             f"{codec.downscale}")
        lat_h, lat_w = size[0] // codec.downscale, size[1] // codec.downscale
        problem = latent_size_problem(cfg, (lat_h, lat_w))
        if problem:
            raise ValueError(f"height x width = {size[0]} x {size[1]} (latents {lat_h} x {lat_w}): {problem}")
        images = self._images(image, size).to(device)
        b = images.shape[0]
        text = self._text(prompt, prompt_embeds, b, device, dtype)
        image_latents = codec.encode(images).to(device, dtype)

        shape = (b, cfg.latent_channels, frames, lat_h, lat_w)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            z = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected {shape}, got {tuple(latents.shape)}")
        else:
            z = latents.to(device, torch.float32)
        z = z * self.scheduler.init_noise_sigma
        step_params = inspect.signature(self.scheduler.step).parameters
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}
        guided = text is not None and guidance_scale != 1.0
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                z_in = self.scheduler.scale_model_input(z, t).to(dtype)
                tt = torch.full((b,), int(t), device=device, dtype=torch.long)
                if guided:
                    both = model(torch.cat([z_in, z_in]), torch.cat([image_latents, image_latents]),
                                 torch.cat([tt, tt]), torch.cat([text, torch.zeros_like(text)]))
                    cond, uncond = both.noise.float().chunk(2)
                    eps = uncond + guidance_scale * (cond - uncond)
                else:
                    eps = model(z_in, image_latents, tt, text).noise.float()
                z = self.scheduler.step(eps, t, z, **extra).prev_sample
                if callback_on_step_end is not None:
                    given = {"latents": z}
                    out = callback_on_step_end(self, i, t, {k: given[k] for k in inputs}) or {}
                    z = out.get("latents", z)
                bar.update()
        self.maybe_free_model_hooks()
        videos = self._postprocess(z.float(), codec, output_type)
        return TRIPPipelineOutput(frames=videos) if return_dict else (videos,)

    @staticmethod
    def _postprocess(z: torch.Tensor, codec: LatentCodec, output_type: str) -> Any:
        if output_type == "latent":
            return z
        video = torch.stack([codec.decode(z[i].permute(1, 0, 2, 3)) for i in range(z.shape[0])])  # [B, F, 3, H, W]
        if output_type == "pt":
            return video
        if output_type == "np":
            return video.permute(0, 1, 3, 4, 2).cpu().numpy()
        from PIL import Image

        from trip.video import to_uint8

        return [[Image.fromarray(f) for f in to_uint8(clip)] for clip in video]
