"""Deterministic per-epoch sample order and its split across ranks, rounds and units.

Everything here is pure arithmetic on integers (no I/O, no torch), so the exactly-once
guarantees of the loader can be unit-tested in milliseconds and reasoned about alone.

Vocabulary:
- position: the place of a sample in the epoch's global order, 0 <= p < N. The order
  depends only on (shard sizes, seed, epoch, shuffle_buffer), never on the world size
  or the worker count, so a set of positions means the same samples on any cluster.
- `Intervals`: a set of positions kept as sorted, disjoint half-open ranges (two numpy
  arrays); the loader's state is "the positions of this epoch already delivered".
- remaining index: the i-th position *not yet delivered*. The remaining positions form
  a few maximal ranges, the *fragments*; in remaining-index space a fragment starts at
  the total length of the fragments before it.
- round: G samples across all ranks (`Split.round_size`, default world_size x
  batch_size), e.g. one optimizer step. Rank r takes q_r = G // W (+1 for r < G % W) of
  them in `accum` micro-batches of at most batch_size (the same count on every rank).
  Each rank owns one contiguous run of remaining indices covering all its rounds.
- unit: one sequential reader of a rank's micro-batches (a DataLoader worker, or one of
  two halves read alternately when a rank has fewer than two workers). A unit owns a
  contiguous run of the rank's rounds and delivers them in order, so what it has
  delivered is always a prefix of its sequence; the rank delivers whole rounds from its
  units in turn (`RankPlan`).
- snapping and rotation keep the number of fragments bounded by ranks x units across
  any number of resumes: unit boundaries are placed at fragment starts (snapping) and
  each unit starts reading at the first fragment start it holds (rotation), so partial
  progress eats fragments from their heads instead of cutting new holes into them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)
_EMPTY.flags.writeable = False
_FLUSH_AT = 1024  # pending ranges buffered before a normalisation is forced


def _normalise(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint, non-touching ranges covering the same integers (sort + running max)."""
    keep = ends > starts
    if not keep.all():
        starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return _EMPTY, _EMPTY
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # a range opens a new run when it starts past everything before it (touching ranges merge)
    first = np.flatnonzero(np.concatenate(([True], starts[1:] > reach[:-1])))
    last = np.concatenate((first[1:], [starts.size])) - 1
    return starts[first], reach[last]


