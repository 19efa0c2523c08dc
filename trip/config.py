"""Typed run configuration: one small dataclass per component, loaded strictly from YAML.

Why strict: a typo in a YAML key on a 64-GPU job should fail in the first second on the
laptop that launched it, not silently fall back to a default three days later. Every
section is a `@dataclass(kw_only=True)` whose fields carry a docstring-like comment and
whose `__post_init__` rejects bad combinations with a `ValueError` naming the field.

Components receive only their own slice (`cfg.model`, `cfg.data`, ...), never the whole
`Config`. `load_config(path, overrides)` reads YAML, applies `--set a.b=c` overrides
(values parsed as YAML scalars), and raises `ConfigError` naming the file and the dotted
key for unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and source."""


Size = int | tuple[int, int]  # a frame or latent size: an int is square, a pair is (height, width)


def size_hw(size: Size | list[int]) -> tuple[int, int]:
    """(height, width) of a `Size`: an int s is (s, s)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def show_size(size: Size) -> str:
    """A `Size` as the YAML that sets it: `8` or `[8, 12]`."""
    return str(list(size)) if isinstance(size, tuple) else str(size)


def normalise_size(size: Size | list[int], name: str) -> Size:
    """A validated `Size` in its canonical form: a pair of equal sides becomes the int, so
    `[s, s]` and `s` are one config (same hash, same model, same parameter names)."""
    if isinstance(size, bool) or not isinstance(size, (int, tuple, list)):
        raise ValueError(f"{name} must be an integer or a [height, width] pair, got {size!r}")
    if not isinstance(size, int) and (len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in size)):
        raise ValueError(f"{name} must be an integer or a [height, width] pair of integers, got {size!r}")
    h, w = size_hw(size)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be >= 1, got {size!r}")
    return h if h == w else (h, w)


# --------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class UNetConfig:
    """The residual 3D-UNet. Field names and meanings match diffusers' UNet3DConditionModel
    so a pretrained ModelScope-T2V `unet/config.json` maps onto it one to one."""

    block_out_channels: tuple[int, ...] = (32, 64)  # width of each resolution level
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D", "DownBlock3D")  # diffusers block names
    up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D")  # mirror of down_block_types
    layers_per_block: int = 1  # resnets per down block (up blocks have one more)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every block width
    cross_attention_dim: int = 64  # text hidden-state width
    attention_head_dim: int = 8  # diffusers' name: heads per block (transformer_in: head width); ModelScope: 64
    norm_eps: float = 1e-5  # GroupNorm epsilon

    def __post_init__(self) -> None:
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"unet.down_block_types has {len(self.down_block_types)} entries, "
                f"unet.block_out_channels has {len(self.block_out_channels)}: they must match"
            )
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError("unet.up_block_types must have one entry per block_out_channels")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"unet.norm_num_groups={self.norm_num_groups} must divide every "
                    f"block_out_channels entry (got {c})"
                )


@dataclass(kw_only=True)
class FusionConfig:
    """How residual noise (UNet) and reference noise (image prior) are merged."""

    mode: Literal["tnf", "linear", "none"] = "tnf"  # tnf: TRIP; linear: TRIP^W; none: TRIP^-
    patch_size: int = 2  # TNF tokens are p x p latent patches of one frame
    dim: int = 64  # TNF token width
    depth: int = 1  # number of TNF blocks
    heads: int = 4  # attention heads in each TNF block
    timestep_dim: int = 64  # width of the timestep embedding that drives adaptive LayerNorm
    linear_start: float = 1.0  # TRIP^W: lambda at the first frame (weight of reference noise)
    linear_end: float = 0.0  # TRIP^W: lambda at the last frame

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"fusion.dim={self.dim} must be divisible by fusion.heads={self.heads}")
        for name in ("patch_size", "dim", "depth", "heads", "timestep_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"fusion.{name} must be >= 1")
        for name in ("linear_start", "linear_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fusion.{name} must lie in [0, 1]")


@dataclass(kw_only=True)
class ModelConfig:
    """The TRIP model: residual UNet + image noise prior + fusion."""

    num_frames: int = 8  # frames per clip (paper: 16)
    latent_channels: int = 12  # C of the latents (UNet in/out channels follow from it)
    latent_size: Size = 8  # latents: h = w, or [h, w] (paper: 32); TNF resamples its position grid for other sizes
    image_conditioning: Literal["temporal", "channel"] = "temporal"  # temporal: paper; channel: TRIP_C
    unet: UNetConfig = field(default_factory=UNetConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    gradient_checkpointing: bool = False  # recompute each UNet block in backward
    pretrained_unet: str | None = None  # diffusers-format unet/ dir (local or fsspec URL)
    pretrained_model: str | None = None  # a `trip export` dir (either format): initial UNet and fusion weights
    temporal_conv_dropout: float = 0.1  # dropout in the UNet's temporal convolutions (ModelScope-T2V: 0.1)

    def __post_init__(self) -> None:
        if self.pretrained_unet and self.pretrained_model:
            raise ValueError("set at most one of model.pretrained_unet and model.pretrained_model")
        if self.num_frames < 2:
            raise ValueError("model.num_frames must be >= 2")
        if not 0.0 <= self.temporal_conv_dropout < 1.0:
            raise ValueError("model.temporal_conv_dropout must lie in [0, 1)")
        self.latent_size = normalise_size(self.latent_size, "model.latent_size")
        problem = latent_size_problem(self, self.latent_hw)
        if problem:
            raise ValueError(f"model.latent_size={show_size(self.latent_size)}: {problem}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of the latents the model is configured for."""
        return size_hw(self.latent_size)


