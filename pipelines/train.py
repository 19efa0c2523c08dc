"""`trip train`: validate a run config, then train with Ray Train (V2) + DeepSpeed ZeRO.

The driver stays thin: it checks everything that can be checked before a worker starts
(config, dataset index vs model shapes, storage reachable), builds the TorchTrainer
(fixed or elastic scaling, failure policy, Ray's own state in the run's storage) and waits.
Worker deaths and transient errors restart the group up to `run.max_failures`; an error a
restart would repeat (corrupt data past the limit, a config or shape error) ends the run
after the attempt that raised it (`trip.train.failures`).
All training happens in `trip.train.loop` on the workers; DeepSpeed is never imported here.
Checkpoints are the workers' business (`trip.train.checkpoint`): the driver finds the run's
result there afterwards. Rerunning the same run name resumes from its latest complete
checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trip import storage
from trip.config import Config, ConfigError, load_config, to_dict
from trip.log import get_logger, verbose
from trip.train.callbacks import TrainCallback

log = get_logger(__name__)


@dataclass
class TrainResult:
    """What a finished run leaves behind (paths are local paths or s3:// URLs)."""

    steps: int
    final_loss: float
    samples_per_second: float
    checkpoint: str
    output_dir: str
    plot: str
    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)


def _check_buckets(cfg: Config, index: dict, url: str) -> None:
    """Every bucket of a bucketed dataset must fit the model: its channels, at most
    model.num_frames frames, and h, w the model can take (TNF resamples its position grid)."""
    from trip.config import latent_size_problem
    from trip.data.shards import dataset_buckets

    m = cfg.model
    try:
        buckets = dataset_buckets(index, url)
    except ValueError as e:
        raise ConfigError(f"data.dataset: {e}") from e
    for b in buckets:
        f, c, h, w = b.latent_shape
        problem = latent_size_problem(m, (h, w))
        if c != m.latent_channels:
            problem = f"{c} latent channels, the model has model.latent_channels={m.latent_channels}"
        elif f > m.num_frames:
            problem = f"{f} frames, more than model.num_frames={m.num_frames}"
        if problem:
            raise ConfigError(f"{url}: bucket {b.name} (latents {list(b.latent_shape)}) does not fit the model: {problem}")


def validate(cfg: Config) -> None:
    """Fail before any worker starts, naming the file or field at fault."""
    from trip.data.shards import read_index

    if not cfg.data.dataset:
        raise ConfigError("data.dataset is empty: set it to the dataset prefix holding index.json")
    try:
        index = read_index(cfg.data.dataset)
    except FileNotFoundError as e:
        raise ConfigError(f"data.dataset: {e}") from e
    except ValueError as e:
        raise ConfigError(f"data.dataset: {e}") from e
    m = cfg.model
    want = [m.num_frames, m.latent_channels, *m.latent_hw]
    url = storage.join(cfg.data.dataset, "index.json")
    if index.get("buckets"):
        _check_buckets(cfg, index, url)
    elif list(index["latent_shape"]) != want:
        raise ConfigError(f"{url}: latent_shape {index['latent_shape']} "
                          f"does not match the model's [num_frames, latent_channels, h, w] "
                          f"(model.latent_size) = {want}")
    text = index.get("text_shape")
    if cfg.data.text and text and text[-1] != m.unet.cross_attention_dim:
        raise ConfigError(f"{storage.join(cfg.data.dataset, 'index.json')}: text states of width {text[-1]} "
                          f"but model.unet.cross_attention_dim = {m.unet.cross_attention_dim}")
    if cfg.train.validate_every:
        try:
            held = read_index(cfg.data.validation)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.validation: {e}") from e
        if list(held["latent_shape"]) != want:
            raise ConfigError(f"{storage.join(cfg.data.validation, 'index.json')}: latent_shape "
                              f"{held['latent_shape']} does not match the training set's {want}")
    if index["num_samples"] < cfg.train.global_batch_size:
        raise ConfigError(f"data.dataset has {index['num_samples']} samples: fewer than one step's "
                          f"train.global_batch_size = {cfg.train.global_batch_size}")
    for key in ("pretrained_model", "pretrained_unet"):
        path = getattr(m, key)
        if path and not storage.exists(path):
            raise ConfigError(f"model.{key}: {path} does not exist")
    _check_storage(cfg.run.storage_path)


def _check_storage(path: str) -> None:
    local = storage.local_path(path)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        if not os.access(local, os.W_OK):
            raise ConfigError(f"run.storage_path {path} is not writable")
        return
    fs, p = storage.filesystem(path)
    bucket = p.split("/")[0]
    try:
        ok = fs.exists(bucket)
    except Exception as e:  # endpoint down, DNS, auth: say which storage, never the credentials
        raise ConfigError(f"run.storage_path {path}: storage not reachable ({type(e).__name__})") from e
    if not ok:
        raise ConfigError(f"run.storage_path {path}: bucket {bucket!r} does not exist")

# Non-secret settings a worker must see like the driver does (a Ray cluster started earlier
# would not have them). Credentials are never forwarded: workers read their own environment.
FORWARD_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
               "AWS_DEFAULT_REGION", "TRIP_LOG_LEVEL")


def forwarded_env() -> dict[str, str]:
    """The FORWARD_ENV variables this driver has, for a worker's or actor's runtime_env."""
    return {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}