class Intervals:
    """A set of non-negative integers stored as sorted disjoint half-open ranges [a, b).

    `add` and `add_range` only buffer; the buffer is normalised (O(R log R)) by the next
    query, so recording a batch costs almost nothing.
    """

    __slots__ = ("_starts", "_ends", "_pending", "_pending_ranges", "_offsets")

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        pairs = np.asarray(ranges if isinstance(ranges, (list, tuple, np.ndarray)) else list(ranges),
                           dtype=np.int64)
        if pairs.size and (pairs.ndim != 2 or pairs.shape[1] != 2):
            raise ValueError(f"Intervals takes (start, stop) pairs, got an array of shape {pairs.shape}")
        pairs = pairs.reshape(-1, 2)
        self._set(*_normalise(pairs[:, 0], pairs[:, 1]))

    def _set(self, starts: np.ndarray, ends: np.ndarray) -> None:
        starts.flags.writeable = ends.flags.writeable = False  # shared by copies and callers
        self._starts, self._ends = starts, ends
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_ranges = 0
        self._offsets: np.ndarray | None = None

    @classmethod
    def _normalised(cls, starts: np.ndarray, ends: np.ndarray) -> Intervals:
        """Wrap arrays that are already sorted, disjoint and non-touching (no check)."""
        out = cls.__new__(cls)
        out._set(np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(ends, dtype=np.int64))
        return out

    @classmethod
    def union_all(cls, sets: Iterable[Intervals]) -> Intervals:
        """The union of many sets, normalised once: O(R log R) in their total range count."""
        parts = [s._flush() for s in sets]
        if not parts:
            return cls()
        return cls._normalised(*_normalise(np.concatenate([p[0] for p in parts]),
                                           np.concatenate([p[1] for p in parts])))

    # -------------------------------------------------------------- building
    def _push(self, starts: np.ndarray, ends: np.ndarray) -> None:
        self._pending.append((starts, ends))
        self._pending_ranges += starts.size
        self._offsets = None
        if self._pending_ranges > max(_FLUSH_AT, self._starts.size):  # amortised O(log R) per range
            self._flush()

    def _flush(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pending:
            starts = np.concatenate([self._starts, *(p[0] for p in self._pending)])
            ends = np.concatenate([self._ends, *(p[1] for p in self._pending)])
            self._set(*_normalise(starts, ends))
        return self._starts, self._ends

    def add_range(self, a: int, b: int) -> None:
        if b > a:
            self._push(np.array([a], dtype=np.int64), np.array([b], dtype=np.int64))

    def add(self, positions: Iterable[int]) -> None:
        """Add individual positions (compressed into runs first, so a batch costs one pending entry)."""
        if isinstance(positions, (np.ndarray, list, tuple)):
            pos = np.asarray(positions, dtype=np.int64).ravel()
        else:
            pos = np.fromiter((int(p) for p in positions), dtype=np.int64)
        if pos.size == 0:
            return
        pos = np.unique(pos)
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        self._push(pos[np.concatenate(([0], breaks))], pos[np.concatenate((breaks - 1, [pos.size - 1]))] + 1)

    def union(self, other: Intervals) -> Intervals:
        return Intervals.union_all((self, other))

    # -------------------------------------------------------------- queries
    @property
    def starts(self) -> np.ndarray:
        """Range starts, increasing (read-only int64 [num_ranges])."""
        return self._flush()[0]

    @property
    def ends(self) -> np.ndarray:
        """Range stops, increasing (read-only int64 [num_ranges])."""
        return self._flush()[1]

    @property
    def offsets(self) -> np.ndarray:
        """offsets[i]: members before range i; offsets[-1] = len (read-only int64 [num_ranges + 1]).

        For a set of remaining positions, offsets[:-1] are the fragment starts in
        remaining-index space.
        """
        starts, ends = self._flush()
        if self._offsets is None:
            self._offsets = np.concatenate(([0], np.cumsum(ends - starts)))
            self._offsets.flags.writeable = False
        return self._offsets

    @property
    def num_ranges(self) -> int:
        return int(self._flush()[0].size)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        starts, ends = self._flush()
        return list(zip(starts.tolist(), ends.tolist()))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __contains__(self, p: int) -> bool:
        starts, ends = self._flush()
        i = int(np.searchsorted(starts, p, side="right")) - 1
        return i >= 0 and p < ends[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Intervals):
            return False
        (a0, a1), (b0, b1) = self._flush(), other._flush()
        return np.array_equal(a0, b0) and np.array_equal(a1, b1)

    def __repr__(self) -> str:
        return f"Intervals({self.ranges})"

    def complement(self, n: int) -> Intervals:
        """[0, n) minus this set."""
        starts, ends = self._flush()
        gap_starts = np.concatenate(([0], ends))
        gap_ends = np.minimum(np.concatenate((starts, [n])), n)
        keep = gap_ends > gap_starts
        return Intervals._normalised(gap_starts[keep], gap_ends[keep])

    def window(self, lo: int, hi: int) -> Intervals:
        """The members in [lo, hi), numbered from lo (a bucket's positions in its own numbering)."""
        starts, ends = self._flush()
        return Intervals(np.stack((np.clip(starts, lo, hi) - lo, np.clip(ends, lo, hi) - lo), axis=1))

    def shifted(self, offset: int) -> Intervals:
        """Every member plus `offset` (a bucket's positions back in the global numbering)."""
        starts, ends = self._flush()
        return Intervals._normalised(starts + offset, ends + offset)

    def _check_indices(self, lo: int, hi: int) -> None:
        if lo < 0 or hi > len(self):
            raise IndexError(f"index out of range for a set of {len(self)}")

    def at(self, indices: np.ndarray) -> np.ndarray:
        """The members at the given ranks of this set in increasing order (int64 [k])."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return indices
        self._check_indices(int(indices.min()), int(indices.max()) + 1)
        offsets = self.offsets
        k = np.searchsorted(offsets, indices, side="right") - 1
        return self._starts[k] + indices - offsets[k]

    def members(self, lo: int | np.ndarray, hi: int | np.ndarray) -> Intervals:
        """The members of ranks lo..hi-1 as a set: `at(range(lo, hi))` without listing them.

        With arrays: the members of the ranks in any of the [lo[i], hi[i]), in one go.
        """
        lo, hi = np.atleast_1d(np.asarray(lo, dtype=np.int64)), np.atleast_1d(np.asarray(hi, dtype=np.int64))
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        if lo.size == 0:
            return Intervals()
        self._check_indices(int(lo.min()), int(hi.max()))
        offsets = self.offsets
        k0 = np.searchsorted(offsets, lo, side="right") - 1
        k1 = np.searchsorted(offsets, hi - 1, side="right") - 1
        count = k1 - k0 + 1  # ranges each rank range spans
        last = np.cumsum(count) - 1
        head = last - count + 1
        k = np.repeat(k0 - head, count) + np.arange(int(count.sum()))
        starts, ends = self._starts[k].copy(), self._ends[k].copy()
        starts[head] += lo - offsets[k0]
        ends[last] = self._starts[k1] + hi - offsets[k1]
        return Intervals._normalised(*_normalise(starts, ends))

    def to_list(self) -> list[list[int]]:
        starts, ends = self._flush()
        return np.stack((starts, ends), axis=1).tolist()


class EpochOrder:
    """The global order of one epoch's samples.

    Shards are permuted by (seed, epoch). Consecutive shards of that order are grouped
    until a group holds at least `shuffle_buffer` samples; the samples of a group are
    permuted together by (seed, epoch, group). The group is the bounded shuffle buffer:
    a reader needs at most one group's shards in memory to produce any of its samples.
    """

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int,
                 salt: Sequence[int] = ()) -> None:
        """`salt`: extra seed words, so the buckets of one dataset are shuffled independently."""
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.epoch, self.salt = int(seed), int(epoch), [int(x) for x in salt]
        order = np.random.default_rng([self.seed, self.epoch, 0, *self.salt]).permutation(len(self.shard_sizes))
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
            perm = np.random.default_rng([self.seed, self.epoch, 1, g, *self.salt]).permutation(sid.size)
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


def _balanced(total: int, parts: int) -> np.ndarray:
    """`total` cut into `parts` sizes as evenly as possible, larger ones first (int64 [parts])."""
    base, extra = divmod(total, parts)
    return base + (np.arange(parts) < extra).astype(np.int64)


def _balanced_start(i: int, total: int, parts: int) -> int:
    """Where part i begins when `total` is cut by `_balanced`."""
    base, extra = divmod(total, parts)
    return i * base + min(i, extra)


def units_per_rank(num_workers: int) -> int:
    """Units a rank's pass is cut into: one per DataLoader worker, but at least two.

    With a single reader (num_workers 0 or 1) it alternates between two units round by
    round; one unit would cut a new hole into a fragment at every resume.
    """
    return max(2, num_workers)


@dataclass(frozen=True)
class Split:
    """How `remaining` samples are dealt to `world_size` ranks, round by round.

    A round is `round_size` samples across all ranks (None: world_size * batch_size).
    Rank r takes q_r = G // W (+1 for r < G % W) samples of each round in `accum`
    micro-batches of at most batch_size (sizes as even as possible, larger first), so
    every rank yields `num_batches` = rounds * accum micro-batches. Rank r owns the
    contiguous remaining indices [start(r), stop(r)): its share of every round.
    drop: only whole rounds are dealt; the rest of this epoch's order (fewer than one
    round) is not delivered this epoch.
    pad: every remaining sample is dealt; the last round's real samples are spread as
    evenly as possible over the ranks and its other slots (the same micro-batch sizes as
    any round) are filled with repeats of the rank's own samples marked invalid.
    With batch_size 1 and G % W != 0 some micro-batches are empty (accum = q_max).
    """

    remaining: int
    world_size: int
    batch_size: int
    pad: bool
    round_size: int | None = None
    micro_batches: int | None = None  # micro-batches per round; None: ceil(max_r q_r / batch_size)

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.batch_size < 1:
            raise ValueError(f"world_size={self.world_size} and batch_size={self.batch_size} must be >= 1")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches} must be >= 1")
        if self.round_size is not None and self.round_size < self.world_size:
            raise ValueError(f"round_size={self.round_size} is smaller than world_size={self.world_size}: "
                             f"every rank needs at least one sample per round")

    @property
    def per_round(self) -> int:
        """G: samples per round across all ranks."""
        return self.world_size * self.batch_size if self.round_size is None else self.round_size

    def share_per_round(self, rank: int) -> int:
        """q_r: samples rank r takes from every (full) round."""
        return (_balanced_start(rank + 1, self.per_round, self.world_size)
                - _balanced_start(rank, self.per_round, self.world_size))

    @property
    def accum(self) -> int:
        """Micro-batches per round, the same on every rank: ceil(max_r q_r / batch_size), or
        `micro_batches` when given (the buckets of a dataset share one count, see `BucketPlan`)."""
        if self.micro_batches is not None:
            return self.micro_batches
        biggest = -(-self.per_round // self.world_size)
        return -(-biggest // self.batch_size)

    @property
    def num_rounds(self) -> int:
        if self.pad:
            return -(-self.remaining // self.per_round)
        return self.remaining // self.per_round

    @property
    def num_batches(self) -> int:
        """Micro-batches every rank yields in this pass."""
        return self.num_rounds * self.accum

    @property
    def dealt(self) -> int:
        """Samples handed to some rank (the rest is the dropped tail)."""
        return self.remaining if self.pad else self.num_rounds * self.per_round

    def start(self, rank: int) -> int:
        if self.num_rounds == 0:
            return 0
        full = self.num_rounds - 1 if self.pad else self.num_rounds
        last = self.dealt - full * self.per_round  # real samples of a padded last round (0 in drop)
        return (full * _balanced_start(rank, self.per_round, self.world_size)
                + _balanced_start(rank, last, self.world_size))

    def stop(self, rank: int) -> int:
        return self.start(rank + 1)

    def round_batch_sizes(self, rank: int) -> np.ndarray:
        """Slots of each of rank's micro-batches within one round (int64 [accum])."""
        return _balanced(self.share_per_round(rank), self.accum)

    def batch_sizes(self, rank: int) -> np.ndarray:
        """Slots of each of rank's micro-batches in this pass (int64 [num_batches])."""
        return np.tile(self.round_batch_sizes(rank), self.num_rounds)

    def batch_offsets(self, rank: int, batches: np.ndarray) -> np.ndarray:
        """The rank-local slot where each given micro-batch begins (num_batches: all slots)."""
        batches = np.asarray(batches, dtype=np.int64)
        within = np.concatenate(([0], np.cumsum(self.round_batch_sizes(rank))))
        return batches // self.accum * self.share_per_round(rank) + within[batches % self.accum]

    def worker_batches(self, worker: int, num_workers: int) -> range:
        """The rank-local batch indices worker `worker` produces (contiguous, balanced)."""
        lo = _balanced_start(worker, self.num_batches, num_workers)
        return range(lo, _balanced_start(worker + 1, self.num_batches, num_workers))

    def padding_source(self, rank: int, pad: np.ndarray) -> np.ndarray:
        """Remaining indices repeated by the rank's padding slots 0, 1, ...: its own samples in
        turn; a rank dealt none borrows any sample."""
        a, b = self.start(rank), self.stop(rank)
        return a + pad % (b - a) if b > a else pad % max(1, self.remaining)

    def batch_indices(self, rank: int, batches: range) -> tuple[np.ndarray, np.ndarray]:
        """Remaining indices filling `batches` of `rank`, and which are real (not padding).

        Rank-local order: the rank's run, then its padding (the loader delivers the same
        samples and repeats in `RankPlan`'s order). Returns int64 [slots] and bool [slots], the
        micro-batches' slots one after another (len(batches) * batch_size slots for the
        default round size).
        """
        lo, hi = self.batch_offsets(rank, np.array([batches.start, batches.stop]))
        local = np.arange(lo, hi, dtype=np.int64)
        share = self.stop(rank) - self.start(rank)
        valid = local < share
        idx = self.start(rank) + local
        idx[~valid] = self.padding_source(rank, local[~valid] - share)
        return idx, valid


