"""The per-worker training loop (one process per rank, inside a Ray Train worker).

Order: find a complete checkpoint -> model -> DeepSpeed ZeRO engine (universal-checkpoint
mode when the world size changed) -> restore weights, optimizer, EMA, RNG -> loader at its
merged state -> steps. Per step there is no collective beyond DeepSpeed's own and metrics
stay local. Every `checkpoint_every` steps (and at the end) every rank saves, then
`ray.train.report` (a barrier) registers the checkpoint in storage.

`TRIP_TRAIN_DEBUG_DIR=<local dir>` makes each rank write `worker-rank<r>.json` (pid, world
size, ZeRO partition fraction) and append the sample keys of every step to
`keys-rank<r>.jsonl`: the fault-tolerance tests use them to kill a worker and to check
that data is seen exactly once per epoch. `TRIP_TRAIN_DEBUG_STEP_SLEEP=<s>` slows every
step down so that a test can resize the cluster while a tiny run is still going.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from trip import storage
from trip.config import Config, config_from_dict, to_dict
from trip.train import checkpoint as ckpt


def _log(rank: int, text: str, every_rank: bool = False) -> None:
    """A progress line from rank 0 (or from every rank), written to stdout once: Ray Train
    patches `print` in workers to also go through its logger, which showed each line twice."""
    if rank == 0 or every_rank:
        sys.stdout.write(f"[trip] {text}\n")
        sys.stdout.flush()


def default_output_dir(cfg: Config) -> str:
    """Plots and summary: run.output_dir, else next to a local storage path, else ./outputs/runs."""
    if cfg.run.output_dir:
        return cfg.run.output_dir
    if storage.is_url(cfg.run.storage_path):
        return os.path.abspath(os.path.join("outputs", "runs", cfg.run.name))
    return os.path.join(os.path.abspath(cfg.run.storage_path), cfg.run.name)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config["config"]` is the run config as a dict."""
    import ray.train

    cfg: Config = config_from_dict(loop_config["config"], "run config")
    ctx = ray.train.get_context()
    with tempfile.TemporaryDirectory(prefix="trip-worker-") as scratch:
        trainer = Trainer(cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), scratch)
        trainer.run()


