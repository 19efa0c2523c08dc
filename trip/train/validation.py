"""Validation during training: a held-out loss and sample videos, off the training path.

Every `train.validate_every` steps (a multiple of `train.checkpoint_every`) the run is
validated from its *committed checkpoint* of that step, by one `Validator` Ray actor on its
own resources (`scaling.validation_cpus` / `validation_gpus`), never by the training ranks:

- the EMA weights are consolidated from the checkpoint's partition files (`trip export`'s
  path), so the result depends on the weights only: not on the world size, the attempt or
  the rank layout that wrote them;
- the **validation loss** is the objective's MSE over the first `train.validation_samples`
  samples of `data.validation` (in index order), with fixed timesteps (evenly spaced over
  the schedule, one per sample) and fixed noise (one seeded generator), text kept: the same
  weights always give the same number, so runs, resumes and world sizes compare directly;
- **sample videos** from the first `train.validation_videos` held-out samples' first frames
  (+ their text states), with the run's `sample` settings, scored against those samples'
  own clips (PSNR, SSIM, and the motion score when the clip shows one moving object:
  `trip.eval.quality`), written as GIF + MP4 and one contact sheet PNG (each clip's
  generated frames above its reference frames) to `<run>/validation/step-N/`, and
  `result.json` there last: a validation exists once its `result.json` does.

`ValidationWatcher` runs in the driver: it lists the run's committed checkpoints every few
seconds and validates each validation step without a `result.json`, oldest first, one at a
time. It works from storage alone, so a restart of the workers or of the driver neither
loses nor repeats a validation, and checkpoint retention keeps a validation step's
checkpoint until its result exists (`RunDir.retain`). Training waits for none of it.

The actor serves `trip_val_loss`, `trip_val_loss_rises`, `trip_val_psnr`, `trip_val_ssim`,
`trip_val_displacement_ratio` and `trip_val_step` on `metrics.port - 1` (labels {run,
rank="validation", node}), next to the workers' exporters; the alert rules warn when the
loss rose at three validations in a row.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trip import storage
from trip.log import get_logger

log = get_logger(__name__)

RESULT = "result.json"
VALIDATION_SEED = 20240317  # fixed: validation draws never depend on the run's own seed


@dataclass
class ValidationSet:
    """The held-out samples, in index order: latents [N, C, F, h, w], the conditioning
    image latents [N, C, h, w], text states [N, L, D] or None, and their keys."""

    latents: torch.Tensor
    image_latents: torch.Tensor
    text: torch.Tensor | None
    keys: list[str]
    index: dict[str, Any]

    @classmethod
    def load(cls, prefix: str, count: int, image_frame: int = 0, text: bool = True) -> ValidationSet:
        """The first `count` samples of the shard set at `prefix` (fewer if it has fewer)."""
        from trip.data.shards import read_index
        from trip.eval.shardset import first_samples

        lat, txt, keys = [], [], []
        try:
            index = read_index(prefix)
            for sample in first_samples(prefix, index, count):
                lat.append(torch.from_numpy(sample.latents.astype(np.float32)))
                if text and sample.text is not None:
                    txt.append(torch.from_numpy(sample.text.astype(np.float32)))
                keys.append(sample.key)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.validation: {e}") from e
        except ValueError as e:
            raise ValueError(f"data.validation: {e}") from e
        if not keys:
            raise ValueError(f"data.validation {prefix} has no samples")
        latents = torch.stack(lat).permute(0, 2, 1, 3, 4).contiguous()  # [N, F, C, h, w] -> [N, C, F, h, w]
        return cls(latents, latents[:, :, image_frame].clone(),
                   torch.stack(txt) if len(txt) == len(keys) else None, keys, index)


def fixed_draws(count: int, shape: tuple[int, ...], num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps evenly spaced over the schedule (sample i gets (i + 1/2) T / count) and
    noise from one generator with a fixed seed: the validation loss's only randomness."""
    t = ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()
    noise = torch.randn((count, *shape), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return t.clamp(max=num_train_timesteps - 1), noise


@torch.no_grad()
def validation_loss(model: Any, val: ValidationSet, batch_size: int = 8) -> float:
    """Mean per-sample noise MSE of `model` over the validation set (fixed draws, text kept)."""
    from trip.diffusion import TRIPObjective

    objective = TRIPObjective(model).eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = val.latents.shape[0]
    t, noise = fixed_draws(n, tuple(val.latents.shape[1:]), model.diffusion_cfg.num_train_timesteps)
    total = 0.0
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        b = sl.stop - sl.start
        text = val.text[sl].to(device, dtype) if val.text is not None else None
        total += float(objective(val.latents[sl].to(device, dtype), val.image_latents[sl].to(device, dtype), text,
                                 timesteps=t[sl].to(device), noise=noise[sl].to(device),
                                 keep_text=torch.ones(b, dtype=torch.bool, device=device),
                                 weights=torch.ones(b, device=device)))
    return total / n


def contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], scale: int = 4) -> bytes:
    """PNG bytes: per clip, its generated frames in a row above its reference frames."""
    from PIL import Image

    rows = [np.concatenate(list(clip), axis=1) for gen, ref in pairs for clip in (gen, ref)]
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def validate_checkpoint(checkpoint_url: str, val: ValidationSet, cfg: Any, out_url: str,
                        device: str = "cpu", previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate one committed checkpoint into `out_url` (see the module docstring); returns
    the figures, also written to `out_url/result.json` after every other file.
    `previous` is the last validation's result: `loss_rises` counts how many validations in
    a row the loss went up (0 when it fell), which the alert rules watch."""
    from trip.eval.quality import clip_quality, summarize
    from trip.sampling import load_pipeline
    from trip.train.export import export_checkpoint
    from trip.video import to_uint8, write_gif, write_mp4

    t0, started = time.perf_counter(), time.time()
    with tempfile.TemporaryDirectory(prefix="trip-val-") as tmp:
        model_dir = os.path.join(tmp, "model")
        # what a user of this checkpoint gets: `trip export`'s model (a LoRA run's adapters merged)
        export_checkpoint(checkpoint_url, model_dir, use_ema=cfg.train.ema_decay > 0,
                          merge_lora=cfg.train.lora.enabled)
        pipe, _ = load_pipeline(model_dir, device=device)
        pipe.set_progress_bar_config(disable=True)
        model, codec = pipe.trip_model(), pipe.codec()
        loss = validation_loss(model, val)
        rises = (int(previous.get("loss_rises", 0)) + 1 if loss > previous["loss"] else 0) if previous else 0
        figures: dict[str, Any] = {"loss": loss, "loss_rises": rises, "samples": len(val.keys)}
        m = min(cfg.train.validation_videos, len(val.keys))
        if m:
            with torch.no_grad():
                reference = torch.stack([codec.decode(val.latents[i].permute(1, 0, 2, 3)) for i in range(m)])
            images = reference[:, cfg.data.image_frame]
            text = val.text[:m] if val.text is not None else None
            s = cfg.sample
            videos = pipe(image=images.to(device), prompt_embeds=text, num_inference_steps=s.steps,
                          guidance_scale=s.guidance_scale, eta=s.eta, generator=torch.Generator().manual_seed(s.seed),
                          output_type="pt").frames.cpu()
            per_clip, pairs = {}, []
            for i in range(m):
                gen, ref = to_uint8(videos[i]), to_uint8(reference[i])
                per_clip[val.keys[i]] = clip_quality(gen, ref)
                pairs.append((gen, ref))
                for ext, write in (("gif", lambda v, p: write_gif(v, p, fps=cfg.sample.fps, scale=4)),
                                   ("mp4", lambda v, p: write_mp4(v, p, fps=cfg.sample.fps))):
                    local = write(videos[i], os.path.join(tmp, f"{i:03d}.{ext}"))
                    with open(local, "rb") as f:
                        storage.write_bytes_atomic(storage.join(out_url, f"{i:03d}_{val.keys[i]}.{ext}"), f.read())
            storage.write_bytes_atomic(storage.join(out_url, "contact_sheet.png"), contact_sheet(pairs))
            figures.update(summarize(per_clip))
            figures["per_clip"] = per_clip
    figures["seconds"] = round(time.perf_counter() - t0, 3)
    figures["started"], figures["finished"] = started, time.time()  # to compare with the step times
    storage.write_bytes_atomic(storage.join(out_url, RESULT), (json.dumps(figures, indent=2) + "\n").encode())
    return figures


VALIDATION_METRICS = {
    "loss": "Validation loss (fixed samples, noise and timesteps)",
    "loss_rises": "Validations in a row whose loss rose (0 after one that fell)",
    "psnr": "Mean PSNR of validation samples vs their reference clips, dB",
    "ssim": "Mean SSIM of validation samples vs their reference clips",
    "displacement_ratio": "Mean motion displacement ratio of validation samples (NaN: no moving object)",
    "step": "Step of the last validation",
}


class ValidationMetrics:
    """`trip_val_*` gauges on their own registry and port (labels {run, rank, node})."""

    def __init__(self, run: str, port: int, addr: str = "0.0.0.0") -> None:
        import socket

        from prometheus_client import CollectorRegistry, Gauge

        from trip.metrics import LABELS, safe_label, serve_metrics

        r = CollectorRegistry()
        labels = {"run": safe_label(run, "run.name"), "rank": "validation",
                  "node": safe_label(socket.gethostname(), "hostname")}
        # NaN until a validation has the figure (e.g. no moving object: no displacement ratio)
        self.gauges = {name: Gauge(f"trip_val_{name}", doc, list(LABELS), registry=r).labels(**labels)
                       for name, doc in VALIDATION_METRICS.items()}
        for gauge in self.gauges.values():
            gauge.set(math.nan)
        self._server, _ = serve_metrics(port, addr, r, setting="metrics.port (validation serves metrics.port - 1)")
        self.url = f"http://{'127.0.0.1' if addr in ('', '0.0.0.0') else addr}:{port}/metrics"

    def record(self, step: int, figures: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            value = step if name == "step" else figures.get(name)
            gauge.set(float(value) if isinstance(value, (int, float)) else math.nan)

    def close(self) -> None:
        self._server.shutdown()


class Validator:
    """The validation worker (a Ray actor in a run, a plain object in a test): holds the
    validation set and serves the validation metrics."""

    def __init__(self, config: dict[str, Any]) -> None:
        from trip.config import config_from_dict
        from trip.log import quiet_dependencies

        quiet_dependencies()
        self.cfg = config_from_dict(config, "run config")
        use_gpu = self.cfg.scaling.validation_gpus > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(max(1, int(self.cfg.scaling.validation_cpus)))
        d = self.cfg.data
        self.val = ValidationSet.load(d.validation, self.cfg.train.validation_samples, d.image_frame, d.text)
        port = self.cfg.metrics.port
        self.metrics = ValidationMetrics(self.cfg.run.name, port - 1, self.cfg.metrics.addr) if port > 1 else None

    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics else None

    def validate(self, step: int, checkpoint_url: str, out_url: str,
                 previous: dict[str, Any] | None = None) -> dict[str, Any]:
        figures = validate_checkpoint(checkpoint_url, self.val, self.cfg, out_url, device=self.device,
                                      previous=previous)
        if self.metrics is not None:
            self.metrics.record(step, figures)
        return figures


class ValidationWatcher:
    """Driver side: validates each committed validation step of the run once, in order
    (see the module docstring). `validate(step, checkpoint_url, out_url, previous)` does
    the work (the Validator actor's method in a run; `previous` is the last validation's
    result or None); `on_result(step, figures)` sees each result."""

    def __init__(self, run: Any, every: int, validate: Callable[..., dict[str, Any]],
                 on_result: Callable[[int, dict[str, Any]], None] | None = None, poll_s: float = 2.0,
                 on_close: Callable[[], None] | None = None) -> None:
        self.run, self.every, self._validate = run, every, validate
        self.on_result, self.on_close = on_result, on_close
        self.poll_s = poll_s
        self.results: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trip-validation", daemon=True)

    def pending(self) -> list[int]:
        """Committed validation steps without a result, oldest first."""
        return [s for s in self.run.steps()
                if s % self.every == 0 and not self.run.validated(s) and self.run.check(s)[0] is not None]

    def previous(self, step: int) -> dict[str, Any] | None:
        """The result of the validation before `step`, if there was one."""
        if step - self.every <= 0:
            return None
        url = storage.join(self.run.validation_url(step - self.every), RESULT)
        try:
            return json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            return None

    def run_pending(self) -> list[int]:
        """Validate every pending step now; returns the steps done."""
        done = []
        for step in self.pending():
            figures = self._validate(step, self.run.checkpoint_url(step), self.run.validation_url(step),
                                     self.previous(step))
            self.results[step] = figures
            done.append(step)
            if self.on_result is not None:
                self.on_result(step, figures)
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception as e:  # noqa: BLE001 - reported by finish(); training goes on
                self.error = e
                log.warning(f"validation failed: {type(e).__name__}: {e}")
                return
            self._stop.wait(self.poll_s)

    def start(self) -> ValidationWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (a validation under way completes first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        """Stop polling and release the validator (`on_close`)."""
        self.stop()
        if self.on_close is not None:
            self.on_close()

    def finish(self) -> None:
        """Stop polling, then validate what the run committed since the last look."""
        self.stop()
        if self.error is None:
            self.run_pending()
