"""Prometheus metrics of one training worker.

Each worker serves its own private registry on `metrics.port + local_rank` (0 disables)
with the labels {run, rank, node} only (plus `group` on the learning rate): bounded
cardinality, and never a value taken from credentials or free text (label values are
checked to be plain identifiers). Updating costs a few dict look-ups per step and no
collective. `NullMetrics` has the same interface, so the loop never branches on it.

The Grafana dashboard and alert rules in monitoring/ use exactly the names below.
"""

from __future__ import annotations

import errno
import re
import socket
import time

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

_SAFE_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
SAVE_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
LABELS = ("run", "rank", "node")
METRIC_NAMES = (
    "trip_train_step_seconds", "trip_train_samples_total", "trip_train_steps_total", "trip_train_loss",
    "trip_train_grad_norm", "trip_train_lr", "trip_data_wait_seconds_total", "trip_data_corrupt_samples_total",
    "trip_checkpoint_save_seconds", "trip_train_world_size", "trip_train_restarts_total", "trip_train_step",
    "trip_train_last_step_timestamp_seconds", "trip_gpu_memory_allocated_bytes", "trip_gpu_memory_reserved_bytes",
)


def safe_label(value: str, what: str) -> str:
    """A label value must be a plain identifier: never a URL, a path with secrets or free text."""
    if not _SAFE_LABEL.match(value):
        raise ValueError(f"{what}={value!r} is not usable as a metric label "
                         "(letters, digits, '_', '.', ':', '-' only, at most 128)")
    return value


def serve_metrics(port: int, addr: str, registry: CollectorRegistry = REGISTRY, *, setting: str = "metrics.port"):
    """Serve `registry` on http://addr:port/metrics in a daemon thread; returns (server, thread).

    A port already taken (another run or exporter on this host) is an OSError that names the
    port and the setting to change, instead of the bare "Address already in use"."""
    try:
        return start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        raise OSError(e.errno, f"Prometheus exporter: port {port} on {addr or '0.0.0.0'} is already in use "
                               f"on {socket.gethostname()} (another run on this host?); set {setting} to a "
                               "free port, or 0 for no exporter") from e


class NullMetrics:
    """The exporter's interface, doing nothing (metrics.port = 0)."""

    url: str | None = None

    def step(self, *, seconds: float, samples: int, loss: float, grad_norm: float,
             lrs: dict[str, float], step: int) -> None:
        """Record one optimizer step."""

    def data_wait(self, seconds: float) -> None:
        """Add time the step spent waiting for data."""

    def corrupt(self, count: int) -> None:
        """Add corrupt samples skipped by the loader."""

    def buckets(self, samples: dict[str, int], slots: dict[str, int]) -> None:
        """Add real samples and micro-batch slots delivered, by bucket (since the last call)."""

    def checkpoint_saved(self, seconds: float) -> None:
        """Record one checkpoint save (+ upload)."""

    def world(self, size: int, restarts: int) -> None:
        """Worker-group size and restarts since the run began."""

    def close(self) -> None:
        """Stop serving."""