def latent_size_problem(cfg: ModelConfig, hw: tuple[int, int]) -> str | None:
    """Why latents of (h, w) = `hw` cannot go through this model, or None when they can."""
    p, down = cfg.fusion.patch_size, 2 ** (len(cfg.unet.block_out_channels) - 1)
    for side in hw:
        if side % p:
            return f"{side} is not divisible by fusion.patch_size={p}"
        if side % down:
            return f"{side} is not divisible by 2^(number of UNet levels - 1) = {down}"
    return None


@dataclass(kw_only=True)
class DiffusionConfig:
    """Noise schedule (a diffusers DDPM/DDIM scheduler is built from these)."""

    num_train_timesteps: int = 1000  # T of the forward process
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"  # SD / ModelScope use scaled_linear
    beta_start: float = 0.00085  # beta_1
    beta_end: float = 0.012  # beta_T


@dataclass(kw_only=True)
class CodecConfig:
    """Frames <-> latents. `lossless` is parameter-free pixel-unshuffle (CPU demos/tests)."""

    kind: Literal["lossless", "vae"] = "lossless"  # vae: diffusers AutoencoderKL
    path: str | None = None  # vae: diffusers-format model dir (holding vae/) or the vae dir itself
    downscale: int = 2  # lossless: pixel-unshuffle factor (channels = 3 * downscale^2)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # vae compute dtype

    def __post_init__(self) -> None:
        if self.kind == "vae" and not self.path:
            raise ValueError("codec.path is required when codec.kind is 'vae'")


# --------------------------------------------------------------------------- data


