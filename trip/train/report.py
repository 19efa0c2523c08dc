"""End-of-run artefacts written by rank 0: a loss/throughput plot (PNG) and summary.json.

Both go to the run's output directory (local path or fsspec URL) via trip.storage, so a
run in object storage leaves them next to nothing on the worker's disk.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from trip import storage
from trip.config import Config


def plot_png(history: list[dict[str, float]], title: str) -> bytes:
    """Loss and samples/s against step, as PNG bytes (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, [h["loss"] for h in history], lw=0.8)
    ax1.set_ylabel("loss (rank 0)")
    ax1.set_yscale("log")
    ax1.set_title(title)
    ax2.plot(steps, [h["samples_per_second"] for h in history], lw=0.8, color="tab:green")
    ax2.set_ylabel("samples/s (global)")
    ax2.set_xlabel("step")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def summarize(history: list[dict[str, float]]) -> dict[str, Any]:
    tail = history[-max(1, len(history) // 10):] if history else []
    return {
        "steps": history[-1]["step"] if history else 0,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "mean_loss_last_10pct": sum(h["loss"] for h in tail) / len(tail) if tail else math.nan,
        "samples_per_second": history[-1]["samples_per_second"] if history else 0.0,
    }


def write_report(out_dir: str, cfg: Config, history: list[dict[str, float]],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write plot.png + summary.json into `out_dir`; returns the summary."""
    plot = storage.join(out_dir, "training.png")
    summary = {**summarize(history), "run": cfg.run.name, "storage_path": cfg.run.storage_path,
               "plot": plot, "summary": storage.join(out_dir, "summary.json"), **(extra or {})}
    if history:
        storage.write_bytes_atomic(plot, plot_png(history, f"TRIP run {cfg.run.name}"))
    storage.write_bytes_atomic(summary["summary"], json.dumps(summary, indent=2).encode())
    return summary
