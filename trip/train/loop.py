"""The per-worker training loop (one process per rank, inside a Ray Train worker).

Order: rank 0 finds the newest complete checkpoint and tells the others -> loader at its
saved position -> model -> DeepSpeed ZeRO engine -> each rank reads back only its own part
of the checkpoint (or its slice of the universal conversion after a resize) -> steps.

A step trains on exactly `train.global_batch_size` samples at any world size: the loader
deals rank r its G // W (+1) samples in `accum` micro-batches, and each sample's loss is
weighted W * accum / G, so that DeepSpeed's averages (over micro-batches and ranks) give
the mean over the G samples. Noise, timestep and text dropout of a sample are drawn from
(seed, epoch, position) (`trip.diffusion.SampleDraws`): the same at any world size. The
model's own dropout draws from torch's generator, seeded per (step, rank, micro-batch).
Nothing random depends on history, so no RNG state is checkpointed and a resumed run
repeats the uninterrupted one exactly.

Per step there is no collective beyond DeepSpeed's own and one one-element all-reduce
(did any rank get SIGTERM, `trip.train.preemption`). Every `checkpoint_every` steps each
rank writes its files locally and goes on training while they upload
(`trip.train.checkpoint`, `trip.train.snapshot`): the step pays for copying this rank's
state to host memory; serializing and uploading run on a background thread, and rank 0
commits the checkpoint once all files are in storage.

Callbacks (`trip.train.callbacks`) passed to `pipelines.train.run_training` arrive in
`loop_config["callbacks"]` and run on every rank at start, after every step and (rank 0)
after every committed checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from trip import storage
from trip.config import Config, config_from_dict, to_dict
from trip.log import get_logger, prints_to_debug
from trip.log import setup as setup_logging
from trip.train import checkpoint as ckpt
from trip.train.callbacks import StepInfo, TrainCallback, WorkerInfo

log = get_logger(__name__)  # rank-aware (trip.log): other ranks show only warnings


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config["config"]` is the run config as a dict."""
    import ray.train

    from trip.train.failures import FatalTrainingError, is_fatal

    ctx = ray.train.get_context()
    setup_logging(rank=ctx.get_world_rank())
    try:
        cfg: Config = config_from_dict(loop_config["config"], "run config")
        with tempfile.TemporaryDirectory(prefix="trip-worker-") as scratch:
            trainer = Trainer(cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                              scratch, callbacks=loop_config.get("callbacks") or ())
            trainer.run()
    except Exception as e:
        if is_fatal(e):  # the driver's StopOnFatalError ends the run instead of restarting it
            raise FatalTrainingError.wrap(e, ctx.get_world_rank()) from e
        raise