@dataclass(kw_only=True)
class DataConfig:
    """Streaming loader over latent shards (see trip/data/loader.py)."""

    dataset: str = ""  # dataset prefix holding index.json (local path or fsspec URL)
    micro_batch_size: int = 4  # samples per rank per forward
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 64  # samples shuffled together: whole shards grouped up to at least this many
    seed: int = 0  # shard order and buffer shuffle seed
    uneven: Literal["drop", "pad"] = "drop"  # equal batches per rank: drop the tail or pad it
    image_frame: int = 0  # frame used as the conditioning image
    max_corrupt_fraction: float = 0.05  # fail once more than this fraction is corrupt
    retries: int = 5  # storage retries (exponential backoff)
    prefetch_factor: int = 4  # batches prefetched per worker
    pin_memory: bool = True  # pin host memory when training on CUDA
    text: bool = True  # load text states when the shards have them
    validation: str | None = None  # held-out shard set (prefix with index.json) for train.validate_every
    bucket_batch: Literal["same", "tokens"] = "same"  # bucketed datasets: micro_batch_size for every bucket, or (tokens) it is the largest bucket's and smaller ones take more samples so latent elements per micro-batch stay about equal
    bucket_batch_sizes: dict[str, int] = field(default_factory=dict)  # bucketed datasets: micro-batch size by bucket name, overriding bucket_batch
    bucket_weights: dict[str, float] = field(default_factory=dict)  # bucketed datasets: draw weight by bucket name (default 1: buckets drawn in proportion to the rounds they have left; > 1: earlier in the epoch)

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError("data.micro_batch_size must be >= 1")
        bad = {k: v for k, v in self.bucket_batch_sizes.items() if v < 1}
        if bad:
            raise ValueError(f"data.bucket_batch_sizes must be >= 1, got {bad}")
        bad_w = {k: v for k, v in self.bucket_weights.items() if not v > 0}
        if bad_w:
            raise ValueError(f"data.bucket_weights must be > 0, got {bad_w}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError("data.max_corrupt_fraction must lie in [0, 1]")


@dataclass(kw_only=True)
class BucketGrid:
    """preprocess.buckets as a grid: one bucket per (aspect, frames), each of about `pixels`
    pixels with height and width multiples of `multiple_of`."""

    aspects: tuple[str, ...] = ("16:9", "1:1", "9:16")  # "W:H" ratios (16:9 is landscape)
    pixels: int = 65536  # target height x width of every bucket (256x256 = 65536)
    frames: tuple[int, ...] = (16,)  # frame counts; every aspect gets one bucket per count
    multiple_of: int = 16  # height and width are multiples of this (the codec's downscale x the model's)

    def __post_init__(self) -> None:
        where = "preprocess.buckets"
        if not self.aspects:
            raise ValueError(f"{where}.aspects must name at least one aspect ratio such as '16:9'")
        for a in self.aspects:
            parse_aspect(a, f"{where}.aspects")
        if len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"{where}.aspects lists an aspect twice: {list(self.aspects)}")
        if self.pixels < 1:
            raise ValueError(f"{where}.pixels must be >= 1, got {self.pixels}")
        if not self.frames or min(self.frames) < 1:
            raise ValueError(f"{where}.frames must be frame counts >= 1, got {list(self.frames)}")
        if len(set(self.frames)) != len(self.frames):
            raise ValueError(f"{where}.frames lists a count twice: {list(self.frames)}")
        if self.multiple_of < 1:
            raise ValueError(f"{where}.multiple_of must be >= 1, got {self.multiple_of}")

    def shapes(self) -> list[tuple[int, int, int]]:
        """(height, width, frames) of each bucket: aspects in order, then frame counts."""
        m, out = self.multiple_of, []
        for a in self.aspects:
            ratio = parse_aspect(a, "preprocess.buckets.aspects")  # W / H
            h = (self.pixels / ratio) ** 0.5
            height, width = max(m, round(h / m) * m), max(m, round(h * ratio / m) * m)
            out += [(height, width, f) for f in self.frames]
        return out


def parse_aspect(text: str, name: str) -> float:
    """'16:9' (width:height) -> 16/9; a ValueError naming `name` for anything else."""
    parts = text.split(":") if isinstance(text, str) else []
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        w = h = 0.0
    if len(parts) != 2 or not (w > 0 and h > 0):
        raise ValueError(f"{name}: {text!r} is not an aspect ratio 'W:H' of two positive numbers (e.g. '16:9')")
    return w / h