class TrainMetrics(NullMetrics):
    """A prometheus-client exporter for one worker, on its own registry and port."""

    def __init__(self, run: str, rank: int, port: int, addr: str = "0.0.0.0") -> None:
        r = self.registry = CollectorRegistry()
        self._labels = {"run": safe_label(run, "run.name"), "rank": str(int(rank)),
                        "node": safe_label(socket.gethostname(), "hostname")}
        names = list(LABELS)

        def bound(metric):  # every series of this worker carries the same three labels
            return metric.labels(**self._labels)

        self._step_seconds = bound(Histogram("trip_train_step_seconds", "Seconds per optimizer step", names,
                                             buckets=STEP_BUCKETS, registry=r))
        self._samples = bound(Counter("trip_train_samples", "Samples trained on by this rank", names, registry=r))
        self._steps = bound(Counter("trip_train_steps", "Optimizer steps completed", names, registry=r))
        self._loss = bound(Gauge("trip_train_loss", "Loss of the last step on this rank", names, registry=r))
        self._grad_norm = bound(Gauge("trip_train_grad_norm", "Global gradient norm of the last step", names,
                                      registry=r))
        self._lr = Gauge("trip_train_lr", "Learning rate per parameter group", names + ["group"], registry=r)
        self._wait = bound(Counter("trip_data_wait_seconds", "Seconds the steps waited for data", names,
                                   registry=r))
        self._corrupt = bound(Counter("trip_data_corrupt_samples", "Corrupt samples skipped", names, registry=r))
        self._bucket_samples = Counter("trip_data_bucket_samples", "Samples trained on, by dataset bucket",
                                       names + ["bucket"], registry=r)
        self._bucket_slots = Counter("trip_data_bucket_slots", "Micro-batch slots (real, padding and corrupt), "
                                     "by dataset bucket", names + ["bucket"], registry=r)
        self._save = bound(Histogram("trip_checkpoint_save_seconds", "Seconds to save and upload a checkpoint",
                                     names, buckets=SAVE_BUCKETS, registry=r))
        self._world = bound(Gauge("trip_train_world_size", "Workers in the training group", names, registry=r))
        self._restarts = bound(Counter("trip_train_restarts", "Worker-group restarts since the run began", names,
                                       registry=r))
        self._global_step = bound(Gauge("trip_train_step", "Current global step", names, registry=r))
        self._last = bound(Gauge("trip_train_last_step_timestamp_seconds", "Unix time of the last step", names,
                                 registry=r))
        self._gpu: tuple | None = None
        import torch

        if torch.cuda.is_available():
            self._gpu = (bound(Gauge("trip_gpu_memory_allocated_bytes", "CUDA memory allocated", names, registry=r)),
                         bound(Gauge("trip_gpu_memory_reserved_bytes", "CUDA memory reserved", names, registry=r)))
        self._server, self._thread = serve_metrics(port, addr, r)
        self.url = f"http://{'127.0.0.1' if addr in ('', '0.0.0.0') else addr}:{port}/metrics"

    def step(self, *, seconds: float, samples: int, loss: float, grad_norm: float,
             lrs: dict[str, float], step: int) -> None:
        self._step_seconds.observe(seconds)
        self._samples.inc(samples)
        self._steps.inc()
        self._loss.set(loss)
        self._grad_norm.set(grad_norm)
        for group, lr in lrs.items():
            self._lr.labels(**self._labels, group=safe_label(group, "param group")).set(lr)
        self._global_step.set(step)
        self._last.set(time.time())
        if self._gpu is not None:
            import torch

            self._gpu[0].set(torch.cuda.memory_allocated())
            self._gpu[1].set(torch.cuda.memory_reserved())

    def data_wait(self, seconds: float) -> None:
        self._wait.inc(max(seconds, 0.0))

    def corrupt(self, count: int) -> None:
        if count > 0:
            self._corrupt.inc(count)

    def buckets(self, samples: dict[str, int], slots: dict[str, int]) -> None:
        for name in slots:  # bucket names come from index.json: checked like any label value
            label = {**self._labels, "bucket": safe_label(name, "bucket name")}
            self._bucket_samples.labels(**label).inc(samples.get(name, 0))
            self._bucket_slots.labels(**label).inc(slots[name])

    def checkpoint_saved(self, seconds: float) -> None:
        self._save.observe(seconds)

    def world(self, size: int, restarts: int) -> None:
        self._world.set(size)
        if restarts > 0:
            self._restarts.inc(restarts)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def build_metrics(run: str, rank: int, local_rank: int, port: int, addr: str = "0.0.0.0") -> NullMetrics:
    """The worker's exporter on port + local_rank, or NullMetrics when port is 0."""
    if not port:
        return NullMetrics()
    return TrainMetrics(run, rank, port + local_rank, addr)
