"""Shared benchmark plumbing: timing and the one table every benchmark prints.

Every benchmark returns rows {"benchmark", "metric", "value", "baseline", "ratio"}: a
figure of ours, the baseline measured in the same run, and ours/baseline. Ratios, not
absolute numbers, are what carries over between machines.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers and torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_it(fn: Callable[[], object], *, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], *, warmup: int = 2,
              iters: int = 5) -> tuple[float, float]:
    """Median seconds of two functions timed alternately, so that load from other processes
    on a shared machine hits both sides alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def row(benchmark: str, metric: str, value: float, baseline_name: str, baseline: float) -> dict:
    """One table row: ratio = value / baseline (the metric name says which way is better)."""
    ratio = value / baseline if baseline else float("nan")
    return {"benchmark": benchmark, "metric": metric, "value": value, "baseline": baseline_name,
            "baseline_value": baseline, "ratio": ratio}


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    head = f"{'benchmark':<28} {'metric':<34} {'ours':>12} {'baseline':<30} {'base value':>12} {'ratio':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['benchmark']:<28} {r['metric']:<34} {r['value']:>12.4g} {r['baseline']:<30} "
              f"{r.get('baseline_value', float('nan')):>12.4g} {r['ratio']:>8.3f}")