@dataclass(kw_only=True)
class PreprocessConfig:
    """WebVid CSV + videos -> latent WebDataset shards (data_tools + pipelines/preprocess.py)."""

    csv: str = ""  # WebVid-format CSV (local or fsspec URL)
    video_root: str | None = None  # if set, videos are video_root/path_template; else contentUrl
    path_template: str = "{page_dir}/{videoid}{ext}"  # CSV columns in braces; {ext}: contentUrl's video extension (else .mp4; others tried if missing)
    output: str = ""  # dataset prefix for shards + index.json
    num_frames: int = 8  # frames per clip (paper: 16)
    fps: float | None = 4.0  # sample at this frame rate (paper: 4) ...
    frame_stride: int | None = None  # ... or every n-th frame (set fps to null)
    start_offset: float = 0.0  # seconds skipped at the start of each video
    resolution: Size = 16  # frame size: an int S or [H, W]; scaled to cover it (aspect kept), then centre-cropped (paper: 256)
    min_duration: float | None = None  # drop rows shorter than this (seconds, CSV duration)
    max_duration: float | None = None  # drop rows longer than this (seconds)
    limit: int | None = None  # use at most this many rows (after filtering)
    strict_csv: bool = False  # fail on the first bad CSV row instead of listing it in the errors manifest
    samples_per_shard: int = 64  # close a shard after this many samples
    max_shard_bytes: int | None = None  # also close a shard past this many bytes
    text_encoder: str | None = None  # diffusers dir with text_encoder/ + tokenizer/; null: none
    max_text_length: int = 77  # tokenizer max length (text states are [L, D])
    encode_batch_size: int = 16  # frames per codec call
    encode_actors: int = 1  # encoder actor pool size (when clips are encoded by actors, see encode_on)
    encode_on: str = "auto"  # auto: actors when the cluster has GPUs, else in the shard tasks; or actors | tasks
    encode_gpus_per_actor: float = 1.0  # GPUs each encoder actor takes (on a GPU cluster)
    shards_in_flight: int = 0  # shard tasks submitted at once; 0: the cluster's CPU count
    decode_threads: int = 1  # PyAV decoding threads per task
    metrics_port: int = 0  # Prometheus exporter of the job driver; 0 disables
    fetch_connect_timeout_s: float = 10.0  # http(s) videos: seconds to open a connection
    fetch_read_timeout_s: float = 30.0  # http(s) videos: longest wait for the next bytes of a response
    fetch_timeout_s: float = 300.0  # http(s) videos: seconds for one video, all tries and backoffs included
    fetch_tries: int = 4  # http(s) videos: tries on 5xx, 408, 429, resets and timeouts (other 4xx: one try)
    fetch_backoff_s: float = 1.0  # http(s) videos: wait before the first retry; doubles each retry (up to 30 s), with jitter
    fetch_max_per_host: int = 8  # http(s) videos: downloads at once from one host, across the Ray cluster; 0: no cap
    fetch_max_mb: float = 512.0  # http(s) videos: a larger video is skipped (errors manifest, stage fetch)
    buckets: tuple[tuple[int, int, int], ...] | BucketGrid | None = None  # null: one shape (resolution, num_frames); or [[H, W, frames], ...] in pixels; or {aspects: ["16:9", "1:1"], pixels: N, frames: [8, 16], multiple_of: M}: each clip goes to the bucket nearest its aspect among those whose frames it fills (then the longest)
    bucket_max_crop: float = 0.25  # with buckets: a clip whose nearest bucket would crop away more than this fraction of its pixels is skipped (errors manifest, stage bucket)

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.frame_stride is None):
            raise ValueError("set exactly one of preprocess.fps and preprocess.frame_stride")
        self.resolution = normalise_size(self.resolution, "preprocess.resolution")
        for name in ("fetch_connect_timeout_s", "fetch_read_timeout_s", "fetch_timeout_s", "fetch_max_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"preprocess.{name} must be > 0, got {getattr(self, name)}")
        if self.fetch_tries < 1:
            raise ValueError(f"preprocess.fetch_tries must be >= 1 (1: no retry), got {self.fetch_tries}")
        if self.fetch_backoff_s < 0:
            raise ValueError(f"preprocess.fetch_backoff_s must be >= 0, got {self.fetch_backoff_s}")
        if self.fetch_max_per_host < 0:
            raise ValueError(f"preprocess.fetch_max_per_host must be >= 0 (0: no cap), got {self.fetch_max_per_host}")
        if self.samples_per_shard < 1:
            raise ValueError("preprocess.samples_per_shard must be >= 1")
        if self.encode_on not in ("auto", "actors", "tasks"):
            raise ValueError(f"preprocess.encode_on must be auto, actors or tasks, got {self.encode_on!r}")
        if self.encode_gpus_per_actor <= 0:
            raise ValueError("preprocess.encode_gpus_per_actor must be > 0")
        if self.shards_in_flight < 0:
            raise ValueError("preprocess.shards_in_flight must be >= 0 (0: the cluster's CPU count)")
        if not 0.0 <= self.bucket_max_crop < 1.0:
            raise ValueError(f"preprocess.bucket_max_crop must lie in [0, 1), got {self.bucket_max_crop}")
        if isinstance(self.buckets, (list, tuple)):
            self.buckets = tuple(tuple(b) if isinstance(b, (list, tuple)) else b  # type: ignore[misc]
                                 for b in self.buckets)
        shapes = self.bucket_shapes()
        if shapes is not None:
            if not shapes:
                raise ValueError("preprocess.buckets must list at least one [height, width, frames] bucket "
                                 "(or be null for one shape)")
            for i, b in enumerate(shapes):
                if not isinstance(b, tuple) or len(b) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in b):
                    raise ValueError(f"preprocess.buckets[{i}] must be [height, width, frames] of integers >= 1, "
                                     f"got {list(b) if isinstance(b, tuple) else b!r}")
            seen: dict[tuple[int, int, int], int] = {}
            for i, b in enumerate(shapes):
                if b in seen:
                    raise ValueError(f"preprocess.buckets: bucket {b[0]}x{b[1]}x{b[2]} (HxWxF) appears twice "
                                     f"(entries {seen[b]} and {i}{'; aspects that round to the same size' if isinstance(self.buckets, BucketGrid) else ''})")
                seen[b] = i

    def bucket_shapes(self) -> list[tuple[int, int, int]] | None:
        """(height, width, frames) of each bucket in config order, or None when not bucketed."""
        if self.buckets is None:
            return None
        if isinstance(self.buckets, BucketGrid):
            return self.buckets.shapes()
        return list(self.buckets)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- training


