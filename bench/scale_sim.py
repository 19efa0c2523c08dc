"""The loader's exactly-once state at 512 GPUs x 8 DataLoader workers x 10.7M samples.

A simulation with the real plan and merge code (`trip.data.plan`, `LatentLoader.merge_states`),
positions only (no shards): N samples, `--units` units per rank, a global batch (round) of
8 samples per rank at the largest world size in micro-batches of 4. Each pass of the
resize chain 512 -> 384 -> 512 (and 64 -> 48 -> 64) runs `--steps` rounds on every rank,
then checkpoints the way the training loop does: rank 0's full state plus every other
rank's own_only state, built from the positions it delivered, merged into one state; the
next pass resumes from it at the next world size.

Per checkpoint: the ranges in the merged state (and per rank x unit of the largest world
size), its JSON bytes, the bytes gathered from all ranks and the merge seconds.

Also: the seconds of the checkpoint completeness check (record vs one listing) for a
512- and a 64-rank checkpoint.

Baselines, measured in the same run:
- old merge: the union of W full states (every rank holds the whole restored set) with
  the old list-based `Intervals` (a copy is kept below), on the same states. It is
  quadratic in the ranges of each state (seconds per state at W=512), so it runs on the
  first k states only (at least 2, more within 2 s) and the other W - k are extrapolated
  from the mean time of the measured ones after the first; the output says which k.
- old assignment: the same chain with units split evenly over micro-batches and read
  from their start (no snapping, no rotation), which adds about ranks x units / 4
  fragments per resize.

    python -m bench.scale_sim [--samples 10700000] [--units 8] [--steps 16]

It ends with one JSON line of the figures; `main(argv, extra)` adds `extra` to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import print_table, row, time_it
from trip.data.loader import STATE_VERSION, LatentLoader
from trip.data.plan import Intervals, RankPlan, Split

BATCH = 4  # micro-batch size
PER_RANK = 8  # samples per rank per round at the largest world size of a chain
CHAINS = {"w512": [512, 384, 512], "w64": [64, 48, 64]}


class OldIntervals:
    """The list-based union of the previous `plan.Intervals` (the baseline; add_range is O(R))."""

    def __init__(self, ranges: list[list[int]] | list[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for a, b in ranges:
            self.add_range(int(a), int(b))

    def add_range(self, a: int, b: int) -> None:
        if b <= a:
            return
        out: list[tuple[int, int]] = []
        placed = False
        for lo, hi in self._ranges:
            if hi < a:
                out.append((lo, hi))
            elif b < lo:
                if not placed:
                    out.append((a, b))
                    placed = True
                out.append((lo, hi))
            else:
                a, b = min(a, lo), max(b, hi)
        if not placed:
            out.append((a, b))
        self._ranges = sorted(out)

    def union(self, other: OldIntervals) -> OldIntervals:
        out = OldIntervals(self._ranges)
        for a, b in other._ranges:
            out.add_range(a, b)
        return out


@dataclass
class Checkpoint:
    chain: str
    index: int  # the pass of the chain that ended here
    world: int
    ranges: int
    ranges_over_units: float
    state_bytes: int
    gathered_bytes: int
    merge_seconds: float
    base: Intervals  # the restored set of this pass
    own: list[Intervals]  # what each rank delivered in it


def _state(n: int, consumed: Intervals, **extra: Any) -> dict[str, Any]:
    return {"version": STATE_VERSION, "dataset": "scale-sim", "num_samples": n, "epoch": 0, "seed": 0,
            "shuffle_buffer": 64, "consumed": consumed.to_list(), "exhausted": False, **extra}


def _merge_seconds(states: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
    times, merged = [], {}
    for _ in range(3):
        t0 = time.perf_counter()
        merged = LatentLoader.merge_states(states)
        times.append(time.perf_counter() - t0)
    return merged, statistics.median(times)


def run_chain(name: str, worlds: list[int], n: int, units: int, steps: int) -> list[Checkpoint]:
    """The resize chain with the real plan: every pass runs `steps` rounds, then checkpoints."""
    round_size = max(worlds) * PER_RANK
    state, out = _state(n, Intervals()), []
    for i, world in enumerate(worlds):
        base = Intervals(state["consumed"])
        remaining = base.complement(n)
        split = Split(remaining=len(remaining), world_size=world, batch_size=BATCH, pad=False,
                      round_size=round_size)
        own = [RankPlan(remaining, split, rank, units).delivered(steps * split.accum) for rank in range(world)]
        states = [_state(n, base.union(own[0]))]
        states += [_state(n, mine, own_only=True, restored_epoch=0) for mine in own[1:]]
        gathered = sum(len(json.dumps(s)) for s in states)
        state, seconds = _merge_seconds(states)
        merged = Intervals(state["consumed"])
        if len(merged) != len(base) + sum(len(o) for o in own):
            raise RuntimeError(f"{name}: a position was delivered twice")
        out.append(Checkpoint(name, i, world, merged.num_ranges, merged.num_ranges / (max(worlds) * units),
                              len(json.dumps(state)), gathered, seconds, base, own))
    return out


def old_assignment_ranges(worlds: list[int], n: int, units: int, steps: int) -> list[int]:
    """Ranges in the state after each checkpoint with the old rule: units split the rank's
    micro-batches evenly and read them from their start (no snapping, no rotation)."""
    round_size = max(worlds) * PER_RANK
    consumed, out = Intervals(), []
    for world in worlds:
        remaining = consumed.complement(n)
        split = Split(remaining=len(remaining), world_size=world, batch_size=BATCH, pad=False,
                      round_size=round_size)
        lo, hi = [], []
        for rank in range(world):
            for w in range(units):
                batches = split.worker_batches(w, units)
                taken = range(batches.start, min(batches.stop, batches.start + steps * split.accum // units))
                a, b = split.batch_offsets(rank, np.array([taken.start, taken.stop]))
                lo.append(split.start(rank) + a)
                hi.append(split.start(rank) + b)
        consumed = consumed.union(remaining.members(np.array(lo), np.array(hi)))
        out.append(consumed.num_ranges)
    return out


def old_merge_seconds(c: Checkpoint, budget: float = 2.0) -> tuple[float, int]:
    """Seconds of the old merge of every rank's full state at checkpoint `c`, and how many
    states were actually merged: at least two, more while under `budget` seconds; the rest
    is extrapolated from the mean of the measured states after the first (which merges
    into an empty set, so it is cheaper)."""
    times: list[float] = []
    consumed = OldIntervals()
    for mine in c.own:
        full = c.base.union(mine).to_list()  # as gathered: JSON-like lists
        t0 = time.perf_counter()
        consumed = consumed.union(OldIntervals(full))
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and sum(times) > budget:
            break
    return sum(times) + statistics.mean(times[1:] or times) * (len(c.own) - len(times)), len(times)


def print_checkpoints(checkpoints: list[Checkpoint]) -> None:
    print(f"{'chain':<6} {'pass':>4} {'world':>6} {'ranges':>8} {'ranges/(Wmax x units)':>22} "
          f"{'state JSON B':>13} {'gathered B':>12} {'merge s':>9}")
    for c in checkpoints:
        print(f"{c.chain:<6} {c.index:>4} {c.world:>6} {c.ranges:>8} {c.ranges_over_units:>22.3f} "
              f"{c.state_bytes:>13,} {c.gathered_bytes:>12,} {c.merge_seconds:>9.4f}")


def completeness_seconds(world: int) -> tuple[float, int]:
    """Seconds of `checkpoint.missing_files` on a W-rank checkpoint's record vs its listing (the
    files a ZeRO-3 save writes: 2 DeepSpeed files, a weights and an EMA partition per rank),
    median of 5; and the number of files. One dict lookup per file: O(files)."""
    from trip.train import checkpoint as ckpt

    files = {}
    for r in range(world):
        files[f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = 1000 + r
        files[f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = 2000 + r
        files[ckpt.partition_file("weights", r, world)] = 3000 + r
        files[ckpt.partition_file("ema", r, world)] = 4000 + r
    listing = dict(reversed(list(files.items())))  # a listing comes back in its own order
    assert not ckpt.missing_files(files, listing)
    return time_it(lambda: ckpt.missing_files(files, listing), warmup=0, iters=5), len(files)


def old_completeness_seconds(world: int) -> float:
    """The check before: one glob pattern per rank and file kind, each matched against the
    whole listing with fnmatch (O(W^2)); one run."""
    import fnmatch

    present = [f"ds/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in range(world) for k in ("model", "optim")]
    present += [f"rng/rank{r}.json" for r in range(world)] + ["weights.safetensors", "ema.safetensors"]
    patterns = ["weights.safetensors", "ema.safetensors", "ds/*model_states.pt"]
    for r in range(world):
        patterns += [f"rng/rank{r}.json", f"ds/*zero_pp_rank_{r}_*optim_states.pt", f"ds/*zero_pp_rank_{r}_*model_states.pt"]
    t0 = time.perf_counter()
    assert all(fnmatch.filter(present, pat) for pat in patterns)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None, extra: dict[str, Any] | None = None) -> list[dict]:
    """Runs both chains, prints the tables and the JSON line (with `extra`'s figures added)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_700_000)
    ap.add_argument("--units", type=int, default=8, help="units (DataLoader workers) per rank")
    ap.add_argument("--steps", type=int, default=16, help="rounds every rank runs per pass")
    args = ap.parse_args(argv)
    figures: dict[str, Any] = {}
    rows = []
    for name, worlds in CHAINS.items():
        checkpoints = run_chain(name, worlds, args.samples, args.units, args.steps)
        print(f"\n{name}: {' -> '.join(map(str, worlds))}, N={args.samples:,}, {args.units} units per rank, "
              f"{args.steps} rounds of {max(worlds) * PER_RANK} per pass")
        print_checkpoints(checkpoints)
        last = checkpoints[-1]
        old_seconds, k = old_merge_seconds(last)
        full = [_state(args.samples, last.base.union(mine)) for mine in last.own]
        old_gathered = sum(len(json.dumps(s)) for s in full)
        _, full_seconds = _merge_seconds(full)  # the new merge on the old input: the algorithm alone
        old_ranges = old_assignment_ranges(worlds, args.samples, args.units, args.steps)
        print(f"baseline (last checkpoint): old list union of {last.world} full states "
              f"{old_seconds:.3f} s (measured on {k} of {last.world} states, the rest extrapolated); "
              f"gathered {old_gathered:,} B; the new merge of those {last.world} full states {full_seconds:.3f} s; "
              f"old assignment leaves {old_ranges} ranges after each checkpoint")
        figures.update({
            f"merge_seconds_{name}": max(c.merge_seconds for c in checkpoints),
            f"state_bytes_{name}": max(c.state_bytes for c in checkpoints),
            f"gathered_bytes_{name}": max(c.gathered_bytes for c in checkpoints),
            f"max_ranges_over_units_{name}": max(c.ranges_over_units for c in checkpoints),
            f"baseline_merge_seconds_{name}": old_seconds,
            f"baseline_merge_states_measured_{name}": k,
            f"baseline_gathered_bytes_{name}": old_gathered,
            f"full_states_merge_seconds_{name}": full_seconds,
            f"baseline_ranges_{name}": old_ranges[-1],
            f"ranges_{name}": last.ranges,
        })
        rows += [
            row("scale_sim", f"merge_seconds_{name}", last.merge_seconds, "old union of W full states", old_seconds),
            row("scale_sim", f"gathered_bytes_{name}", last.gathered_bytes, "W full states", old_gathered),
            row("scale_sim", f"state_ranges_{name}", last.ranges, "no snapping/rotation", old_ranges[-1]),
        ]
    for world in (512, 64):
        seconds, files = completeness_seconds(world)
        old = old_completeness_seconds(world)
        figures[f"completeness_seconds_w{world}"] = seconds
        figures[f"baseline_completeness_seconds_w{world}"] = old
        figures[f"checkpoint_files_w{world}"] = files
        print(f"completeness check of a {world}-rank checkpoint ({files} files): {seconds * 1e3:.2f} ms "
              f"(before: glob per rank over the listing, {old * 1e3:.0f} ms)")
        rows.append(row("scale_sim", f"completeness_seconds_w{world}", seconds, "glob per rank (before)", old))
    figures.update(extra or {})
    print()
    print_table(rows)
    print(json.dumps(figures))
    return rows


if __name__ == "__main__":
    main()
