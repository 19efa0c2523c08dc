"""`make bench`: run every benchmark and print one table of ratios.

Each benchmark module exposes `main() -> list[dict]` (default arguments). A benchmark that cannot run
here (e.g. the GPU one on a CPU machine) returns no rows and says why.
"""

from __future__ import annotations

import importlib
import traceback

from bench.common import print_table

BENCHMARKS = ["model_step", "decode", "preprocess_scale", "loader", "buckets", "eval_frechet", "train_overhead", "lora", "gpu_step"]


def main() -> None:
    rows: list[dict] = []
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== bench.{name} ===", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            print(f"skipped: {e}")
            continue
        try:
            rows += module.main() or []
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
    print("\n=== all benchmarks (ratio = ours / baseline) ===")
    print_table(rows)
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
