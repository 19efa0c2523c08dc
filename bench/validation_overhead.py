"""What validating while training costs the training steps.

    python -m bench.validation_overhead [--steps 160] [--every 40]

Trains the tiny config on 2 CPU workers through the whole stack (Ray Train + DeepSpeed,
local storage) with `train.validate_every`, then reads the run's step history and each
validation's start and end times: the steps that ended while a validation ran took longer
than the others (the validation actor shares the machine's 2 cores with the 2 workers); the
extra seconds of those steps, summed per validation, divided by the time one validation
interval takes without validation, is the stall. Target: <= 0.10 of the interval. The
baseline (median step time outside validations) is measured in the same run. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


def stall_fraction(rows: list[dict], windows: list[tuple[float, float]], every: int, skip: int = 5) -> dict:
    """From history rows (step, time at the step's end) and validation windows (start, end):
    the extra step seconds inside the windows / the seconds of one validation interval."""
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [(r["time"] - p["time"], r["time"]) for p, r in zip(rows, rows[1:]) if r["step"] > skip]
    inside = [d for d, t in steps if any(a <= t <= b + d for a, b in windows)]
    outside = [d for d, t in steps if not any(a <= t <= b + d for a, b in windows)]
    base = statistics.median(outside)
    extra = sum(d - base for d in inside)
    interval = base * every
    return {"step_seconds": base, "steps_during_validation": len(inside),
            "extra_seconds_per_validation": extra / max(len(windows), 1),
            "stall_fraction": extra / max(len(windows), 1) / interval,
            "validation_seconds": statistics.mean(b - a for a, b in windows)}


def main(steps: int = 160, every: int = 40) -> list[dict]:
    from bench.common import row
    from data_tools.synth import write_synthetic_dataset
    from pipelines.train import run_training
    from trip.config import load_config
    from trip.log import init_ray
    from trip.train.checkpoint import RunDir

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    with tempfile.TemporaryDirectory(prefix="trip-valbench-") as work:
        write_synthetic_dataset(f"{work}/data", [32] * 4, latent_shape=(8, 192, 4, 4), text_shape=None)
        write_synthetic_dataset(f"{work}/val", [8], latent_shape=(8, 192, 4, 4), text_shape=None, seed=3)
        cfg = load_config(TINY, [f"data.dataset={work}/data", f"data.validation={work}/val",
                                 f"run.storage_path={work}/runs", f"train.max_steps={steps}",
                                 f"train.checkpoint_every={every}", f"train.validate_every={every}",
                                 f"train.log_every={every}", "metrics.port=0", f"run.output_dir={work}/out"])
        windows: list[tuple[float, float]] = []
        init_ray(address="local", num_cpus=2, include_dashboard=False)
        try:
            run_training(cfg, on_validation=lambda step, f: windows.append((f["started"], f["finished"])))
        finally:
            ray.shutdown()
        rows = RunDir(cfg.run.storage_path, cfg.run.name).history()
    # the last validation runs after the last step: it stalls nothing
    during = [w for w in windows if w[0] < max(r["time"] for r in rows)]
    figs = stall_fraction(rows, during, every)
    print(f"[validation_overhead] {len(windows)} validations of {figs['validation_seconds']:.1f} s each; "
          f"steps {figs['step_seconds']:.3f} s outside them; {figs['steps_during_validation']} steps ran beside one, "
          f"{figs['extra_seconds_per_validation']:.2f} s slower in all per validation = "
          f"{figs['stall_fraction']:.3f} of a {every}-step interval")
    print(json.dumps({"bench": "validation_overhead", "steps": steps, "validate_every": every,
                      **{k: round(v, 4) for k, v in figs.items()}}))
    return [row("validation_overhead", f"training time lost per validation / {every}-step interval",
                figs["stall_fraction"], "target", 0.10)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--every", type=int, default=40, help="train.validate_every (= checkpoint_every)")
    a = ap.parse_args()
    main(a.steps, a.every)
