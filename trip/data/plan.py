"""Deterministic per-epoch sample order and its split across ranks and workers.

Everything here is pure arithmetic on integers (no I/O, no torch), so the exactly-once
guarantees of the loader can be unit-tested in milliseconds and reasoned about alone.

Vocabulary:
- position: the place of a sample in the epoch's global order, 0 <= p < N. The order
  depends only on (shard sizes, seed, epoch, shuffle_buffer), never on the world size
  or the worker count, so a set of positions means the same samples on any cluster.
- `Intervals`: a set of positions kept as sorted, disjoint half-open ranges; the
  loader's state is "the positions of this epoch already delivered" in this form.
- remaining index: the i-th position *not yet delivered*; ranks take contiguous runs of
  remaining indices, workers take contiguous runs of their rank's batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


class Intervals:
    """A set of non-negative integers stored as sorted disjoint half-open ranges [a, b)."""

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for a, b in ranges:
            self.add_range(int(a), int(b))

    # -------------------------------------------------------------- building
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
            else:  # overlapping or touching: absorb into the new range
                a, b = min(a, lo), max(b, hi)
        if not placed:
            out.append((a, b))
        self._ranges = sorted(out)

    def add(self, positions: Iterable[int]) -> None:
        """Add individual positions (compressed into runs first, so a batch costs one merge)."""
        pos = np.unique(np.fromiter((int(p) for p in positions), dtype=np.int64))
        if pos.size == 0:
            return
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        for run in np.split(pos, breaks):
            self.add_range(int(run[0]), int(run[-1]) + 1)

    def union(self, other: Intervals) -> Intervals:
        out = Intervals(self._ranges)
        for a, b in other._ranges:
            out.add_range(a, b)
        return out

    # -------------------------------------------------------------- queries
    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def __len__(self) -> int:
        return sum(b - a for a, b in self._ranges)

    def __contains__(self, p: int) -> bool:
        return any(a <= p < b for a, b in self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intervals) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"Intervals({self._ranges})"

    def complement(self, n: int) -> Intervals:
        """[0, n) minus this set."""
        out, cur = [], 0
        for a, b in self._ranges:
            if a > cur:
                out.append((cur, min(a, n)))
            cur = max(cur, b)
        if cur < n:
            out.append((cur, n))
        return Intervals(r for r in out if r[0] < r[1])

    def at(self, indices: np.ndarray) -> np.ndarray:
        """The members at the given ranks of this set in increasing order (int64 [k])."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return indices
        starts = np.array([a for a, _ in self._ranges], dtype=np.int64)
        lengths = np.array([b - a for a, b in self._ranges], dtype=np.int64)
        ends = np.cumsum(lengths)
        if indices.min() < 0 or indices.max() >= (ends[-1] if ends.size else 0):
            raise IndexError(f"index out of range for a set of {int(ends[-1]) if ends.size else 0}")
        k = np.searchsorted(ends, indices, side="right")
        return starts[k] + indices - (ends[k] - lengths[k])

    def to_list(self) -> list[list[int]]:
        return [[a, b] for a, b in self._ranges]


class EpochOrder:
    """The global order of one epoch's samples.

    Shards are permuted by (seed, epoch). Consecutive shards of that order are grouped
    until a group holds at least `shuffle_buffer` samples; the samples of a group are
    permuted together by (seed, epoch, group). The group is the bounded shuffle buffer:
    a reader needs at most one group's shards in memory to produce any of its samples.
    """

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int) -> None:
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.epoch = int(seed), int(epoch)
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.shard_sizes))
        groups: list[np.ndarray] = []
        current: list[int] = []
        filled = 0
        for s in order:
            current.append(int(s))
            filled += int(self.shard_sizes[s])
            if filled >= max(1, shuffle_buffer):
                groups.append(np.array(current, dtype=np.int64))
                current, filled = [], 0
        if current:
            groups.append(np.array(current, dtype=np.int64))
        self.groups = groups
        sizes = [int(self.shard_sizes[g].sum()) for g in groups]
        self.group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_samples = int(self.group_start[-1])
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _group_items(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, ordinals) of group g's samples in their shuffled order."""
        if g not in self._cache:
            shards = self.groups[g]
            sid = np.repeat(shards, self.shard_sizes[shards])
            ordinal = np.concatenate([np.arange(self.shard_sizes[s]) for s in shards])
            perm = np.random.default_rng([self.seed, self.epoch, 1, g]).permutation(sid.size)
            if len(self._cache) > 8:  # bounded: readers walk groups mostly in order
                self._cache.clear()
            self._cache[g] = (sid[perm], ordinal[perm])
        return self._cache[g]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, ordinal within shard) of each position (int64 [k] each)."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.empty_like(positions)
        ordinal = np.empty_like(positions)
        group = np.searchsorted(self.group_start, positions, side="right") - 1
        for g in np.unique(group):
            mask = group == g
            sid, ords = self._group_items(int(g))
            offset = positions[mask] - self.group_start[g]
            shard[mask], ordinal[mask] = sid[offset], ords[offset]
        return shard, ordinal


@dataclass(frozen=True)
class Split:
    """How `remaining` samples are dealt to `world_size` ranks in batches of `batch_size`.

    Rank r owns the contiguous remaining indices [start(r), stop(r)), sizes balanced to
    within one sample, and yields exactly `num_batches` batches like every other rank.
    drop: only whole rounds of world_size * batch_size samples are dealt; the rest of
    this epoch's order (fewer than one round) is not delivered this epoch.
    pad: every remaining sample is dealt; short batches are filled with repeats of the
    rank's own samples marked invalid.
    """

    remaining: int
    world_size: int
    batch_size: int
    pad: bool

    @property
    def num_batches(self) -> int:
        per_round = self.world_size * self.batch_size
        if self.pad:
            return -(-self.remaining // per_round)
        return self.remaining // per_round

    @property
    def dealt(self) -> int:
        """Samples handed to some rank (the rest is the dropped tail)."""
        return self.remaining if self.pad else self.num_batches * self.world_size * self.batch_size

    def start(self, rank: int) -> int:
        base, extra = divmod(self.dealt, self.world_size)
        return rank * base + min(rank, extra)

    def stop(self, rank: int) -> int:
        return self.start(rank + 1)

    def worker_batches(self, worker: int, num_workers: int) -> range:
        """The rank-local batch indices worker `worker` produces (contiguous, balanced)."""
        base, extra = divmod(self.num_batches, num_workers)
        lo = worker * base + min(worker, extra)
        return range(lo, lo + base + (1 if worker < extra else 0))

    def batch_indices(self, rank: int, batches: range) -> tuple[np.ndarray, np.ndarray]:
        """Remaining indices filling `batches` of `rank`, and which are real (not padding).

        Returns int64 [len(batches) * batch_size] and bool [len(batches) * batch_size].
        """
        a, b = self.start(rank), self.stop(rank)
        local = np.arange(batches.start * self.batch_size, batches.stop * self.batch_size, dtype=np.int64)
        valid = local < b - a
        idx = a + local
        if not valid.all():
            pad = local[~valid] - (b - a)
            # repeats come from the rank's own samples; a rank dealt none borrows any sample
            idx[~valid] = a + pad % (b - a) if b > a else pad % max(1, self.remaining)
        return idx, valid
