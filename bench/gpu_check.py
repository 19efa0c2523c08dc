"""One-shot GPU check of the paper-scale setup: step speed/MFU, Ray+DeepSpeed resume, VAE speed.

Written to run once on a fresh GPU machine (no network) within a few minutes and to report
whatever it could measure.

    python -m bench.gpu_check [--quick] [--out DIR]      # make gpu-check

Sections (each in its own process, under its own time limit and a total budget, so that
one crash, OOM or hang is reported and the others still run):

1. step: the model of pipelines/configs/base_256.yaml (random weights, no pretrained UNet,
   gradient checkpointing as configured) at the config's micro-batch, bf16 autocast, fused
   AdamW, no DeepSpeed (`bench.gpu_step`'s setup). Median step seconds over CUDA-event
   timed steps after warm-up, samples/s, peak memory, parameter count. FLOPs: one forward
   counted by torch's FlopCounterMode; MFU takes 3x that per sample (forward + backward:
   model FLOPs, the usual definition), HFU takes the fwd+bwd FLOPs as executed, also
   counted by FlopCounterMode, which include the forward recomputed by activation
   checkpointing (~4x forward). Both are over the dense bf16 peak (--peak-tflops; default:
   the table in bench.gpu_step, else the H200's 989).
2. ray: `pipelines.train.run_training` on 1 GPU worker (Ray Train, DeepSpeed ZeRO-3), config
   from base_256.yaml with overrides, a synthetic latent dataset of the base shapes, local
   storage: N steps with checkpoints, then the same run name to N + 2 steps, which must
   resume at step N. The full 1.42B model writes ~25 GB per checkpoint (ZeRO-3 fp32 master
   + Adam moments + weight and EMA partitions), written locally and copied into the run's
   storage, several times: more disk and time than the check has, so by default this runs a
   narrower UNet (half width; quarter with --quick; smaller still if the disk is short) and
   says so. DeepSpeed's FusedAdam (used on GPU by trip.train.ds_config) is JIT-built first,
   separately timed, so that the run times do not include the compiler.
3. vae: `trip.codec.VAECodec` on a diffusers AutoencoderKL with the SD 2.1 / ModelScope
   configuration (random weights, built from a config dict and saved to a temp dir, as
   VAECodec loads from a directory), bf16, 256x256 frames already on the GPU, frames/s.

Output: progress lines, a table, notes, then exactly one JSON line (also --out DIR/
gpu_check.json); each section's log goes to DIR/logs/ (or a temp dir). Without CUDA: one
line saying so, and the JSON line with null figures; exit code 0 either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "pipelines" / "configs" / "base_256.yaml"
H200_PEAK_TFLOPS = 989.0  # dense bf16, no sparsity

SECTIONS = ("step", "ray", "vae")  # numbered as in the report
RUN_ORDER = ("step", "vae", "ray")  # the long, fragile one last: the budget left goes to it
TITLES = {"step": "1 base-config fwd+bwd step", "ray": "2 Ray Train + DeepSpeed ZeRO-3 save/resume",
          "vae": "3 VAE encode (256x256, bf16)"}
LIMITS = {False: {"step": 150, "vae": 90, "ray": 330},  # seconds per section, normal run
          True: {"step": 120, "vae": 60, "ray": 240}}  # --quick
DEFAULT_BUDGET_S = 420.0  # all sections together: well inside an 8-minute slot
MIN_SECTION_S = 20.0  # a section is not started with less than this left

# The final JSON line: these keys always, null where not measured.
FIGURES = (
    "gpu", "quick", "params", "batch", "gradient_checkpointing", "step_seconds", "samples_per_second",
    "fwd_tflops_per_sample", "step_tflops_executed", "achieved_model_tflops", "peak_tflops", "mfu", "hfu",
    "peak_mem_gib", "ray_unet_width", "ray_params", "ray_fused_adam_build_seconds", "ray_first_seconds",
    "ray_resume_seconds", "ray_first_steps", "ray_final_steps", "resumed_at_step", "ray_resume_ok",
    "ray_first_save_seconds", "ray_resume_save_seconds", "ray_checkpoint_gib", "ray_samples_per_second",
    "vae_codec", "vae_batch", "vae_frames_per_second", "vae_params",
)

# Ray section: UNet width divisors tried, widest first; checkpoint bytes per parameter (fp32
# master + two Adam moments 12, weight partitions 2-4, EMA 4) and how many checkpoint-sized
# copies are on disk at the worst moment (previous checkpoint kept, staging, copy being
# written, the resume's download).
RAY_WIDTHS = {"full": 1, "half": 2, "quarter": 4, "eighth": 8, "sixteenth": 16}
CKPT_BYTES_PER_PARAM = 20
CKPT_COPIES_ON_DISK = 5


# --------------------------------------------------------------------------- pure helpers


def model_flops_per_step(fwd_flops_per_sample: float, batch: int, *, recompute: bool = False) -> float:
    """FLOPs of one training step from the forward FLOPs of one sample: backward ~ 2x forward,
    so 3x (model FLOPs, the MFU convention); with `recompute` (activation checkpointing runs
    the forward again in backward) 4x, the FLOPs the hardware executes (HFU)."""
    return (4.0 if recompute else 3.0) * fwd_flops_per_sample * batch


def utilization(flops_per_step: float, step_seconds: float, peak_tflops: float) -> float:
    """Achieved FLOP/s over the peak: (flops / seconds) / (peak_tflops * 1e12)."""
    if step_seconds <= 0 or peak_tflops <= 0:
        raise ValueError("step_seconds and peak_tflops must be > 0")
    return flops_per_step / step_seconds / (peak_tflops * 1e12)


def narrow_unet(unet: dict[str, Any], divisor: int) -> dict[str, Any]:
    """The base UNet section (as a dict) with every block width divided by `divisor`:
    GroupNorm groups reduced to a common divisor of the new widths, and `attention_head_dim`
    (the per-head width inside diffusers' 3D blocks, which read it as `num_attention_heads`
    and swap it back) divided too, so that every block keeps the base's number of heads."""
    if divisor < 1:
        raise ValueError("divisor must be >= 1")
    if divisor == 1:
        return dict(unet)
    widths = [int(c) // divisor for c in unet["block_out_channels"]]
    if min(widths) < 1 or any(c % divisor for c in unet["block_out_channels"]):
        raise ValueError(f"block_out_channels {unet['block_out_channels']} are not divisible by {divisor}")
    groups = int(unet.get("norm_num_groups", 32))
    for c in widths:
        groups = math.gcd(groups, c)
    head = max(1, int(unet.get("attention_head_dim", 8)) // divisor)
    while head > 1 and any(c % head for c in widths):
        head -= 1
    return {**unet, "block_out_channels": widths, "norm_num_groups": groups, "attention_head_dim": head}


def choose_ray_width(requested: str, quick: bool, free_bytes: int,
                     params_of: Callable[[int], int]) -> tuple[int, str | None]:
    """(divisor, why narrower than asked or None). "auto" starts at half width (quarter with
    --quick); any start is narrowed while its checkpoints would not fit in the free disk."""
    start = {"auto": 4 if quick else 2}.get(requested, RAY_WIDTHS.get(requested))
    if start is None:
        raise ValueError(f"unknown width {requested!r}: auto or one of {', '.join(RAY_WIDTHS)}")
    why = None
    for divisor in sorted(d for d in RAY_WIDTHS.values() if d >= start):
        need = CKPT_COPIES_ON_DISK * CKPT_BYTES_PER_PARAM * params_of(divisor)
        if need <= free_bytes:
            return divisor, why
        why = (f"width 1/{divisor} needs ~{need / 2**30:.0f} GiB of disk for its checkpoints, "
               f"{free_bytes / 2**30:.0f} GiB free")
    return max(RAY_WIDTHS.values()), why


def clean_json(obj: Any) -> Any:
    """NaN/inf -> None (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def empty_result(quick: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "gpu_check"}
    out.update(dict.fromkeys(FIGURES))
    out.update({"quick": quick, "errors": {}, "skipped": [], "notes": [], "section_seconds": {},
                "total_seconds": None})
    return out


def _fmt(v: Any, unit: str = "", digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}"
    if isinstance(v, list):
        return ", ".join(_fmt(x, unit, digits) for x in v) or "-"
    return f"{v}{unit}"


def report_lines(res: dict[str, Any]) -> list[str]:
    """The readable table (section, figure, value) and the notes and errors below it."""
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    rows = {
        "step": [
            ("parameters", _fmt(res["params"])), ("micro-batch (clips)", _fmt(res["batch"])),
            ("gradient checkpointing", _fmt(res["gradient_checkpointing"])),
            ("step seconds (median)", _fmt(res["step_seconds"], " s")),
            ("samples/s", _fmt(res["samples_per_second"])),
            ("forward TFLOP per sample", _fmt(res["fwd_tflops_per_sample"])),
            ("MFU (3x fwd, model FLOPs)", _fmt(pct(res["mfu"]), " %", 3)),
            ("HFU (as executed, with recompute)", _fmt(pct(res["hfu"]), " %", 3)),
            ("peak TFLOP/s used", _fmt(res["peak_tflops"])),
            ("peak GPU memory", _fmt(res["peak_mem_gib"], " GiB")),
        ],
        "ray": [
            ("UNet width / parameters", f"{_fmt(res['ray_unet_width'])} / {_fmt(res['ray_params'])}"),
            ("FusedAdam JIT build", _fmt(res["ray_fused_adam_build_seconds"], " s")),
            ("first run (seconds, steps)", f"{_fmt(res['ray_first_seconds'], ' s')}, {_fmt(res['ray_first_steps'])}"),
            ("resumed run (seconds, steps)",
             f"{_fmt(res['ray_resume_seconds'], ' s')}, {_fmt(res['ray_final_steps'])}"),
            ("resumed at step (ok?)", f"{_fmt(res['resumed_at_step'])} ({_fmt(res['ray_resume_ok'])})"),
            ("checkpoint save s (first run)", _fmt(res["ray_first_save_seconds"], "", 3)),
            ("checkpoint save s (resumed run)", _fmt(res["ray_resume_save_seconds"], "", 3)),
            ("checkpoint size", _fmt(res["ray_checkpoint_gib"], " GiB", 3)),
            ("run's samples/s (resumed run)", _fmt(res["ray_samples_per_second"])),
        ],
        "vae": [
            ("codec / batch", f"{_fmt(res['vae_codec'])} / {_fmt(res['vae_batch'])}"),
            ("frames/s", _fmt(res["vae_frames_per_second"])),
        ],
    }
    lines = [f"gpu_check on {res['gpu'] or 'no GPU'}{' (--quick)' if res['quick'] else ''}"]
    head = f"{'section':<52} {'figure':<34} {'value'}"
    lines += [head, "-" * (len(head) + 24)]
    for name in SECTIONS:
        status = res["errors"].get(name)
        secs = res["section_seconds"].get(name)
        title = TITLES[name] + (f" [{secs:.0f} s]" if secs is not None else "")
        for i, (k, v) in enumerate(rows[name]):
            lines.append(f"{title if i == 0 else '':<52} {k:<34} {v}")
        if status:
            lines.append(f"{'':<52} {'ERROR':<34} {status.splitlines()[0][:200]}")
    lines.append(f"total wall time: {_fmt(res['total_seconds'], ' s')}")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return lines


# --------------------------------------------------------------------------- section plumbing


class Figures(dict):
    """A section's figures, rewritten to its result file at every update, so that a section
    killed at its time limit still reports what it had measured."""

    def __init__(self, path: str) -> None:
        super().__init__(figures={}, notes=[], error=None)
        self.path = path

    def set(self, **kw: Any) -> None:
        self["figures"].update(kw)
        self.flush()

    def note(self, text: str) -> None:
        print(f"[gpu_check] note: {text}", flush=True)
        self["notes"].append(text)
        self.flush()

    def flush(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(clean_json(dict(self)), fh)
        os.replace(tmp, self.path)


def _say(text: str) -> None:
    print(f"[gpu_check] {text}", flush=True)


def cuda_event_seconds(fn: Callable[[], object], iters: int) -> list[float]:
    """Seconds of each of `iters` calls of `fn`, from CUDA events around it."""
    import torch

    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000.0)
    return out


def forward_flops(objective: Any, inputs: tuple, dtype: Any = None) -> float:
    """FLOPs of one forward of `objective(*inputs)` (matmuls, convolutions, attention) counted
    by torch's FlopCounterMode, under autocast to `dtype` when given; no graph is kept."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = inputs[0].device.type
    counter = FlopCounterMode(display=False)
    cast = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), counter, cast:
        objective(*inputs)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- 1: step


def section_step(args: argparse.Namespace, figs: Figures) -> None:
    import torch

    from bench import gpu_step
    from trip.config import load_config

    cfg = load_config(BASE)
    batch = args.batch or cfg.data.micro_batch_size
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or gpu_step.peak_tflops(name) or H200_PEAK_TFLOPS
    figs.set(gpu=name, batch=batch, gradient_checkpointing=cfg.model.gradient_checkpointing, peak_tflops=peak)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    objective, opt, inputs = gpu_step._setup(batch)  # random weights, pretrained_unet=None
    params = sum(p.numel() for p in objective.parameters())
    figs.set(params=params)
    _say(f"model built in {time.perf_counter() - t0:.1f} s: {params / 1e9:.3f} B parameters, batch {batch}, "
         f"latents {tuple(inputs[0].shape)}, text {tuple(inputs[2].shape)}")
    t0 = time.perf_counter()
    fwd = executed = None
    try:  # the FLOP counts only feed MFU/HFU: without them the step is still timed
        fwd = forward_flops(objective, inputs, torch.bfloat16) / batch
        figs.set(fwd_tflops_per_sample=fwd / 1e12)
        executed = gpu_step._flops(objective, inputs)  # fwd + bwd (+ recomputed fwd) as run, whole batch
        figs.set(step_tflops_executed=executed / 1e12)
        _say(f"FLOPs counted in {time.perf_counter() - t0:.1f} s: forward {fwd / 1e12:.3f} TFLOP per sample; "
             f"one step as executed {executed / 1e12:.2f} TFLOP = {executed / (fwd * batch):.2f} x forward")
    except Exception as e:
        traceback.print_exc()
        figs.note(f"FLOP counting failed ({type(e).__name__}: {e}); "
                  + ("HFU estimated from the forward count" if fwd else "no MFU/HFU"))
        objective.zero_grad(set_to_none=True)
        if fwd and cfg.model.gradient_checkpointing:
            executed = model_flops_per_step(fwd, batch, recompute=True)
        elif fwd:
            executed = model_flops_per_step(fwd, batch)
    step = gpu_step._step_fn(objective, opt, inputs, torch.bfloat16)
    t0 = time.perf_counter()
    for _ in range(args.step_warmup):
        step()
    _say(f"{args.step_warmup} warm-up steps in {time.perf_counter() - t0:.1f} s")
    torch.cuda.reset_peak_memory_stats()
    times = cuda_event_seconds(step, args.step_iters)
    median = statistics.median(times)
    figs.set(step_seconds=median, samples_per_second=batch / median,
             peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
    _say(f"steps (s): {', '.join(f'{t:.3f}' for t in times)}")
    if not fwd or not executed:
        return
    model = model_flops_per_step(fwd, batch)
    figs.set(achieved_model_tflops=model / median / 1e12, mfu=utilization(model, median, peak),
             hfu=utilization(executed, median, peak))
    figs.note(f"MFU counts 3x forward FLOPs per sample (model FLOPs); HFU counts the FLOPs executed "
              f"({executed / (fwd * batch):.2f}x forward: activation checkpointing "
              f"{'recomputes the forward in backward' if cfg.model.gradient_checkpointing else 'is off'}), "
              f"both over {peak:g} TFLOP/s dense bf16")


# --------------------------------------------------------------------------- 2: ray


def ray_overrides(data: str, storage_path: str, steps: int, global_batch: int,
                  unet: dict[str, Any] | None = None, *, use_gpu: bool = True, cpus_per_worker: int = 8,
                  name: str = "gpu-check", checkpoint_every: int = 2,
                  extra: dict[str, Any] | None = None) -> list[str]:
    """`--set` overrides that turn base_256.yaml into a 1-worker run of `steps` steps of
    `global_batch` samples on the synthetic dataset `data`, checkpointing into
    `storage_path`, no retries, no exporter, no validation (optionally with another `unet`
    section)."""
    sets: dict[str, Any] = {
        "model.pretrained_unet": "null",
        "data.dataset": data, "data.num_workers": 2, "data.shuffle_buffer": 32,
        "train.max_steps": steps, "train.global_batch_size": global_batch,
        "train.checkpoint_every": checkpoint_every, "train.log_every": 1, "train.keep_checkpoints": 2,
        "train.validate_every": 0, "data.validation": "null",  # the check times training, not validation
        "scaling.num_workers": 1, "scaling.min_workers": "null", "scaling.max_workers": "null",
        "scaling.use_gpu": "true" if use_gpu else "false", "scaling.gpus_per_worker": 1,
        "scaling.cpus_per_worker": cpus_per_worker,
        "run.name": name, "run.storage_path": storage_path, "run.max_failures": 0, "run.output_dir": "null",
        "metrics.port": 0, **(extra or {}),
    }
    out = [f"{k}={v}" for k, v in sets.items()]
    for k, v in (unet or {}).items():
        out.append(f"model.unet.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}")
    return out


def ray_config(data: str, storage_path: str, steps: int, divisor: int = 1, **kw: Any) -> Any:
    """The run config of the Ray section: base_256.yaml + `ray_overrides`, one micro-batch of
    the config's size per step (1 worker), the UNet `divisor` times narrower."""
    from trip.config import load_config, to_dict

    base = load_config(BASE)
    unet = narrow_unet(to_dict(base.model.unet), divisor) if divisor > 1 else None
    return load_config(BASE, ray_overrides(data, storage_path, steps, base.data.micro_batch_size, unet, **kw))


def write_ray_dataset(prefix: str, cfg: Any, samples: int = 32, shards: int = 2) -> dict[str, Any]:
    """Synthetic latent shards of the model's shapes ([F, C, h, w] latents, [77, D] text)."""
    from data_tools.synth import write_synthetic_dataset

    m = cfg.model
    per = -(-samples // shards)
    return write_synthetic_dataset(prefix, [per] * shards,
                                   latent_shape=(m.num_frames, m.latent_channels, *m.latent_hw),
                                   text_shape=(77, m.unet.cross_attention_dim))


def _params_on_meta(cfg: Any) -> int:
    import torch

    from trip.model import TRIPModel

    with torch.device("meta"):
        model = TRIPModel(cfg.model, cfg.diffusion)
    return sum(p.numel() for p in model.parameters())


def _build_fused_adam(timeout: float) -> tuple[float, str | None]:
    """JIT-build DeepSpeed's FusedAdam in a child process (the workers then load it from
    TORCH_EXTENSIONS_DIR); (seconds, error or None)."""
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "get_accelerator().create_op_builder('FusedAdamBuilder').load()\n")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, f"FusedAdam JIT build did not finish in {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    sys.stdout.write(p.stdout[-4000:] + p.stderr[-4000:])
    if p.returncode != 0:
        tail = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()][-3:]
        return seconds, ("FusedAdam (DeepSpeed's GPU AdamW, chosen by trip.train.ds_config) could not be "
                         f"JIT-built: {' | '.join(tail)[:400]}")
    return seconds, None


def _start_step(record_dir: str) -> int | None:
    """The step the rank-0 worker started from, from RecordSteps' worker-rank0.json."""
    try:
        with open(os.path.join(record_dir, "worker-rank0.json")) as fh:
            return int(json.load(fh)["start_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_seconds(result: Any) -> list[float] | None:
    v = (getattr(result, "metrics", None) or {}).get("checkpoint_save_seconds")
    if isinstance(v, (int, float)):
        return [float(v)]
    if isinstance(v, list):
        return [float(x) for x in v if isinstance(x, (int, float))]
    return None


def _checkpoint_gib(cfg: Any) -> float | None:
    try:
        from trip.train.checkpoint import RunDir

        found = RunDir(cfg.run.storage_path, cfg.run.name).latest()
        files = found.record.get("files") if found is not None else None
        return sum(int(v) for v in files.values()) / 2**30 if isinstance(files, dict) else None
    except Exception:  # another layout: the size is a nice-to-have
        return None


def section_ray(args: argparse.Namespace, figs: Figures) -> None:
    import torch

    use_gpu = not args.ray_cpu
    if use_gpu:
        if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":  # the Makefile exports cpu for CPU runs
            figs.note(f"DS_ACCELERATOR was {os.environ['DS_ACCELERATOR']!r}; set to 'cuda' for this section")
        os.environ["DS_ACCELERATOR"] = "cuda"
        figs.set(gpu=torch.cuda.get_device_name())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    work = tempfile.mkdtemp(prefix="gpu-check-ray-", dir=args.workdir)
    try:
        _ray_runs(args, figs, work, use_gpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ray_runs(args: argparse.Namespace, figs: Figures, work: str, use_gpu: bool) -> None:
    import ray

    from pipelines.train import run_training
    from trip.train.callbacks import RecordSteps

    first_steps = 2 if args.quick else 4
    final_steps = first_steps + (1 if args.quick else 2)
    ncpu = os.cpu_count() or 2
    cpus = max(1, min(8, ncpu - 2))
    data, runs = os.path.join(work, "data"), os.path.join(work, "runs")
    kw: dict[str, Any] = {"use_gpu": use_gpu, "cpus_per_worker": cpus}
    if not use_gpu:  # the CPU smoke test of this code: fp32 (CPUs emulate bf16 matmuls), a small TNF
        kw["extra"] = {"train.precision": "fp32", "model.fusion.dim": 64, "model.fusion.heads": 4,
                       "model.fusion.depth": 1, "model.fusion.patch_size": 4}

    cache: dict[int, int] = {}

    def params_of(divisor: int) -> int:
        if divisor not in cache:
            cache[divisor] = _params_on_meta(ray_config(data, runs, first_steps, divisor, **kw))
        return cache[divisor]

    requested = "sixteenth" if args.ray_cpu else args.ray_width
    divisor, why = choose_ray_width(requested, args.quick, shutil.disk_usage(work).free, params_of)
    width = "full" if divisor == 1 else f"1/{divisor}"
    figs.set(ray_unet_width=width, ray_params=params_of(divisor))
    if divisor != 1:
        figs.note(f"Ray section ran a UNet of {width} the base width ({params_of(divisor) / 1e6:.0f} M "
                  f"parameters, not the base's {params_of(1) / 1e9:.2f} B): "
                  + (why or f"--ray-width {requested}; full-size checkpoints are "
                            f"~{CKPT_BYTES_PER_PARAM * params_of(1) / 2**30:.0f} GiB each, several on disk at "
                            f"once and too slow to write and reread within the check's budget"))
    cfg1 = ray_config(data, runs, first_steps, divisor, **kw)
    cfg2 = ray_config(data, runs, final_steps, divisor, **kw)
    write_ray_dataset(data, cfg1)
    _say(f"dataset written; run {cfg1.run.name}: {first_steps} then {final_steps} steps, checkpoint every "
         f"{cfg1.train.checkpoint_every}, UNet {list(cfg1.model.unet.block_out_channels)}")

    if use_gpu:
        left = args.deadline - time.time()
        seconds, err = _build_fused_adam(max(10.0, min(180.0, left - 60)))
        figs.set(ray_fused_adam_build_seconds=seconds)
        if err:
            raise RuntimeError(err)
        _say(f"FusedAdam ready in {seconds:.1f} s")

    t0 = time.perf_counter()
    ray.init(num_cpus=max(ncpu, cpus + 1), num_gpus=1 if use_gpu else 0, include_dashboard=False,
             object_store_memory=2 * 2**30)
    _say(f"ray.init in {time.perf_counter() - t0:.1f} s")
    try:
        debug1 = os.path.join(work, "debug-first")
        t0 = time.perf_counter()
        first = run_training(cfg1, [RecordSteps(debug1)])
        figs.set(ray_first_seconds=time.perf_counter() - t0, ray_first_steps=first.steps,
                 ray_first_save_seconds=_save_seconds(first), ray_checkpoint_gib=_checkpoint_gib(cfg1))
        _say(f"first run: {first.steps} steps in {figs['figures']['ray_first_seconds']:.1f} s "
             f"(started at step {_start_step(debug1)}), checkpoint {first.checkpoint}")

        debug2 = os.path.join(work, "debug-resume")
        t0 = time.perf_counter()
        second = run_training(cfg2, [RecordSteps(debug2)])
        resumed_at = _start_step(debug2)
        figs.set(ray_resume_seconds=time.perf_counter() - t0, ray_final_steps=second.steps,
                 resumed_at_step=resumed_at, ray_resume_save_seconds=_save_seconds(second),
                 ray_samples_per_second=second.samples_per_second or None,
                 ray_resume_ok=(resumed_at == first.steps and second.steps == final_steps
                                if resumed_at is not None else None))
        if resumed_at is None:
            figs.note("resumed_at_step unknown: the worker wrote no worker-rank0.json (RecordSteps)")
        _say(f"resumed run: at step {resumed_at}, {second.steps} steps in "
             f"{figs['figures']['ray_resume_seconds']:.1f} s")
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- 3: vae

# diffusers AutoencoderKL configuration of SD 2.1 (the VAE ModelScope-T2V ships, too)
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "sample_size": 768, "scaling_factor": 0.18215,
}


def section_vae(args: argparse.Namespace, figs: Figures) -> None:
    import torch
    from diffusers import AutoencoderKL

    figs.set(gpu=torch.cuda.get_device_name(), vae_batch=args.vae_batch)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    figs.set(vae_params=sum(p.numel() for p in vae.parameters()))
    frames = torch.rand(args.vae_batch, 3, 256, 256, device="cuda")
    with tempfile.TemporaryDirectory(prefix="gpu-check-vae-", dir=args.workdir) as tmp:
        try:
            from trip.codec import VAECodec

            vae.save_pretrained(tmp)
            codec = VAECodec(tmp, device="cuda", dtype="bfloat16")
            encode, kind = codec.encode, "trip.codec.VAECodec"
        except Exception as e:  # the codec's loading changed: still measure the VAE itself
            figs.note(f"trip.codec.VAECodec could not be built ({type(e).__name__}: {e}); timed "
                      f"AutoencoderKL.encode directly")
            model = vae.to("cuda", torch.bfloat16).eval()

            @torch.no_grad()
            def encode(x: torch.Tensor) -> torch.Tensor:
                return model.encode(x.to(torch.bfloat16) * 2 - 1).latent_dist.mean

            kind = "diffusers AutoencoderKL"
    figs.set(vae_codec=kind)
    out = encode(frames)
    _say(f"{kind}: {tuple(frames.shape)} -> {tuple(out.shape)}")
    for _ in range(max(0, args.vae_warmup - 1)):
        encode(frames)
    times = cuda_event_seconds(lambda: encode(frames), args.vae_iters)
    figs.set(vae_frames_per_second=args.vae_batch / statistics.median(times))
    _say(f"batches (s): {', '.join(f'{t:.3f}' for t in times)}")


SECTION_FNS: dict[str, Callable[[argparse.Namespace, Figures], None]] = {
    "step": section_step, "ray": section_ray, "vae": section_vae}


def run_section_here(args: argparse.Namespace) -> int:
    """Child process: run one section, leave its figures in args.result."""
    figs = Figures(args.result)
    figs.flush()
    try:
        SECTION_FNS[args.section](args, figs)
    except BaseException as e:  # report everything, including KeyboardInterrupt/SystemExit from libraries
        traceback.print_exc()
        figs["error"] = f"{type(e).__name__}: {e}"[:2000]
        figs.flush()
        return 1
    return 0


# --------------------------------------------------------------------------- orchestration


def _session_pids(sid: int) -> list[int] | None:
    """Live (not zombie) processes of session `sid`, from /proc; None where there is no /proc.
    Ray puts its workers in process groups of their own, but they stay in the session."""
    if not os.path.isdir("/proc"):
        return None
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _kill_session(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a section and everything it started (it leads its own session): SIGTERM, then
    SIGKILL after `grace` seconds; reaps the section's process."""
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = _session_pids(proc.pid)
        if pids is None:  # no /proc: the process group is the best we have
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        else:
            for pid in pids:
                if pid != me:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
            left = _session_pids(proc.pid)
            if proc.poll() is not None and not left:
                return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


class Interrupted(Exception):
    """SIGTERM/SIGINT to the orchestrator: stop the running section, report what there is."""


def _interrupt(signum: int, frame: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # once: the report must get out
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def run_section(name: str, args: argparse.Namespace, limit: float, logs: str) -> dict[str, Any]:
    """Run one section in a child process (new session) under `limit` seconds."""
    result = os.path.join(logs, f"{name}.result.json")
    log = os.path.join(logs, f"{name}.log")
    cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--result", result,
           "--deadline", str(time.time() + limit), *args.passthrough]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out, interrupted = False, None
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        except Interrupted as e:
            interrupted = str(e)
        finally:  # also when the section is done: whatever it left running in its session goes
            _kill_session(proc, grace=10.0 if proc.poll() is None else 3.0)
    try:
        with open(result) as fh:
            out = json.load(fh)
    except (OSError, ValueError):
        out = {"figures": {}, "notes": [], "error": None}
    if interrupted:
        out["error"] = f"interrupted by {interrupted} (figures measured before that are kept)"
        out["interrupted"] = True
    elif timed_out:
        out["error"] = f"timed out after {limit:.0f} s (figures measured before that are kept)"
    elif proc.returncode != 0 and not out.get("error"):
        out["error"] = f"exited with code {proc.returncode}"
    if out.get("error"):
        out["error"] += f"; log: {log}"
        print(f"[gpu_check] {name}: last lines of {log}:\n{_tail(log)}", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and iterations everywhere (first try)")
    ap.add_argument("--out", help="directory for gpu_check.json and the sections' logs")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"dense bf16 peak for MFU (default: by GPU name, else H200 {H200_PEAK_TFLOPS:g})")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all sections together")
    ap.add_argument("--batch", type=int, default=None, help="step: micro-batch (default: the config's)")
    ap.add_argument("--step-warmup", type=int, default=None)
    ap.add_argument("--step-iters", type=int, default=None)
    ap.add_argument("--ray-width", default="auto", choices=["auto", *RAY_WIDTHS],
                    help="ray: UNet width (auto: half, quarter with --quick; narrower if the disk is short)")
    ap.add_argument("--vae-batch", type=int, default=None)
    ap.add_argument("--vae-warmup", type=int, default=None)
    ap.add_argument("--vae-iters", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="parent of the temp dirs (default: the system temp dir)")
    # internal: one section in a child process; --ray-cpu runs section 2 on CPU workers (a smoke test)
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ray-cpu", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    for key, normal, quick in (("step_warmup", 3, 2), ("step_iters", 15, 5), ("vae_batch", 64, 32),
                               ("vae_warmup", 2, 1), ("vae_iters", 8, 3)):
        if getattr(a, key) is None:
            setattr(a, key, quick if q else normal)
    a.deadline = a.deadline or time.time() + a.budget
    # what each child gets again (everything but the orchestration flags)
    a.passthrough = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in (
        "batch", "step_warmup", "step_iters", "ray_width", "vae_batch", "vae_warmup", "vae_iters",
        "peak_tflops", "workdir") if getattr(a, k) is not None]
    a.passthrough += ["--quick"] * q + ["--ray-cpu"] * a.ray_cpu
    return a


def _cuda() -> tuple[bool, str | None, str]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 -- report, never crash
        return False, None, f"torch not importable ({type(e).__name__})"
    if not torch.cuda.is_available():
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        return False, None, why
    try:
        return True, torch.cuda.get_device_name(0), ""
    except Exception as e:  # noqa: BLE001
        return False, None, f"CUDA device not usable ({type(e).__name__}: {e})"


def emit(res: dict[str, Any], out_dir: str | None) -> None:
    line = json.dumps(clean_json(res), sort_keys=False)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_check.json"), "w") as fh:
            fh.write(line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:
        return run_section_here(args)
    t_start = time.perf_counter()
    res = empty_result(args.quick)
    wanted = [s for s in SECTIONS if s in {x.strip() for x in args.sections.split(",")}]
    ok, gpu, why = _cuda()
    if not ok and not args.ray_cpu:
        res["skipped"] = list(wanted)
        res["total_seconds"] = time.perf_counter() - t_start
        print(f"gpu_check: no GPU available ({why}); skipped sections: "
              f"{', '.join(TITLES[s] for s in wanted) or 'none'}", flush=True)
        emit(res, args.out)
        return 0
    if not ok:  # --ray-cpu smoke test on a CPU machine: section 2 only
        wanted = ["ray"]
    res["gpu"] = gpu
    logs = os.path.join(args.out, "logs") if args.out else tempfile.mkdtemp(prefix="gpu-check-logs-")
    os.makedirs(logs, exist_ok=True)
    # the sections' scratch (datasets, checkpoints): removed at the end even if a section was killed
    scratch = tempfile.mkdtemp(prefix="gpu-check-", dir=args.workdir)
    args.passthrough = [a for a in args.passthrough if not a.startswith("--workdir=")] + [f"--workdir={scratch}"]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    print(f"gpu_check on {gpu or 'CPU (ray smoke test)'}: sections {', '.join(wanted)}, budget "
          f"{args.budget:.0f} s, logs in {logs}", flush=True)
    try:
        for name in [s for s in RUN_ORDER if s in wanted]:
            left = args.deadline - time.time()
            limit = left - 5 if args.ray_cpu else min(LIMITS[args.quick][name], left - 5)
            if limit < MIN_SECTION_S:
                res["errors"][name] = f"not run: {max(left, 0):.0f} s of the {args.budget:.0f} s budget left"
                res["skipped"].append(name)
                continue
            print(f"[gpu_check] {TITLES[name]}: running (limit {limit:.0f} s)", flush=True)
            t0 = time.perf_counter()
            out = run_section(name, args, limit, logs)
            res["section_seconds"][name] = time.perf_counter() - t0
            for k, v in out.get("figures", {}).items():
                if k == "gpu":
                    res["gpu"] = res["gpu"] or v
                elif k in res:
                    res[k] = v
            res["notes"] += out.get("notes", [])
            if out.get("error"):
                res["errors"][name] = out["error"]
            print(f"[gpu_check] {TITLES[name]}: {'FAILED' if out.get('error') else 'ok'} in "
                  f"{res['section_seconds'][name]:.1f} s", flush=True)
            if out.get("interrupted"):
                break
    except Interrupted as e:  # between sections
        res["notes"].append(f"interrupted by {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["skipped"] += [s for s in RUN_ORDER if s in wanted and s not in res["section_seconds"]
                       and s not in res["skipped"]]
    res["skipped"] += [s for s in SECTIONS if s not in wanted]
    res["total_seconds"] = time.perf_counter() - t_start
    print()
    print("\n".join(report_lines(res)), flush=True)
    emit(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