class Trainer:
    """One rank's engine, loader, EMA and metrics."""

    def __init__(self, cfg: Config, rank: int, world: int, local_rank: int, scratch: str) -> None:
        import deepspeed  # inside the worker only: importing it on the driver can break (Ray #50406)
        import ray.train

        from trip.data import LatentLoader
        from trip.diffusion import TRIPObjective
        from trip.metrics import build_metrics
        from trip.model import TRIPModel
        from trip.train.ds_config import deepspeed_config
        from trip.train.ema import PartitionedEMA

        self.cfg, self.rank, self.world, self.scratch = cfg, rank, world, scratch
        self.on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if self.on_gpu else torch.device("cpu")
        if self.on_gpu:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        self.accum = cfg.grad_accum_steps(world)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

        local_dir, meta = self._find_checkpoint(ray.train.get_checkpoint())
        universal = meta is not None and meta["world_size"] != world

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        # a resumed run takes its weights from the checkpoint: no need to fetch the pretrained UNet
        mcfg = replace(cfg.model, pretrained_unet=None) if meta is not None else cfg.model
        model = TRIPModel(mcfg, cfg.diffusion)
        groups = model.param_groups()
        self.base_lrs = [cfg.train.lr_unet, cfg.train.lr_fusion]
        self.group_names = ["unet", "fusion"]
        params = [{"params": groups[n], "lr": lr, "name": n} for n, lr in zip(self.group_names, self.base_lrs)]
        ds_cfg = deepspeed_config(cfg.train, micro_batch_size=cfg.data.micro_batch_size, grad_accum=self.accum,
                                  world_size=world, on_gpu=self.on_gpu, load_universal=universal)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=TRIPObjective(model, cfg.train.text_dropout), model_parameters=params, config=ds_cfg)
        self.named = list(self.engine.module.named_parameters())
        part = [p for _, p in self.named if hasattr(p, "ds_tensor")]
        self.partition_fraction = (sum(p.ds_tensor.numel() for p in part) / sum(p.ds_numel for p in part)
                                   if part else 1.0)
        self.ema = PartitionedEMA(self.named, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        self.step, self.history, self.restarts, loader_state = 0, [], 0, None
        self.save_seconds: list[float] = []  # this attempt's checkpoint save + upload times
        torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank noise and timestep streams
        if meta is not None:
            self._restore(local_dir, meta, universal)
            loader_state, self.step = meta["loader"], meta["step"]
            self.history, self.restarts = meta.get("history", []), meta.get("restarts", 0) + 1
            _log(rank, f"resumed at step {self.step} (saved at world size {meta['world_size']}, now {world}"
                       f"{'; via universal checkpoint' if universal else ''})")
        self.loader = LatentLoader(cfg.data, rank, world, state=loader_state, device=None)
        self.metrics = build_metrics(cfg.run.name, rank, local_rank, cfg.metrics.port, cfg.metrics.addr)
        self.metrics.world(world, self.restarts)
        if self.metrics.url:
            _log(rank, f"rank {rank} metrics at {self.metrics.url}", every_rank=True)
        self._debug_setup()

    # ------------------------------------------------------------------ resume

    def _find_checkpoint(self, latest: Any) -> tuple[str | None, dict[str, Any] | None]:
        resume = ckpt.find_resume_checkpoint(latest) if latest is not None else None
        if resume is None:
            resume = ckpt.scan_run(self.cfg.run.storage_path, self.cfg.run.name)
            if resume is not None:
                _log(self.rank, f"Ray passed no checkpoint; found {resume.path} in the run directory")
        if resume is None:
            return None, None
        local = resume.to_directory(os.path.join(self.scratch, "resume"))
        meta = ckpt.read_meta(local)
        if meta is None:
            raise RuntimeError(f"checkpoint {resume.path} was complete in storage but not after download")
        if meta["config_hash"] != self.cfg.hash():
            _log(self.rank, f"warning: checkpoint config hash {meta['config_hash']} != this run's {self.cfg.hash()}")
        return local, meta

    def _restore(self, local_dir: str, meta: dict[str, Any], universal: bool) -> None:
        load_dir, tag = local_dir, ckpt.DS_TAG
        if universal:
            load_dir, tag = os.path.join(self.scratch, "universal-root"), "universal"
            ckpt.to_universal(local_dir, load_dir)
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir} (tag {tag})")
        if self.ema is not None:
            from safetensors.torch import load_file

            ema = load_file(os.path.join(local_dir, "ema.safetensors"))
            self.ema.load_full_state({f"model.{k}": v for k, v in ema.items()})
        rng = os.path.join(local_dir, "rng", f"rank{self.rank}.json")
        if not universal:  # per-rank streams only mean something at the same world size
            with open(rng) as fh:
                ckpt.set_rng_state(json.load(fh))

    # ------------------------------------------------------------------ debug hooks

    def _debug_setup(self) -> None:
        self.debug_dir = os.environ.get("TRIP_TRAIN_DEBUG_DIR")
        self.step_sleep = float(os.environ.get("TRIP_TRAIN_DEBUG_STEP_SLEEP", "0") or 0)
        self.attempt = time.time()
        if dist.is_initialized():  # one id per worker-group start, the same on every rank
            box = [self.attempt]
            dist.broadcast_object_list(box, src=0)
            self.attempt = box[0]
        if not self.debug_dir:
            return
        os.makedirs(self.debug_dir, exist_ok=True)
        ckpt.write_json(os.path.join(self.debug_dir, f"worker-rank{self.rank}.json"),
                        {"pid": os.getpid(), "rank": self.rank, "world_size": self.world, "step": self.step,
                         "partition_fraction": self.partition_fraction, "attempt": self.attempt})

    def _debug_keys(self, keys: list[str], epochs: list[int]) -> None:
        if self.debug_dir:
            with open(os.path.join(self.debug_dir, f"keys-rank{self.rank}.jsonl"), "a") as fh:
                fh.write(json.dumps({"attempt": self.attempt, "step": self.step, "world_size": self.world,
                                     "epochs": epochs, "keys": keys}) + "\n")

    # ------------------------------------------------------------------ loop

    def _next_batch(self, it: Any) -> dict[str, Any]:
        """Next batch without touching the training RNG: DataLoader draws worker seeds from
        torch's global generator, which would shift noise after a resume."""
        state = torch.get_rng_state()
        batch = next(it)
        torch.set_rng_state(state)
        return batch

    def _batches(self) -> Any:
        while True:
            yield from self.loader

    def _micro_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward, backward and (at the accumulation boundary) optimizer step of one micro-batch.

        Returns the detached loss on the device: reading it (`.item()`) would make the host
        wait for the device after every micro-batch, so the caller reads once per step."""
        d, dt = self.device, self.dtype  # bf16 weights need bf16 inputs; the loss is computed in fp32
        loss = self.engine(batch["latents"].permute(0, 2, 1, 3, 4).to(d, dt),  # [B,F,C,h,w] -> [B,C,F,h,w]
                           batch["image_latents"].to(d, dt),
                           batch["text_states"].to(d, dt) if batch.get("text_states") is not None else None,
                           batch["valid"].to(d) if batch.get("valid") is not None else None)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def run(self) -> None:
        from trip.train.ds_config import lr_factor

        cfg, rank = self.cfg, self.rank
        _log(rank, f"world size {self.world}: micro-batch {cfg.data.micro_batch_size} x {self.accum} "
                   f"accumulation x {self.world} ranks = global batch {cfg.train.global_batch_size}; "
                   f"each rank holds {self.partition_fraction:.3f} of the partitioned parameters")
        it = self._batches()
        t_start, steps_here, last_saved, corrupt_seen = time.perf_counter(), 0, self.step, 0
        while self.step < cfg.train.max_steps:
            factor = lr_factor(self.step, cfg.train)
            for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = base * factor
            t0, wait0 = time.perf_counter(), self.loader.wait_seconds
            losses, samples, keys, epochs = [], 0, [], []
            for _ in range(self.accum):
                epochs.append(self.loader.epoch)
                batch = self._next_batch(it)
                losses.append(self._micro_step(batch))
                valid = batch.get("valid")
                flags = [bool(v) for v in valid] if valid is not None else [True] * len(batch["keys"])
                keys += [k for k, ok in zip(batch["keys"], flags) if ok]
                samples += sum(flags)
            loss = float(torch.stack(losses).float().mean())  # the one host sync of the step
            self.step += 1
            if self.ema is not None:
                self.ema.update()
            seconds = time.perf_counter() - t0
            norm = self.engine.get_global_grad_norm()
            self.metrics.step(seconds=seconds, samples=samples, loss=loss,
                              grad_norm=float(norm) if norm is not None else float("nan"),
                              lrs={n: b * factor for n, b in zip(self.group_names, self.base_lrs)}, step=self.step)
            self.metrics.data_wait(self.loader.wait_seconds - wait0)
            self.metrics.corrupt(self.loader.corrupt_samples - corrupt_seen)
            corrupt_seen = self.loader.corrupt_samples
            self._debug_keys(keys, epochs)
            if self.step_sleep:
                time.sleep(self.step_sleep)
            steps_here += 1
            elapsed = time.perf_counter() - t_start
            sps = steps_here * cfg.train.global_batch_size / max(elapsed, 1e-9)
            self.history.append({"step": self.step, "loss": loss, "samples_per_second": sps, "time": time.time()})
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                eta = (cfg.train.max_steps - self.step) * elapsed / steps_here
                _log(rank, f"step {self.step}/{cfg.train.max_steps}  loss {loss:.4f}  {sps:.1f} samples/s  "
                           f"ETA {eta:.0f} s")
            if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps:
                self.save()
                last_saved = self.step
        if last_saved != self.step:  # resumed at max_steps: still report so the run has a result
            self.save()
        self.loader.close()
        if rank == 0:
            self._write_report()
        self.metrics.close()

    # ------------------------------------------------------------------ save

    def save(self) -> None:
        """All ranks: DeepSpeed files + RNG, gathered weights/EMA + meta (rank 0, meta last), report."""
        import ray.train
        from ray.train import Checkpoint
        from safetensors.torch import save_file

        from trip.train.ema import gather_full

        t0 = time.perf_counter()
        states: list[Any] = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(states, self.loader.state_dict())
        else:
            states = [self.loader.state_dict()]
        merged = self.loader.merge_states(states)
        tmp = tempfile.mkdtemp(prefix="ckpt-", dir=self.scratch)
        try:
            self.engine.save_checkpoint(tmp, tag=ckpt.DS_TAG, client_state={"trip_step": self.step})
            ckpt.write_json(os.path.join(tmp, "rng", f"rank{self.rank}.json"), ckpt.rng_state())
            t_write = time.perf_counter()
            weights = gather_full(self.named)
            ema = self.ema.full_state() if self.ema is not None else None
            if self.rank == 0:
                save_file({k.removeprefix("model."): v for k, v in weights.items()},
                          os.path.join(tmp, "weights.safetensors"))
                if ema is not None:
                    save_file({k.removeprefix("model."): v for k, v in ema.items()},
                              os.path.join(tmp, "ema.safetensors"))
                ckpt.write_json(os.path.join(tmp, ckpt.META_NAME), {
                    "format": ckpt.FORMAT, "step": self.step, "world_size": self.world,
                    "config_hash": self.cfg.hash(), "config": to_dict(self.cfg), "loader": merged,
                    "history": self.history, "restarts": self.restarts,
                    "files": ckpt.expected_files(self.world, ema is not None, self.cfg.train.zero.stage)})
            t_gather = time.perf_counter()
            last = self.history[-1] if self.history else {}
            ray.train.report({"step": self.step, "loss": last.get("loss", float("nan")),
                              "samples_per_second": last.get("samples_per_second", 0.0),
                              "world_size": self.world, "partition_fraction": self.partition_fraction,
                              "output_dir": default_output_dir(self.cfg)},
                             checkpoint=Checkpoint.from_directory(tmp))
            t_end = time.perf_counter()
            seconds = t_end - t0
            self.save_seconds.append(seconds)
            self.metrics.checkpoint_saved(seconds)
            _log(self.rank, f"checkpoint at step {self.step} saved in {seconds:.2f} s (DeepSpeed files "
                            f"{t_write - t0:.2f} s, full weights + EMA {t_gather - t_write:.2f} s, "
                            f"report + upload {t_end - t_gather:.2f} s)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_report(self) -> None:
        from trip.train.report import write_report

        write_report(default_output_dir(self.cfg), self.cfg, self.history,
                     extra={"checkpoint_save_seconds": self.save_seconds})
