"""The loader's order and split arithmetic: exactly-once holds before any byte is read."""

from __future__ import annotations

import numpy as np
import pytest

from trip.data.plan import EpochOrder, Intervals, Split


def test_intervals_merge_complement_and_rank_lookup() -> None:
    s = Intervals()
    s.add([5, 6, 7, 1, 2, 9])
    assert s.ranges == [(1, 3), (5, 8), (9, 10)]
    s.add_range(3, 5)
    assert s.ranges == [(1, 8), (9, 10)]
    assert len(s) == 8 and 9 in s and 8 not in s
    assert s.complement(12).ranges == [(0, 1), (8, 9), (10, 12)]
    rest = s.complement(12)
    assert rest.at(np.arange(4)).tolist() == [0, 8, 10, 11]
    with pytest.raises(IndexError):
        rest.at(np.array([4]))
    assert Intervals(s.to_list()) == s


def test_epoch_order_is_a_seeded_permutation_of_every_sample() -> None:
    sizes = [10, 3, 7, 12, 1]
    order = EpochOrder(sizes, seed=1, epoch=0, shuffle_buffer=8)
    assert order.num_samples == sum(sizes)
    shard, ordinal = order.locate(np.arange(order.num_samples))
    pairs = set(zip(shard.tolist(), ordinal.tolist()))
    assert pairs == {(s, i) for s, n in enumerate(sizes) for i in range(n)}
    again = EpochOrder(sizes, seed=1, epoch=0, shuffle_buffer=8).locate(np.arange(order.num_samples))
    assert np.array_equal(again[0], shard) and np.array_equal(again[1], ordinal)
    other = EpochOrder(sizes, seed=1, epoch=1, shuffle_buffer=8).locate(np.arange(order.num_samples))
    assert not (np.array_equal(other[0], shard) and np.array_equal(other[1], ordinal))
    # every group (the shuffle buffer) holds >= shuffle_buffer samples except maybe the last
    assert all(np.diff(order.group_start)[:-1] >= 8)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("remaining,world,batch,workers", [(61, 2, 4, 2), (61, 3, 4, 1), (5, 4, 2, 3),
                                                          (100, 1, 8, 4), (7, 3, 4, 2)])
def test_split_gives_equal_batches_and_deals_each_sample_once(
        remaining: int, world: int, batch: int, workers: int, pad: bool) -> None:
    split = Split(remaining=remaining, world_size=world, batch_size=batch, pad=pad)
    dealt = []
    for rank in range(world):
        per_worker = [split.worker_batches(w, workers) for w in range(workers)]
        assert sum(len(r) for r in per_worker) == split.num_batches
        for r in per_worker:
            idx, valid = split.batch_indices(rank, r)
            assert idx.size == len(r) * batch
            assert ((0 <= idx) & (idx < max(remaining, 1))).all()
            dealt += idx[valid].tolist()
    assert len(dealt) == len(set(dealt)) == split.dealt
    if pad:
        assert split.dealt == remaining
    else:
        assert remaining - split.dealt < world * batch


def _deliver(consumed: Intervals, n: int, order: EpochOrder, world: int, batch: int, workers: int,
             stop_after: int | None) -> tuple[list[int], Intervals]:
    """Simulate one pass of every rank (the first `stop_after` batches of each)."""
    remaining = consumed.complement(n)
    split = Split(remaining=len(remaining), world_size=world, batch_size=batch, pad=True)
    out, state = [], Intervals(consumed.ranges)
    for rank in range(world):
        rows = []
        for w in range(workers):
            idx, valid = split.batch_indices(rank, split.worker_batches(w, workers))
            pos = remaining.at(idx).reshape(-1, batch)
            rows += list(zip(pos, valid.reshape(-1, batch)))
        for pos, valid in rows[:stop_after]:
            out += pos[valid].tolist()
            state.add(pos[valid].tolist())
    return out, state


def test_arithmetic_resume_across_world_sizes_is_exactly_once() -> None:
    sizes = [9, 14, 3, 11, 8]
    order = EpochOrder(sizes, seed=3, epoch=0, shuffle_buffer=10)
    n = order.num_samples
    first, state = _deliver(Intervals(), n, order, world=2, batch=3, workers=2, stop_after=2)
    second, state = _deliver(state, n, order, world=3, batch=2, workers=1, stop_after=1)
    third, state = _deliver(state, n, order, world=1, batch=4, workers=3, stop_after=None)
    everything = first + second + third
    assert sorted(everything) == list(range(n))
    assert len(state) == n


def _delivery_rank(j: int, num_batches: int, workers: int) -> int:
    """The place of rank-local batch j in the round-robin order a DataLoader delivers it in
    (worker w holds a contiguous run of batches; workers answer in turn)."""
    base, extra = divmod(num_batches, workers)
    sizes = [base + (1 if w < extra else 0) for w in range(workers)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    w = int(np.searchsorted(starts, j, side="right") - 1)
    k = j - int(starts[w])  # j is the k-th batch of worker w
    return sum(min(k, s) for s in sizes) + sum(1 for v in range(w) if sizes[v] > k)


def _hop(order: EpochOrder, state: Intervals, world: int, batch: int, workers: int, pad: bool,
         stop: int | None, seen: list[int]) -> Split:
    """Every rank delivers its first `stop` batches (all if None) in DataLoader order."""
    remaining = state.complement(order.num_samples)
    split = Split(remaining=len(remaining), world_size=world, batch_size=batch, pad=pad)
    stop = split.num_batches if stop is None else stop
    for rank in range(world):
        for w in range(workers):
            r = split.worker_batches(w, workers)
            idx, valid = split.batch_indices(rank, r)
            for j in r:
                if _delivery_rank(j, split.num_batches, workers) < stop:
                    sl = slice((j - r.start) * batch, (j - r.start + 1) * batch)
                    pos = remaining.at(idx[sl][valid[sl]]).tolist()
                    seen += pos
                    state.add(pos)
    return split


def test_delivery_rank_matches_round_robin() -> None:
    order = sorted(range(7), key=lambda j: _delivery_rank(j, 7, 3))  # workers hold [0-2], [3-4], [5-6]
    assert order == [0, 3, 5, 1, 4, 6, 2]


def test_randomised_chains_of_resumes_are_exactly_once() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        sizes = rng.integers(1, 30, size=rng.integers(1, 9)).tolist()
        pad = bool(rng.integers(2))
        order = EpochOrder(sizes, seed=int(rng.integers(100)), epoch=0, shuffle_buffer=int(rng.integers(1, 40)))
        state, seen = Intervals(), []
        for _hop_no in range(4):  # up to four interruptions, each resumed at a random size
            split = Split(remaining=len(state.complement(order.num_samples)), world_size=int(rng.integers(1, 5)),
                          batch_size=int(rng.integers(1, 6)), pad=pad)
            if split.num_batches == 0:
                break
            _hop(order, state, split.world_size, split.batch_size, int(rng.integers(1, 4)), pad,
                 int(rng.integers(0, split.num_batches + 1)), seen)
        world, batch = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        last = _hop(order, state, world, batch, int(rng.integers(1, 4)), pad, None, seen)
        assert len(seen) == len(set(seen)), "a sample was delivered twice"
        missing = order.num_samples - len(seen)
        assert missing == 0 if pad else 0 <= missing < world * batch, (sizes, pad, missing, last)
