"""Callbacks: code of yours that the training loop runs on every rank.

Pass instances to `pipelines.train.run_training(cfg, callbacks=[...])` (or `main(argv,
callbacks=[...])`). They travel to the Ray Train workers pickled with cloudpickle, so keep
them small and make their class importable there (a module under the driver's working
directory, which Ray puts on the workers' path, or the driver's `__main__`).

    class PrintLoss(TrainCallback):
        def on_step(self, worker, step):
            if worker.rank == 0 and step.step % 100 == 0:
                print(step.step, step.loss)

A callback runs on the training path: whatever it spends, the step spends. An exception
it raises fails the worker (and Ray Train restarts the group up to `run.max_failures` times,
unless it is one a restart would repeat: see `trip.train.failures`).
`on_checkpoint` runs on rank 0's checkpoint-writer thread, not the training thread.

`RecordSteps` is the one shipped here: it writes which samples each rank trained on at
each step of each attempt, to audit a run's data order (every sample once per epoch,
across restarts and resizes); the fault-tolerance tests and benchmarks read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerInfo:
    """One rank of one attempt (a start of the worker group), as it begins training."""

    rank: int
    world_size: int
    pid: int
    attempt: float  # the same on every rank of an attempt, different for the next one
    start_step: int  # the step it resumed from (0 for a fresh run)
    restarts: int
    partition_fraction: float  # the share of the partitioned parameters this rank holds
    resume_bytes: int  # what this rank read from storage to resume


@dataclass(frozen=True)
class StepInfo:
    """One finished optimizer step on one rank."""

    step: int  # 1-based, after the update
    loss: float  # this rank's mean per-sample loss
    samples: int  # samples this rank trained on in this step
    seconds: float
    keys: list[str]  # their sample keys, in order
    epochs: list[int]  # the loader's epoch at each micro-batch
    buckets: list[str] = field(default_factory=list)  # the dataset bucket of each micro-batch ("all": no buckets)


class TrainCallback:
    """Override what you need; every method is a no-op here."""

    def on_start(self, worker: WorkerInfo) -> None:
        """After the engine is built and any checkpoint restored, before the first step."""

    def on_step(self, worker: WorkerInfo, step: StepInfo) -> None:
        """After every optimizer step."""

    def on_checkpoint(self, worker: WorkerInfo, step: int, url: str) -> None:
        """Rank 0, once the checkpoint of `step` is committed in storage at `url`."""

    def on_end(self, worker: WorkerInfo, parameters: list[tuple[str, Any]]) -> None:
        """After the last step and its checkpoint: every model parameter as this rank holds it,
        (name, tensor): under ZeRO-3 its flat partition (`trip.train.partitions` says which
        elements), else the whole tensor. Read only; the run is over."""


class RecordSteps(TrainCallback):
    """Writes `worker-rank<r>.json` (the rank's `WorkerInfo`, rewritten at each attempt),
    appends one JSON line per step to `keys-rank<r>.jsonl` (attempt, step, world size,
    epochs, keys, buckets) and one per committed checkpoint to `checkpoints.jsonl` (attempt, step,
    url), under `directory`: a path every worker can write (local runs, or a shared volume)."""

    def __init__(self, directory: str) -> None:
        self.directory = str(directory)

    def on_start(self, worker: WorkerInfo) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"worker-rank{worker.rank}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(asdict(worker), fh)
        os.replace(path + ".tmp", path)  # a reader never sees half a file

    def on_step(self, worker: WorkerInfo, step: StepInfo) -> None:
        line = {"attempt": worker.attempt, "step": step.step, "world_size": worker.world_size,
                "epochs": step.epochs, "keys": step.keys, "buckets": step.buckets}
        with open(os.path.join(self.directory, f"keys-rank{worker.rank}.jsonl"), "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def on_checkpoint(self, worker: WorkerInfo, step: int, url: str) -> None:
        with open(os.path.join(self.directory, "checkpoints.jsonl"), "a") as fh:
            fh.write(json.dumps({"attempt": worker.attempt, "step": step, "url": url}) + "\n")