def build_trainer(cfg: Config, callbacks: Sequence[TrainCallback] = ()) -> Any:
    """The TorchTrainer for this config (no worker starts until .fit()); `callbacks`
    (`trip.train.callbacks.TrainCallback`) run in every worker."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trip.train.failures import StopOnFatalError
    from trip.train.loop import train_loop_per_worker

    s = cfg.scaling
    workers: int | tuple[int, int] = (s.min_workers, s.max_workers) if s.min_workers is not None else s.num_workers
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    from trip.train.checkpoint import ray_storage

    path, fs = ray_storage(cfg.run.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "callbacks": list(callbacks)},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=s.resize_check_s),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            # the console setup runs first in every worker, also on a cluster we did not start
            worker_runtime_env={"env_vars": forwarded_env(),
                                "worker_process_setup_hook": "trip.log.setup_ray_worker"},
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[StopOnFatalError()],  # no retries of what would fail the same way
            # Ray Train's INFO (resource requests, worker group starts) stays in its log files
            logging_config=ray.train.LoggingConfig(log_level="DEBUG" if verbose() else "WARNING")),
    )


def run_training(cfg: Config, callbacks: Sequence[TrainCallback] = (),
                 on_validation: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Validate, train to cfg.train.max_steps (resuming if the run exists), return the result.
    `callbacks` run in every worker (`trip.train.callbacks`); `on_validation(step, figures)`
    runs in the driver after each validation (`train.validate_every`). Raises
    `trip.train.failures.FatalTrainingError` after one attempt when a worker hit an error a
    restart would repeat."""
    validate(cfg)
    import ray

    from trip.log import init_ray

    if not ray.is_initialized():
        # our own local Ray unless told where the cluster is: never join whatever Ray
        # instance happens to run on this machine
        init_ray(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    from trip.train.failures import FatalTrainingError

    watcher = start_validation(cfg, on_validation) if cfg.train.validate_every else None
    try:
        try:
            build_trainer(cfg, callbacks).fit()
        except ray.train.ControllerError as e:
            if isinstance(e.controller_failure, FatalTrainingError):
                raise e.controller_failure from None  # its message says it all; Ray's wrapping adds nothing
            raise
        if watcher is not None:
            watcher.finish()  # the steps committed since its last look, the final one included
    finally:
        if watcher is not None:
            watcher.close()
    return read_result(cfg)


def start_validation(cfg: Config, on_validation: Callable[[int, dict[str, Any]], None] | None = None) -> Any:
    """The validation actor (its own resources, `scaling.validation_*`) and the driver thread
    that hands it each committed validation step (`trip.train.validation`)."""
    import ray

    from trip.train.checkpoint import RunDir
    from trip.train.validation import ValidationWatcher, Validator

    s = cfg.scaling
    actor = ray.remote(Validator).options(
        num_cpus=s.validation_cpus, num_gpus=s.validation_gpus if s.use_gpu else 0,
        runtime_env={"env_vars": forwarded_env(),
                     "worker_process_setup_hook": "trip.log.setup_validation_worker"},
    ).remote(to_dict(cfg))
    try:
        url = ray.get(actor.metrics_url.remote(), timeout=120)
        if url:
            log.info(f"validation metrics at {url}")
    except ray.exceptions.GetTimeoutError:
        log.warning(f"the validation actor is still waiting for its resources (scaling.validation_cpus="
                    f"{s.validation_cpus}, validation_gpus={s.validation_gpus}) beside the training workers: "
                    f"validations wait until there is room")

    def report(step: int, figures: dict[str, Any]) -> None:
        extra = "".join(f", {label} {figures[key]:.{digits}f}" for key, label, digits in (
            ("psnr", "PSNR", 1), ("ssim", "SSIM", 3), ("displacement_ratio", "displacement ratio", 2))
            if key in figures)
        log.info(f"validation at step {step}: loss {figures['loss']:.4f}{extra} ({figures['seconds']:.1f} s)")
        if on_validation is not None:
            on_validation(step, figures)

    run = RunDir(cfg.run.storage_path, cfg.run.name, validate_every=cfg.train.validate_every)
    return ValidationWatcher(run, cfg.train.validate_every, lambda *args: ray.get(actor.validate.remote(*args)),
                             on_result=report, on_close=lambda: ray.kill(actor)).start()


def read_result(cfg: Config) -> TrainResult:
    """The run's newest complete checkpoint and its report, from the run's storage."""
    import json

    from trip.train.checkpoint import RunDir

    run = RunDir(cfg.run.storage_path, cfg.run.name)
    found = run.latest()
    if found is None:
        raise RuntimeError(f"run {cfg.run.name} finished without a complete checkpoint in {run.url}")
    out = cfg.run.output_dir or run.url  # the report is in the run's storage, and also here when set
    summary_url = storage.join(out, "summary.json")
    summary = json.loads(storage.read_bytes(summary_url)) if storage.exists(summary_url) else {}
    return TrainResult(steps=found.step, final_loss=float(summary.get("final_loss", float("nan"))),
                       samples_per_second=float(summary.get("samples_per_second", 0.0)), checkpoint=found.url,
                       output_dir=out, plot=storage.join(out, "training.png"), summary=summary_url,
                       metrics=summary)


def cli(args: argparse.Namespace, callbacks: Sequence[TrainCallback] = ()) -> int:
    """`trip train --config X [--set k=v ...]`."""
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trip.train.failures import FatalTrainingError

    try:
        res = run_training(cfg, callbacks)
    except FatalTrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info(f"done: {res.steps} steps, final loss {res.final_loss:.4f}, {res.samples_per_second:.1f} samples/s")
    log.info(f"checkpoint {res.checkpoint}")
    log.info(f"plot {res.plot}")
    log.info(f"summary {res.summary}")
    return 0


def main(argv: list[str] | None = None, callbacks: Sequence[TrainCallback] = ()) -> int:
    """The command line; a script that wraps it can pass `callbacks` for the workers."""
    from trip.cli import add_config_args, parse_args

    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    add_config_args(ap)
    return cli(parse_args(ap, argv), callbacks)


if __name__ == "__main__":
    sys.exit(main())