@dataclass(kw_only=True)
class ZeroConfig:
    """DeepSpeed ZeRO settings (stage 3 by default)."""

    stage: int = 3  # ZeRO stage (3 partitions params, grads, optimizer state)
    overlap_comm: bool = True  # overlap reduce/gather with compute
    contiguous_gradients: bool = True  # copy gradients into one buffer (less fragmentation)
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket
    prefetch_bucket_size: int = 50_000_000  # elements of params prefetched ahead (ZeRO-3)
    param_persistence_threshold: int = 100_000  # params smaller than this stay unpartitioned

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero.stage must be 0..3, got {self.stage}")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA fine-tuning (peft): low-rank adapters are trained on a frozen base model, which
    comes from model.pretrained_model or model.pretrained_unet. Checkpoints hold only the
    adapters and their optimizer state; lr_unet / lr_fusion apply to the adapters."""

    rank: int = 0  # adapter rank r; 0: no LoRA (full fine-tuning)
    alpha: float = 8.0  # adapter outputs are scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # UNet layers adapted (diffusers names, matched as name suffixes)
    fusion: bool = False  # also adapt the TNF's attention layers (q, kv, out)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"train.lora.rank must be >= 0, got {self.rank}")
        if self.rank and self.alpha <= 0:
            raise ValueError("train.lora.alpha must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("train.lora.dropout must lie in [0, 1)")
        if self.rank and not self.target_modules:
            raise ValueError("train.lora.target_modules must name at least one UNet layer")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and the per-worker loop."""

    max_steps: int = 300  # optimizer steps of the whole run
    global_batch_size: int = 8  # samples per optimizer step across all ranks, exactly, at any world size
    lr_unet: float = 2e-6  # paper: 2e-6
    lr_fusion: float = 2e-4  # paper: 2e-4
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 10  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    ema_decay: float = 0.999  # 0 disables EMA
    text_dropout: float = 0.1  # drop text states with this probability (for CFG)
    residual_loss_weight: float = 0.0  # + this x the residual UNet's own noise MSE (0: the paper's loss; see TRIPObjective)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 recommended on GPU
    seed: int = 0  # model init; per-sample noise/timesteps; per-micro-batch dropout
    log_every: int = 10  # rank 0 prints progress every n steps
    checkpoint_every: int = 100  # report (a barrier) + checkpoint every n steps
    keep_checkpoints: int = 2  # keep the last K checkpoints in storage
    validate_every: int = 0  # validate the checkpoint of every n-th step (a multiple of checkpoint_every); 0: never
    validation_samples: int = 32  # held-out samples in the validation loss (fixed noise and timesteps)
    validation_videos: int = 4  # sample videos per validation, from the first held-out samples' first frames
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                     "validation_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.validate_every < 0 or self.validation_videos < 0:
            raise ValueError("train.validate_every and train.validation_videos must be >= 0")
        if self.validate_every % self.checkpoint_every:
            raise ValueError(f"train.validate_every={self.validate_every} must be a multiple of "
                             f"train.checkpoint_every={self.checkpoint_every}: validation reads committed checkpoints")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("train.ema_decay must lie in [0, 1)")


