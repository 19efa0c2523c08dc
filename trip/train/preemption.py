"""Preemption: a SIGTERM checkpoints the whole group at the next step boundary, then exits.

Kubernetes sends SIGTERM to a pod on node drain and spot reclaim and SIGKILL once
`terminationGracePeriodSeconds` have passed (the Helm chart sets it from
`run.preemption_grace_s`). Only the ranks on that node get the signal, so each rank folds
"did I get one?" into a one-element all-reduce (MAX) per step; when any rank did, every
rank saves a checkpoint, waits until it is committed and raises `Preempted`, and Ray
restarts the group from exactly that step. A watchdog ends the process when the grace is
spent whatever it is doing, so a slow save never turns into a SIGKILL mid-write of
something that matters: a checkpoint not committed by then is simply not used.

Python runs signal handlers only in the main thread, and Ray Train runs the training
function in another thread of the worker process. `install` therefore takes the handler
slot when it can (main thread: tests, torchrun) and otherwise chains onto the handler the
worker process already has, from the main thread's next Python bytecode: Ray's own
handler would exit the process at once, ours records the request instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """The group checkpointed and stopped because a worker was told to terminate."""


class Preemption:
    """SIGTERM bookkeeping of one rank."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested_at: float | None = None
        self._watchdog: threading.Timer | None = None
        self.finished = False

    # ------------------------------------------------------------------ the signal
    def request(self, *_: Any) -> None:
        """Record a termination request (signal handler; idempotent) and arm the watchdog.
        After `finish` there is nothing left to save: SIGTERM does what it does by default."""
        if self.finished:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        log.warning("termination requested: checkpointing at the next step, exiting within %.0f s", self.grace_s)
        self._watchdog = threading.Timer(self.grace_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        log.error("preemption grace of %.0f s spent before the checkpoint was committed: exiting now", self.grace_s)
        os._exit(143)  # 128 + SIGTERM, what the process would have exited with

    def install(self) -> None:
        """Route SIGTERM to `request` (see the module docstring for the non-main-thread case)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request)
            return
        _install_from_main_thread(self.request)

    def disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def finish(self) -> None:
        """Training is over on this rank (Ray stops the group with SIGTERM next)."""
        self.finished = True
        self.disarm()

    # ------------------------------------------------------------------ the group
    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to terminate (a collective: call it at
        the same point of every step on every rank)."""
        local = self.requested_at is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def seconds_left(self) -> float:
        if self.requested_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self.requested_at)


_PENDING: list[Any] = []  # C callbacks queued for the main thread: they must outlive the call


def _install_from_main_thread(handler: Any) -> None:
    """Make the main thread install `handler` for SIGTERM at its next Python bytecode.

    A pending call is the interpreter's own way to run a function in the main thread
    (`Py_AddPendingCall`, what signal delivery uses itself). The main thread of a Ray Train
    worker runs the actor's methods, among them the controller's status poll every second
    or so, so the handler is in place a moment after training starts; nothing waits for it."""
    import ctypes

    @ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    def install(_: Any) -> int:
        signal.signal(signal.SIGTERM, handler)
        return 0

    _PENDING.append(install)
    add = ctypes.pythonapi.Py_AddPendingCall
    add.argtypes, add.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    if add(ctypes.cast(install, ctypes.c_void_p), None) != 0:
        log.warning("could not queue the SIGTERM handler for the main thread; preemption saves are off")