@dataclass(frozen=True)
class Unit:
    """One sequential reader's share of a rank's pass (see `RankPlan`)."""

    batches: range  # the rank-local micro-batches it owns (whole rounds)
    real: tuple[int, int]  # remaining indices [a, b) of its real samples
    first: int  # delivery starts here: [first, b), then [a, first), then `padding` slots
    padding: int  # padding slots at its end (only the unit delivering the rank's last round has any)


class RankPlan:
    """Rank `rank`'s micro-batches of one pass, cut into units and ordered for delivery.

    A unit owns a contiguous run of the rank's rounds (accum micro-batches each) and
    yields them in order; the rank delivers whole rounds from its units in turn (a
    DataLoader item is one round), so every accum consecutive micro-batches the training
    step takes hold exactly the rank's q_r samples of a round. The padding of a padded
    pass sits in the round the rank delivers last.
    Snapping: the round boundary at or before every fragment start inside the rank's run
    is a candidate (S). If |S| >= ceil(units / 2), the rank uses min(|S|, units) units:
    unit 0 starts at the first round, the others at candidates (not the first, which
    unit 0 holds) closest to an even split, so every unit holds a fragment start.
    Otherwise (and always when the remaining positions are one fragment, e.g. a fresh
    epoch) the rounds are split evenly into `units` (shorter units first, so the last
    unit, which holds any padding, delivers last).
    Rotation: a unit delivers its real samples from the first fragment start it holds to
    its end, then its head, then its padding. A fragment shared by two neighbouring units
    is thus eaten from its head by the first and left untouched by the second (for which
    it is the head, delivered last), so partial progress shortens fragments instead of
    cutting new holes into them.
    Both only permute and partition the rank's own slots: exactly-once is untouched.
    """

    def __init__(self, remaining: Intervals, split: Split, rank: int, units: int,
                 bounds: Sequence[int] | None = None) -> None:
        """`bounds`: the units' round boundaries (units + 1 of them, 0 first, num_rounds last)
        instead of snapping or an even split; `BucketPlan` sets them so every rank cuts its
        rounds alike. The last unit holding rounds then delivers the padded round."""
        if len(remaining) != split.remaining:
            raise ValueError(f"the split is for {split.remaining} remaining samples, the set holds {len(remaining)}")
        if units < 1:
            raise ValueError(f"units={units} must be >= 1")
        self.remaining, self.split, self.rank = remaining, split, rank
        self._accum, self._per_round = split.accum, split.share_per_round(rank)
        self._round_sizes = split.round_batch_sizes(rank)
        self._within = [0, *np.cumsum(self._round_sizes).tolist()]
        start, stop, rounds = split.start(rank), split.stop(rank), split.num_rounds
        fragments = remaining.offsets[:-1]  # fragment starts, remaining-index space
        lo, hi = np.searchsorted(fragments, (start, stop))
        inside = fragments[lo:hi].tolist()  # (small lists from here on: plain Python is fastest)
        snapped = sorted({(f - start) // self._per_round for f in inside})  # the round holding each
        self.snapped = bounds is None and remaining.num_ranges > 1 and len(snapped) >= -(-units // 2)
        if bounds is not None:
            bounds = [int(b) for b in bounds]
            if len(bounds) != units + 1 or bounds[0] != 0 or bounds[-1] != rounds or bounds != sorted(bounds):
                raise ValueError(f"bounds {bounds} are not {units} units' boundaries over {rounds} rounds")
        elif self.snapped:
            bounds = _snapped_bounds(rounds, min(len(snapped), units), snapped[1:])
        else:
            bounds = [rounds - _balanced_start(units - i, rounds, units) for i in range(units + 1)]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        padding = [0] * len(lengths)
        if rounds and bounds is not None:  # the last unit holding rounds holds the last round
            padding[max(u for u, n in enumerate(lengths) if n)] = rounds * self._per_round - stop + start
        elif rounds:  # the last unit of the longest ones delivers the rank's last round
            padding[len(lengths) - 1 - lengths[::-1].index(max(lengths))] = rounds * self._per_round - stop + start
        real = [start]
        for n, pad in zip(lengths, padding):
            real.append(real[-1] + n * self._per_round - pad)
        self.units = []
        for u, pad in enumerate(padding):
            a, b = real[u], real[u + 1]
            k = bisect.bisect_left(inside, a)
            first = inside[k] if k < len(inside) and inside[k] < b else a
            self.units.append(Unit(batches=range(bounds[u] * self._accum, bounds[u + 1] * self._accum),
                                   real=(a, b), first=first, padding=pad))

    def batch_sizes(self, unit: int) -> np.ndarray:
        """Slots of each of the unit's micro-batches in delivery order (int64)."""
        r = self.units[unit].batches
        return np.tile(self._round_sizes, len(r) // self._accum)

    def _slot_count(self, unit: int, batches: int | None) -> int:
        """Slots in the unit's first `batches` micro-batches (all when None)."""
        u = self.units[unit]
        rounds, j = divmod(len(u.batches) if batches is None else min(batches, len(u.batches)), self._accum)
        return rounds * self._per_round + self._within[j]

    def slots(self, unit: int, batches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Remaining indices and validity of the unit's first `batches` micro-batches (all
        when None), slot after slot in delivery order (int64 [k], bool [k])."""
        u, n = self.units[unit], self._slot_count(unit, batches)
        (a, b), c = u.real, u.first
        real = np.concatenate((np.arange(c, b, dtype=np.int64), np.arange(a, c, dtype=np.int64)))[:n]
        pad = self.split.padding_source(self.rank, np.arange(n - real.size, dtype=np.int64))
        return np.concatenate((real, pad)), np.arange(n) < real.size

    def micro_batches(self, unit: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positions, valid) of each of the unit's micro-batches, in delivery order."""
        idx, valid = self.slots(unit)
        sizes = self.batch_sizes(unit)
        if sizes.size == 0:
            return []
        cuts = np.cumsum(sizes)[:-1]
        return list(zip(np.split(self.remaining.at(idx), cuts), np.split(valid, cuts)))

    def _delivered_ranges(self, unit: int, batches: int) -> list[tuple[int, int]]:
        """Remaining-index ranges of the real samples in the unit's first `batches` micro-batches."""
        u = self.units[unit]
        (a, b), c = u.real, u.first
        n = min(self._slot_count(unit, batches), b - a)
        return [(c, min(b, c + n)), (a, a + n - (b - c))]  # the second is empty until it wraps

    def _positions_of(self, ranges: list[tuple[int, int]]) -> Intervals:
        lo, hi = zip(*ranges) if ranges else ((), ())
        return self.remaining.members(np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64))

    def unit_delivered(self, unit: int, batches: int) -> Intervals:
        """Positions of the real samples in the unit's first `batches` micro-batches,
        computed from ranges (cheap at any size)."""
        return self._positions_of(self._delivered_ranges(unit, batches))

    def delivery_counts(self, batches: int) -> list[int]:
        """Micro-batches each unit has delivered once the rank delivered `batches`: units
        answer in turn with a whole round each, skipping finished ones (as a DataLoader
        does with its workers)."""
        rounds = [len(u.batches) // self._accum for u in self.units]
        full, part = divmod(min(batches, sum(rounds) * self._accum), self._accum)
        counts = [0] * len(rounds)
        while True:  # whole turns of every unfinished unit, then the first `full` of a last turn
            active = [u for u, n in enumerate(rounds) if counts[u] < n]
            if full < len(active) or not active:
                out = [(c + (u in active[:full])) * self._accum for u, c in enumerate(counts)]
                if part:  # the next one is part-way through a round
                    out[active[full]] += part
                return out
            take = min(full // len(active), min(rounds[u] - counts[u] for u in active))
            for u in active:
                counts[u] += take
            full -= take * len(active)

    def delivered(self, batches: int) -> Intervals:
        """Positions of the real samples the rank has delivered after `batches` micro-batches."""
        counts = self.delivery_counts(batches)
        return self._positions_of([r for u, n in enumerate(counts) for r in self._delivered_ranges(u, n)])


def _snapped_bounds(num_rounds: int, units: int, candidates: list[int]) -> list[int]:
    """Unit boundaries 0 < b_1 < ... < b_{units-1} < num_rounds picked from `candidates`
    (sorted, at least units - 1 of them), each as close as possible to an even split."""
    bounds, j = [0], 0
    for i in range(1, units):
        last = len(candidates) - (units - i)  # leave one candidate for each later unit
        target = _balanced_start(i, num_rounds, units)
        p = min(max(bisect.bisect_left(candidates, target, j, last + 1), j), last)
        if p > j and target - candidates[p - 1] <= candidates[p] - target:
            p -= 1  # the one below is at least as close
        bounds.append(candidates[p])
        j = p + 1
    return [*bounds, num_rounds]


# --------------------------------------------------------------------------- buckets


def bucket_schedule(rounds: Sequence[int], *, seed: int, epoch: int,
                    weights: Sequence[float] | None = None) -> np.ndarray:
    """Which bucket each of a pass's rounds comes from (int64 [sum(rounds)]).

    Every round of bucket b gets the key log(u) / w_b, u uniform from (seed, epoch, the
    round counts); rounds are taken by decreasing key. With equal weights this is a
    uniformly random order of the rounds, so buckets are drawn in proportion to the rounds
    they have left at every point of the pass; a weight above 1 draws a bucket's rounds
    earlier (sooner, not more often: each round is still delivered once). Depends on
    nothing per rank, so every rank computes the same schedule.
    """
    rounds = np.asarray(rounds, dtype=np.int64)
    ids = np.repeat(np.arange(rounds.size, dtype=np.int64), rounds)
    if ids.size == 0:
        return ids
    w = np.ones(rounds.size) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != rounds.shape or not np.all(w > 0):
        raise ValueError(f"bucket weights {list(w)} must be one positive number per bucket ({rounds.size})")
    u = np.random.default_rng([int(seed), int(epoch), 2, *rounds.tolist()]).random(ids.size)
    keys = np.log(np.maximum(u, np.finfo(np.float64).tiny)) / w[ids]
    return ids[np.argsort(-keys, kind="stable")]


class BucketPlan:
    """Rank `rank`'s rounds of one pass over a bucketed dataset, cut into units.

    Each bucket has its own positions (an `EpochOrder` over its shards), its own remaining
    set and its own `Split` (round size G_b, micro-batch size B_b); all buckets share the
    number of micro-batches per round, so every optimizer step takes the same count. The
    pass is a sequence of K rounds, `schedule[k]` naming the bucket of round k, the same on
    every rank. Unit u owns schedule items u, u + U, u + 2U, ... and yields them in order;
    units deliver in turn, a round each, as DataLoader workers do, so a rank delivers its
    rounds in schedule order: the t-th round is the same bucket on every rank. In bucket
    b, unit u owns as many of the rank's rounds of b as it has items of b, as one
    contiguous run (unit 0 first), given to b's `RankPlan` as forced unit bounds: a unit
    reads one region of each bucket's order, and no per-rank snapping breaks the
    lockstep (rotation still starts each unit at the first fragment start it holds).
    A dataset with one bucket uses its `RankPlan` as it is, snapping included.
    """

    def __init__(self, remaining: Sequence[Intervals], splits: Sequence[Split], rank: int, units: int,
                 schedule: np.ndarray) -> None:
        accums = {s.accum for s in splits}
        if len(accums) != 1:
            raise ValueError(f"the buckets' splits have different micro-batches per round: {sorted(accums)}")
        self.accum = accums.pop()
        self.rank = rank
        self.schedule = np.asarray(schedule, dtype=np.int64)
        rounds = [s.num_rounds for s in splits]
        if np.bincount(self.schedule, minlength=len(splits)).tolist() != rounds:
            raise ValueError(f"the schedule does not hold each bucket's rounds {rounds}")
        if len(splits) == 1:
            self.plans = [RankPlan(remaining[0], splits[0], rank, units)]
            self.units = len(self.plans[0].units)  # snapping may use fewer
            self._items = [self.schedule[:len(u.batches) // self.accum] for u in self.plans[0].units]
            return
        self.units = units
        self._items = [self.schedule[u::units] for u in range(units)]
        per_unit = np.array([np.bincount(items, minlength=len(splits)) for items in self._items])  # [unit, bucket]
        bounds = np.concatenate((np.zeros((1, len(splits)), dtype=np.int64), np.cumsum(per_unit, axis=0)))
        self.plans = [RankPlan(remaining[b], splits[b], rank, units, bounds=bounds[:, b].tolist())
                      for b in range(len(splits))]

    def unit_items(self, unit: int) -> np.ndarray:
        """The buckets of unit `unit`'s rounds, in its delivery order (int64)."""
        return self._items[unit]

    def delivery_order(self) -> list[tuple[int, int]]:
        """(unit, its item) of every round in the rank's delivery order: units in turn, a round
        each, skipping finished ones."""
        lengths = [items.size for items in self._items]
        return [(u, j) for j in range(max(lengths, default=0)) for u in range(self.units) if j < lengths[u]]

    def delivered(self, rounds: int) -> list[Intervals]:
        """Each bucket's positions (its own numbering) of the real samples the rank has
        delivered after its first `rounds` rounds."""
        done = [0] * self.units
        for u, _ in self.delivery_order()[:rounds]:
            done[u] += 1
        out = []
        for b, plan in enumerate(self.plans):
            ranges = []
            for u in range(self.units):
                own = self.unit_items(u)[:done[u]]
                ranges += plan._delivered_ranges(u, int(np.count_nonzero(own == b)) * self.accum)
            out.append(plan._positions_of(ranges))
        return out