@dataclass(kw_only=True)
class ScalingConfig:
    """Ray Train workers: fixed (`num_workers`) or elastic (`min_workers`..`max_workers`)."""

    num_workers: int = 2  # fixed worker count (ignored when min/max are set)
    min_workers: int | None = None  # set both min and max for an elastic run
    max_workers: int | None = None  # elastic upper bound
    use_gpu: bool = False  # one or more GPUs per worker
    gpus_per_worker: float = 1.0  # GPUs reserved per worker (with use_gpu)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    resize_check_s: float = 60.0  # elastic: how often Ray looks for room to grow the group
    validation_cpus: float = 1.0  # CPUs of the validation actor (train.validate_every), beside the workers
    validation_gpus: float = 0.0  # GPUs of the validation actor (0: it samples on CPU)

    def __post_init__(self) -> None:
        if (self.min_workers is None) != (self.max_workers is None):
            raise ValueError("scaling.min_workers and scaling.max_workers must be set together")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"scaling.min_workers={self.min_workers} must be >= 1 and <= "
                f"scaling.max_workers={self.max_workers}"
            )
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        if self.validation_cpus < 0 or self.validation_gpus < 0:
            raise ValueError("scaling.validation_cpus and scaling.validation_gpus must be >= 0")

    @property
    def world_sizes(self) -> range:
        """Every world size this run may take."""
        if self.min_workers is None:
            return range(self.num_workers, self.num_workers + 1)
        return range(self.min_workers, self.max_workers + 1)


@dataclass(kw_only=True)
class RunConfig:
    """Where and as what the run lives (Ray RunConfig)."""

    name: str = "trip-tiny"  # rerunning the same name resumes from its latest checkpoint
    storage_path: str = "./runs"  # local path or s3://bucket/prefix (endpoint from env)
    max_failures: int = 2  # worker-group restarts before the run fails
    output_dir: str | None = None  # also write plot/summary here (they always go to <storage_path>/<name>)
    preemption_grace_s: float = 25.0  # on SIGTERM: checkpoint at the next step and exit within this

    def __post_init__(self) -> None:
        if self.preemption_grace_s <= 0:
            raise ValueError("run.preemption_grace_s must be > 0")


@dataclass(kw_only=True)
class MetricsConfig:
    """Prometheus exporter in each worker."""

    port: int = 0  # exporter port = port + local_rank; 0 disables
    addr: str = "0.0.0.0"  # exporter listen address (127.0.0.1 keeps it on the host)


@dataclass(kw_only=True)
class SampleConfig:
    """Image -> video sampling."""

    steps: int = 50  # DDIM steps (paper: 50)
    guidance_scale: float = 1.0  # classifier-free guidance on text; 1 disables
    eta: float = 0.0  # DDIM eta
    seed: int = 0  # initial noise seed (same seed, same video)
    fps: int = 4  # of the written MP4/GIF


