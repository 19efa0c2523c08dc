"""Which training errors a restart cannot fix, and the Ray Train hook that ends the run on one.

Ray Train restarts the whole worker group after any worker error, up to `run.max_failures`.
That is right for a worker death, a preemption or a storage hiccup: the next attempt resumes
from the last checkpoint and goes on. It is wrong for an error that the same data and config
raise again: a shard past `data.max_corrupt_fraction` (`CorruptDataError`), a bad config
(`ConfigError`), a shape mismatch or a wrong argument (`ValueError`, `TypeError`) raised by
our own code. Retrying those only delays the message by `max_failures` attempts.

Two halves, because only the worker has the traceback and only the controller decides:
- in the worker, `train_loop_per_worker` re-raises such an error as `FatalTrainingError`
  ("CorruptDataError: 2 corrupt samples on rank 1 ...", the original type and text);
- on the Ray Train controller, `StopOnFatalError` (a `ray.train.UserCallback`, passed in the
  RunConfig's callbacks) sees the workers' exceptions in `after_exception` and raises the
  first fatal one. Ray Train treats an exception in a callback as a controller error, which
  its failure policy never retries (Ray 2.60: `DefaultFailurePolicy`), so the run ends after
  this attempt and `TorchTrainer.fit()` raises `ray.train.ControllerError` carrying our error,
  which `pipelines.train.run_training` unwraps.

A `ValueError`/`TypeError` from a dependency (a JSON decode of a half-read file, an odd reply
from storage) may be transient and is still retried, as are `OSError`, connection errors,
`Preempted` and anything else: the safe side is the old behaviour.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import ray.train

from trip.config import ConfigError

OUR_PACKAGES = ("trip", "data_tools", "pipelines")  # code here raising ValueError/TypeError is ours


class FatalTrainingError(RuntimeError):
    """A worker error that a restart would repeat; the message names its type and text."""

    @classmethod
    def wrap(cls, error: BaseException, rank: int) -> FatalTrainingError:
        return cls(f"{type(error).__name__} on rank {rank}: {error} "
                   f"(not retried: a restart would fail the same way)")


def _innermost_module(tb: TracebackType | None) -> str:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""


def is_fatal(error: BaseException) -> bool:
    """Whether restarting the worker group would only raise `error` again."""
    from trip.data import CorruptDataError  # imports torch: only ever called in a worker

    if isinstance(error, (CorruptDataError, ConfigError)):
        return True
    if isinstance(error, (ValueError, TypeError)):
        return _innermost_module(error.__traceback__).split(".")[0] in OUR_PACKAGES
    return False


class StopOnFatalError(ray.train.UserCallback):
    """Runs on the Ray Train controller: a `FatalTrainingError` on any rank ends the run."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, FatalTrainingError):
                raise error
