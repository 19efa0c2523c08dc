"""Training callbacks the fault-tolerance tests register in the workers, and a driver
script that runs `pipelines.train` with them (for tests that need the driver in its own
process, e.g. to resize a `cluster_utils.Cluster` under it):

    python -m tests.integration.callbacks --record DIR [--slow S] CONFIG [--set k=v ...]

Ray puts the driver's working directory on the workers' path, so `tests.integration`
imports there when the driver runs from the repository root."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from trip.train.callbacks import RecordSteps, StepInfo, TrainCallback, WorkerInfo


class SaveParameters(TrainCallback):
    """At the end of a run, writes each rank's view of every parameter (its ZeRO-3 partition)
    to `directory/params-rank<r>-of-<W>.safetensors`, for tests that check what training changed."""

    def __init__(self, directory: str) -> None:
        self.directory = str(directory)

    def on_end(self, worker: WorkerInfo, parameters: list) -> None:
        import os

        from safetensors.torch import save_file

        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"params-rank{worker.rank}-of-{worker.world_size}.safetensors")
        save_file({n: t.detach().cpu().contiguous().clone() for n, t in parameters}, path)


class SlowSteps(TrainCallback):
    """Sleeps after every step, so that a test can kill or resize while a tiny run goes on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step(self, worker: WorkerInfo, step: StepInfo) -> None:
        time.sleep(self.seconds)


class RecordStarts(TrainCallback):
    """Appends one line per rank and attempt (a start of the worker group) to
    `<directory>/starts.jsonl`, so a test can count the attempts of a run."""

    def __init__(self, directory: object) -> None:
        self.directory = str(directory)

    def on_start(self, worker: WorkerInfo) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, "starts.jsonl"), "a") as fh:
            fh.write(json.dumps({"attempt": worker.attempt, "rank": worker.rank}) + "\n")


def recording(directory: object, slow: float = 0.0) -> list[TrainCallback]:
    """RecordSteps into `directory` (worker pids, keys per step), slowed by `slow` s a step."""
    return [RecordSteps(str(directory))] + ([SlowSteps(slow)] if slow else [])


if __name__ == "__main__":
    from pipelines.train import main

    ap = argparse.ArgumentParser()
    ap.add_argument("--record", required=True)
    ap.add_argument("--slow", type=float, default=0.0)
    ours, rest = ap.parse_known_args()
    sys.exit(main(rest, callbacks=recording(ours.record, ours.slow)))