@dataclass(kw_only=True)
class Config:
    """A whole run: every section, each handed only to its own component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        m, c, p = self.model, self.codec, self.preprocess
        if c.kind == "lossless":
            if 3 * c.downscale**2 != m.latent_channels:
                raise ValueError(
                    f"model.latent_channels={m.latent_channels} does not match the lossless codec "
                    f"(3 * codec.downscale^2 = {3 * c.downscale**2})"
                )
            want = tuple(s * c.downscale for s in m.latent_hw)
            if size_hw(p.resolution) != want:
                raise ValueError(
                    f"preprocess.resolution={show_size(p.resolution)} must equal model.latent_size * "
                    f"codec.downscale = {show_size(normalise_size(want, 'resolution'))}"
                )
        if p.num_frames != m.num_frames:
            raise ValueError(
                f"preprocess.num_frames={p.num_frames} must equal model.num_frames={m.num_frames}"
            )
        if m.unet.cross_attention_dim < 1:
            raise ValueError("model.unet.cross_attention_dim must be >= 1")
        if self.train.validate_every and not self.data.validation:
            raise ValueError("train.validate_every is set but data.validation is empty: name a held-out shard set")
        if self.train.lora.enabled and not (m.pretrained_model or m.pretrained_unet):
            raise ValueError("train.lora adapts a frozen base model: set model.pretrained_model (a `trip export` "
                             "dir) or model.pretrained_unet")
        if self.train.lora.fusion and m.fusion.mode != "tnf":
            raise ValueError(f"train.lora.fusion adapts the TNF, but model.fusion.mode is {m.fusion.mode!r}")
        smallest_share = self.train.global_batch_size // max(self.scaling.world_sizes)
        if smallest_share < 1:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is smaller than the largest world "
                f"size {max(self.scaling.world_sizes)}: every rank needs at least one sample per step"
            )

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step at this world size.

        Every step trains on exactly `train.global_batch_size` samples at any world size: rank r
        takes G // W samples (+1 for the first G % W ranks) in this many micro-batches of at
        most `data.micro_batch_size`; the loss weights each sample by 1/G (see trip.train.loop).
        """
        share = -(-self.train.global_batch_size // world_size)
        return -(-share // self.data.micro_batch_size)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def hash(self) -> str:
        """Stable hash of the parts that change what is trained (not run/scaling/metrics)."""
        d = self.to_dict()
        # fields added later leave the hash of configs that do not use them as it was
        if d["model"]["pretrained_model"] is None:
            del d["model"]["pretrained_model"]
        if not self.train.lora.enabled:
            del d["train"]["lora"]
        if not self.train.residual_loss_weight:
            del d["train"]["residual_loss_weight"]
        for name in ("validate_every", "validation_samples", "validation_videos"):  # what is checked, not trained
            del d["train"][name]
        keep = {k: d[k] for k in ("model", "diffusion", "codec", "train")}
        keep["data"] = {k: v for k, v in d["data"].items()
                        if k not in ("num_workers", "prefetch_factor", "pin_memory", "validation")}
        for name, default in (("bucket_batch", "same"), ("bucket_batch_sizes", {}), ("bucket_weights", {})):
            if keep["data"][name] == default:
                del keep["data"][name]
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (tuples become lists), YAML/JSON-safe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and minimally coerce) `value` against annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors, fitting = [], []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(str(e))
                # a union with a section (preprocess.buckets): the option of the value's own
                # kind (a mapping for the section, a list for a tuple) says best what is wrong
                if any(dataclasses.is_dataclass(o) for o in args) and (
                        (isinstance(value, dict) and dataclasses.is_dataclass(a))
                        or (isinstance(value, (list, tuple)) and typing.get_origin(a) is tuple)):
                    fitting.append(str(e))
        if len(fitting) == 1:
            raise ConfigError(fitting[0])
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: '{key}' has the wrong type: {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source)
                for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{source}: '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(
                f"{source}: unknown key '{where}' (known keys here: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source)
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: {e}") from e


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-06` / `1e5` as floats (YAML 1.2). PyYAML's YAML 1.1
    resolver wants a dot (`2.0e-06`), but Helm's toYaml and most people write `1e-4`."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 -- a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml-parsed c)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), _yaml_load(raw) if raw.strip() else ""


def config_from_dict(data: dict[str, Any], source: str = "<dict>", cls: type = Config) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    return _build(cls, data, "", source)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a `Config` from YAML (or defaults when `path` is None) plus `--set` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for ov in overrides or []:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    if overrides:
        source += " (with --set overrides)"
    return config_from_dict(data, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
