"""SIGTERM handling of a training rank, in child processes (a real signal each time)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_sigterm_is_recorded_instead_of_killing_the_process():
    done = _run("""
        import os, signal, torch
        from trip.train.preemption import Preemption
        p = Preemption(grace_s=30)
        p.install()
        assert not p.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.agreed(torch.device("cpu")) and 0 < p.seconds_left() <= 30
        p.disarm()
        print("survived")
    """)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr


def test_installed_from_a_non_main_thread_the_handler_reaches_the_main_thread():
    # Ray Train runs the training function in a thread; Python lets only the main thread set
    # signal handlers, so the handler travels there as a pending call
    done = _run("""
        import os, signal, threading, time
        from trip.train.preemption import Preemption
        p = Preemption(grace_s=30)
        t = threading.Thread(target=p.install)
        t.start(); t.join()
        for _ in range(100):  # the main thread runs Python: the pending call runs
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert p.requested_at is not None
        p.disarm()
        print("survived")
    """)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr


def test_the_process_exits_when_the_grace_is_spent():
    t0 = time.monotonic()
    done = _run("""
        import os, signal, time
        from trip.train.preemption import Preemption
        p = Preemption(grace_s=1.0)
        p.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a save that never finishes
        print("not reached")
    """)
    assert done.returncode == 143 and "not reached" not in done.stdout
    assert time.monotonic() - t0 < 20