def _collective() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    if not _collective():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any, rank: int, world: int, group: Any = None) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere)."""
    if not _collective():
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


class Trainer:
    """One rank's engine, loader, EMA, checkpoints and metrics."""

    def __init__(self, cfg: Config, rank: int, world: int, local_rank: int, scratch: str,
                 callbacks: Sequence[TrainCallback] = ()) -> None:
        import deepspeed  # inside the worker only: importing it on the driver can break (Ray #50406)

        from trip.data import LatentLoader
        from trip.diffusion import SampleDraws, TRIPObjective
        from trip.metrics import build_metrics
        from trip.model import TRIPModel
        from trip.train.ds_config import deepspeed_config
        from trip.train.ema import PartitionedEMA
        from trip.train.preemption import Preemption

        self.cfg, self.rank, self.world, self.scratch = cfg, rank, world, scratch
        self.callbacks = list(callbacks)
        self.on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if self.on_gpu else torch.device("cpu")
        if self.on_gpu:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.run_dir = ckpt.RunDir(cfg.run.storage_path, cfg.run.name, validate_every=cfg.train.validate_every)
        self.preemption = Preemption(cfg.run.preemption_grace_s)
        self.preemption.install()

        found = self._agree_on_checkpoint()
        meta = found.record if found is not None else None
        self.loader = LatentLoader(cfg.data, rank, world, state=meta["loader"] if meta else None,
                                   device=None, round_size=cfg.train.global_batch_size)
        self.accum = self.loader.micro_batches_per_round
        universal = meta is not None and meta["world_size"] != world

        lora = cfg.train.lora
        torch.manual_seed(cfg.train.seed)  # identical initial weights (and adapters) on every rank
        # a resumed run takes its weights from the checkpoint: no need to fetch the pretrained
        # weights; but a LoRA checkpoint holds only the adapters, the frozen base is read again
        mcfg = cfg.model
        if meta is not None and not lora.enabled:
            mcfg = replace(cfg.model, pretrained_unet=None, pretrained_model=None)
        model = TRIPModel(mcfg, cfg.diffusion)
        if lora.enabled:
            from trip.model.lora import add_adapters

            add_adapters(model, lora)  # the base is frozen: only the adapters train
        groups = model.param_groups()
        lrs = {"unet": cfg.train.lr_unet, "fusion": cfg.train.lr_fusion}
        self.group_names = [n for n in ("unet", "fusion") if groups[n]]  # LoRA without TNF adapters: no fusion group
        self.base_lrs = [lrs[n] for n in self.group_names]
        params = [{"params": groups[n], "lr": lrs[n], "name": n} for n in self.group_names]
        ds_cfg = deepspeed_config(cfg.train, micro_batch_size=cfg.data.micro_batch_size, grad_accum=self.accum,
                                  world_size=world, on_gpu=self.on_gpu, load_universal=universal)
        with prints_to_debug(__name__):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=TRIPObjective(model, cfg.train.text_dropout, cfg.train.residual_loss_weight), model_parameters=params, config=ds_cfg)
        self.draws = SampleDraws(cfg.train.seed, cfg.diffusion.num_train_timesteps, cfg.train.text_dropout)
        # what trains, is checkpointed and averaged: every parameter, or with LoRA the adapters
        self.named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        part = [p for _, p in self.named if hasattr(p, "ds_tensor")]
        self.partition_fraction = (sum(p.ds_tensor.numel() for p in part) / sum(p.ds_numel for p in part)
                                   if part else 1.0)
        self.ema = PartitionedEMA(self.named, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        self.step, self.restarts, self.resume_bytes = 0, 0, 0
        self.pending_history: list[dict[str, Any]] = []  # rank 0: rows not yet in a history segment
        self.save_seconds: list[float] = []  # this attempt's training-path seconds per checkpoint
        self.slowest_pauses: list[float] = []  # rank 0: the slowest rank's, per checkpoint but the last
        self.writer = ckpt.CheckpointWriter(self.run_dir, on_commit=self._committed)
        # the writer's thread gathers each checkpoint's facts on its own (gloo) group, so that
        # this never interleaves with the training step's collectives on the default group
        self.writer_group = dist.new_group(backend="gloo") if _collective() else None
        from trip.train.snapshot import ZeroSnapshot

        # DeepSpeed's checkpoint files become host copies, written later; its bookkeeping runs
        # once here instead of at every checkpoint
        self.zero_files = ZeroSnapshot(self.engine, scratch, ckpt.DS_TAG, exclude_frozen=lora.enabled)
        if found is not None:
            self._restore(found, universal)
            self.step, self.restarts = meta["step"], meta.get("restarts", 0) + 1
            log.info(f"resumed at step {self.step} from {found.url} (saved at world size {meta['world_size']}, "
                       f"now {world}{'; via universal checkpoint' if universal else ''}); this rank read "
                       f"{self.resume_bytes / 1e6:.1f} MB")
        self.metrics = build_metrics(cfg.run.name, rank, local_rank, cfg.metrics.port, cfg.metrics.addr)
        self.metrics.world(world, self.restarts)
        if self.metrics.url:
            log.info(f"rank {rank} metrics at {self.metrics.url}")
        self.worker = WorkerInfo(rank=rank, world_size=world, pid=os.getpid(),
                                 attempt=_broadcast(time.time()), start_step=self.step, restarts=self.restarts,
                                 partition_fraction=self.partition_fraction, resume_bytes=self.resume_bytes)
        for cb in self.callbacks:
            cb.on_start(self.worker)

    # ------------------------------------------------------------------ resume

    def _agree_on_checkpoint(self) -> ckpt.Found | None:
        """Rank 0 lists the run's storage once; every rank gets its answer (no W-fold listing)."""
        found = self.run_dir.latest() if self.rank == 0 else None
        found = _broadcast(found)
        if found is not None and found.record["config_hash"] != self.cfg.hash():
            log.warning(f"checkpoint config hash {found.record['config_hash']} != this run's "
                            f"{self.cfg.hash()}")
        return found

    def _restore(self, found: ckpt.Found, universal: bool) -> None:
        """Load this rank's ZeRO state and EMA slice, reading only what this rank needs."""
        rec, root = found.record, os.path.join(self.scratch, "resume")
        if universal:
            u = ckpt.ensure_universal(self.run_dir, found, converter=self.rank == 0,
                                      workers=max(1, int(self.cfg.scaling.cpus_per_worker)), scratch=self.scratch)
            load_dir, tag = ckpt.fetch_universal(self.run_dir, found, u, ckpt.default_cache_root()), ckpt.UNIVERSAL
            self.resume_bytes += sum(u["files"].values())
        else:
            ds_files = [f for f in ckpt.own_files(rec, self.rank) if f.startswith(f"{ckpt.DS_TAG}/")]
            self.resume_bytes += self.run_dir.download(found.step, ds_files, root)  # the EMA slice: below
            ckpt.stub_other_ranks(rec, self.rank, root)
            load_dir, tag = root, ckpt.DS_TAG
        # with LoRA the ZeRO files hold no frozen (base) parameters: those stay as loaded
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False,
                                              load_module_strict=not self.cfg.train.lora.enabled)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {found.url} (tag {tag}) on rank {self.rank}")
        if self.ema is not None:
            self._restore_ema(found)

    def _restore_ema(self, found: ckpt.Found) -> None:
        from trip.train import partitions

        old_world = int(found.record["world_size"])
        old_stage = int(found.record["config"]["train"]["zero"]["stage"])
        numels = [int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel() for _, p in self.named]
        new_part = [hasattr(p, "ds_tensor") for _, p in self.named]
        # same world size: exactly this rank's own file; a resize: the old files overlapping
        # this rank's new slices (~17 of 512 at 512 -> 448 for the paper model: small tensors'
        # slices land on other ranks than large ones')
        need = partitions.source_ranks(numels, old_world, self.rank, self.world,
                                       old_partitioned=[old_stage == 3] * len(numels), new_partitioned=new_part)
        rels = {r: ckpt.partition_file("ema", r, old_world) for r in need}
        dest = os.path.join(self.scratch, "resume-ema")
        self.resume_bytes += self.run_dir.download(found.step, rels.values(), dest)
        files = {r: os.path.join(dest, rel) for r, rel in rels.items()}
        names = [(_strip(n), num, part) for (n, _), num, part in zip(self.named, numels, new_part)]
        parts = partitions.read_local_partitions(files, names, rank=self.rank, world_size=self.world, kind="ema")
        self.ema.load_partitions(parts, strip=_strip)

    # ------------------------------------------------------------------ loop

    def _batches(self) -> Any:
        while True:
            yield from self.loader

    def _sample_weight(self, batch: dict[str, Any]) -> float:
        """Each real sample's loss weight, W * accum / G with G the round size of the batch's
        bucket (see the module docstring)."""
        return self.world * self.accum / batch["round_size"]

    def _micro_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward, backward and (at the accumulation boundary) optimizer step of one micro-batch.

        Returns the detached weighted loss on the device: reading it (`.item()`) would make
        the host wait for the device after every micro-batch, so the caller reads once per step."""
        d, dt = self.device, self.dtype  # bf16 weights need bf16 inputs; the loss is computed in fp32
        if batch["latents"].shape[0] == 0:  # a rank with fewer samples than micro-batches this step:
            batch = _zero_weight_stand_in(batch)  # it must still run the collectives of a forward
        latents = batch["latents"].permute(0, 2, 1, 3, 4)  # [B,F,C,h,w] -> [B,C,F,h,w]
        t, noise, keep = self.draws(batch["positions"], batch["epoch"], tuple(latents.shape[1:]))
        weights = batch["valid"].float() * self._sample_weight(batch)
        text = batch.get("text_states")
        loss = self.engine(latents.to(d, dt), batch["image_latents"].to(d, dt),
                           text.to(d, dt) if text is not None else None, None,
                           timesteps=t.to(d), noise=noise.to(d), keep_text=keep.to(d), weights=weights.to(d))
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def run(self) -> None:
        from trip.train.ds_config import lr_factor
        from trip.train.preemption import Preempted

        cfg, rank = self.cfg, self.rank
        log.info(f"world size {self.world}: {cfg.train.global_batch_size} samples per step = "
                   f"{self.world} ranks x {self.accum} micro-batches of <= {cfg.data.micro_batch_size}; "
                   f"each rank holds {self.partition_fraction:.3f} of the partitioned parameters")
        it = self._batches()
        t_start, steps_here, last_saved, corrupt_seen = time.perf_counter(), 0, self.step, 0
        samples_here = 0
        bucket_samples_seen, bucket_slots_seen = +self.loader.bucket_samples, +self.loader.bucket_slots
        try:
            while self.step < cfg.train.max_steps:
                factor = lr_factor(self.step, cfg.train)
                for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                    g["lr"] = base * factor
                t0, wait0 = time.perf_counter(), self.loader.wait_seconds
                losses, samples, keys, epochs, buckets = [], 0, [], [], []
                for micro in range(self.accum):
                    epochs.append(self.loader.epoch)
                    batch = next(it)
                    # dropout (the UNet's temporal convs) draws from torch's generator: seeded per
                    # (step, rank, micro-batch), a resumed run repeats it with no RNG state saved
                    torch.manual_seed(_micro_seed(cfg.train.seed, self.step, rank, micro))
                    losses.append(self._micro_step(batch))
                    buckets.append(batch["bucket"])
                    scale = self._sample_weight(batch)  # the step's micro-batches are one round, one bucket's
                    flags = [bool(v) for v in batch["valid"]]
                    keys += [k for k, ok in zip(batch["keys"], flags) if ok]
                    samples += sum(flags)
                # the one host sync of the step; the rank's mean per-sample loss, for logs
                loss = float(torch.stack(losses).sum()) / scale / max(samples, 1)
                self.step += 1
                if self.ema is not None:
                    self.ema.update()
                seconds = time.perf_counter() - t0
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else float("nan")
                self.metrics.step(seconds=seconds, samples=samples, loss=loss, grad_norm=grad_norm,
                                  lrs={n: b * factor for n, b in zip(self.group_names, self.base_lrs)},
                                  step=self.step)
                self.metrics.data_wait(self.loader.wait_seconds - wait0)
                self.metrics.corrupt(self.loader.corrupt_samples - corrupt_seen)
                corrupt_seen = self.loader.corrupt_samples
                self.metrics.buckets(dict(self.loader.bucket_samples - bucket_samples_seen),
                                     dict(self.loader.bucket_slots - bucket_slots_seen))
                bucket_samples_seen, bucket_slots_seen = +self.loader.bucket_samples, +self.loader.bucket_slots
                if self.callbacks:
                    info = StepInfo(step=self.step, loss=loss, samples=samples, seconds=seconds,
                                    keys=keys, epochs=epochs, buckets=buckets)
                    for cb in self.callbacks:
                        cb.on_step(self.worker, info)
                steps_here += 1
                samples_here += batch["round_size"]  # the step's global batch: its bucket's round
                elapsed = time.perf_counter() - t_start
                sps = samples_here / max(elapsed, 1e-9)
                if rank == 0:
                    self.pending_history.append({"step": self.step, "loss": loss, "samples_per_second": sps,
                                                 "grad_norm": grad_norm, "lr_factor": factor,
                                                 "world_size": self.world, "time": time.time()})
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    eta = (cfg.train.max_steps - self.step) * elapsed / steps_here
                    log.info(f"step {self.step}/{cfg.train.max_steps}  loss {loss:.4f}  {sps:.1f} samples/s  "
                               f"ETA {eta:.0f} s")
                if self.preemption.agreed(self.device):
                    left = self.preemption.seconds_left()
                    log.info(f"preemption at step {self.step}: saving ({left:.0f} s of grace left)")
                    self.save(wait=True)
                    self.preemption.disarm()
                    raise Preempted(f"stopped at step {self.step} after a termination request; the "
                                    f"checkpoint of this step is committed")
                if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps:
                    self.save(wait=self.step == cfg.train.max_steps)
                    last_saved = self.step
            if last_saved != self.step:  # resumed at max_steps: save so the run has a final checkpoint
                self.save(wait=True)
            if self.callbacks:
                from trip.train.ema import local_part

                params = [(_strip(n), local_part(p)) for n, p in self.engine.module.named_parameters()]
                for cb in self.callbacks:
                    cb.on_end(self.worker, params)
        finally:
            self.preemption.finish()
            self.loader.close()
            self.metrics.close()
        self.writer.close()
        if rank == 0:
            self._write_report()

    # ------------------------------------------------------------------ save

    def save(self, wait: bool = False) -> None:
        """Copy this rank's state to host memory, hand it to the background writer and go on.

        The training path pays for the host copies (this rank's 1/W of the model, its Adam
        state and EMA: a memcpy). The writer's thread serializes them, gathers small per-rank
        facts (file names, the loader's own deliveries) to rank 0, which builds the commit
        record, uploads and commits; with `wait` (end of run, preemption) the step also waits
        for that."""
        from trip.data import LatentLoader
        from trip.train import partitions
        from trip.train.ema import local_part
        from trip.train.snapshot import host_copy_all, write_snapshots

        t0 = time.perf_counter()
        self.writer.wait()  # at most one upload in flight; it had a whole interval to finish
        staging = tempfile.mkdtemp(prefix=f"ckpt-{self.step}-", dir=self.scratch)
        ds_root = os.path.join(staging, "ds-root")
        ds_saves = self.zero_files.capture(ds_root, {"trip_step": self.step})
        named = [(_strip(n), p) for n, p in self.named]
        copies = [("weights", host_copy_all([local_part(p) for _, p in self.named]))]
        if self.ema is not None:
            copies.append(("ema", host_copy_all(self.ema.shadow)))
        ds_dir = os.path.join(ds_root, ckpt.DS_TAG)
        files = {f"{ckpt.DS_TAG}/{os.path.relpath(path, ds_dir)}": path for path, _ in ds_saves}
        for kind, _ in copies:
            rel = ckpt.partition_file(kind, self.rank, self.world)
            files[rel] = os.path.join(staging, rel)
        rank, world = self.rank, self.world

        def produce() -> None:  # on the writer's thread: serialize, then the files are uploaded
            write_snapshots(ds_saves)
            for kind, tensors in copies:
                partitions.write_partitions(files[ckpt.partition_file(kind, rank, world)],
                                            partitions.param_entries(named, tensors), rank=rank,
                                            world_size=world, kind=kind)

        t_local = time.perf_counter()
        # the previous save's pause rides along: rank 0 reports the slowest rank's, not its own
        previous = self.save_seconds[-1] if self.save_seconds else None
        mine = (sorted(files), self.loader.state_dict(own_only=self.rank != 0), previous)
        step, restarts, cfg, group = self.step, self.restarts, self.cfg, self.writer_group

        def prepare() -> dict[str, Any] | None:  # on the writer's thread of every rank
            facts = _gather(mine, rank, world, group)
            if rank != 0:
                return None
            if previous is not None:
                self.slowest_pauses.append(max(p for _, _, p in facts if p is not None))
            return {"format": ckpt.FORMAT, "step": step, "world_size": world, "config_hash": cfg.hash(),
                    "config": to_dict(cfg), "loader": LatentLoader.merge_states([st for _, st, _ in facts]),
                    "restarts": restarts, "files": sorted(n for names, _, _ in facts for n in names),
                    "time": time.time()}

        history, self.pending_history = self.pending_history, []
        self.writer.submit(self.step, staging, files, history=history if self.rank == 0 else None,
                           keep=self.cfg.train.keep_checkpoints if self.rank == 0 else None, produce=produce,
                           prepare=prepare)
        if wait:
            self.writer.wait()
        t_end = time.perf_counter()
        seconds = t_end - t0
        self.save_seconds.append(seconds)
        self.metrics.checkpoint_saved(seconds)
        how = (f"writing, upload and commit {t_end - t_local:.3f} s" if wait
               else "files written, uploaded and committed in the background")
        log.info(f"checkpoint at step {self.step}: training paused {seconds:.3f} s (host copies "
                        f"{t_local - t0:.3f} s; {how})")

    def _committed(self, step: int, seconds: float) -> None:
        log.info(f"checkpoint at step {step} committed ({seconds:.2f} s of upload and commit)")
        for cb in self.callbacks:
            cb.on_checkpoint(self.worker, step, self.run_dir.checkpoint_url(step))

    def _write_report(self) -> None:
        from trip.train.report import write_report

        history = self.run_dir.history(up_to=self.step)
        extra = {"checkpoint_save_seconds": self.save_seconds,
                 "checkpoint_pause_seconds_slowest_rank": self.slowest_pauses,
                 "checkpoint": self.run_dir.checkpoint_url(self.step)}
        write_report(self.run_dir.url, self.cfg, history, extra=extra)
        if self.cfg.run.output_dir and storage.join(self.cfg.run.output_dir, "") != storage.join(self.run_dir.url, ""):
            write_report(self.cfg.run.output_dir, self.cfg, history, extra=extra)


def _micro_seed(*key: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _zero_weight_stand_in(batch: dict[str, Any]) -> dict[str, Any]:
    """One all-zero sample with valid=False (weight 0) in place of an empty micro-batch."""
    out = dict(batch)
    for k in ("latents", "image_latents", "text_states"):
        if batch.get(k) is not None:
            out[k] = torch.zeros((1, *batch[k].shape[1:]), dtype=batch[k].dtype)
    out.update(valid=torch.zeros(1, dtype=torch.bool), positions=torch.zeros(1, dtype=torch.int64), keys=[""])
    return out


def _strip(name: str) -> str:
    """Parameter names as the model has them (the engine wraps the model in TRIPObjective)."""
    return name.removeprefix("model.")
