"""The loader's order and split arithmetic: exactly-once holds before any byte is read."""

from __future__ import annotations

import numpy as np
import pytest

from trip.data.plan import EpochOrder, Intervals, RankPlan, Split


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


# --------------------------------------------------------------------------- Intervals on numpy


def _random_ranges(rng: np.random.Generator, n: int, count: int) -> list[tuple[int, int]]:
    starts = rng.integers(0, n, size=count)
    return [(int(a), int(a + rng.integers(-2, 12))) for a in starts]  # some empty or reversed


def _as_set(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for a, b in ranges for p in range(a, b)}


def _check_normalised(s: Intervals) -> None:
    r = s.ranges
    assert all(isinstance(a, int) and isinstance(b, int) and a < b for a, b in r)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(r, r[1:])), "ranges overlap or touch"
    assert s.num_ranges == len(r) and s.to_list() == [list(x) for x in r]


def test_intervals_agree_with_a_set_oracle_on_random_data() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 80))
        ranges = _random_ranges(rng, n, int(rng.integers(0, 12)))
        s, oracle = Intervals(ranges), _as_set(ranges)
        _check_normalised(s)
        for _step in range(int(rng.integers(0, 4))):  # buffered additions, then queries
            extra = rng.integers(0, n, size=int(rng.integers(0, 10))).tolist()
            s.add(extra)
            a = int(rng.integers(0, n))
            b = a + int(rng.integers(-1, 6))
            s.add_range(a, b)
            oracle |= set(extra) | set(range(a, b))
        _check_normalised(s)
        assert _as_set(s.ranges) == oracle and len(s) == len(oracle)
        assert all((p in s) == (p in oracle) for p in range(-1, n + 14))
        assert Intervals(s.to_list()) == s and repr(s) == f"Intervals({s.ranges})"
        if oracle:
            assert Intervals(s.ranges[:-1]) != s
        rest = s.complement(n)
        _check_normalised(rest)
        assert _as_set(rest.ranges) == set(range(n)) - oracle
        members = sorted(oracle)
        if members:
            idx = rng.integers(0, len(members), size=5)
            assert s.at(idx).tolist() == [members[i] for i in idx]
            lo = int(rng.integers(0, len(members)))
            hi = int(rng.integers(lo, len(members) + 1))
            part = s.members(lo, hi)
            _check_normalised(part)
            assert _as_set(part.ranges) == set(members[lo:hi])
            los = rng.integers(0, len(members), size=4)
            his = los + rng.integers(-1, 5, size=4).clip(max=len(members) - los)
            many = s.members(los, his)  # several rank ranges at once, overlapping or empty
            _check_normalised(many)
            assert _as_set(many.ranges) == {members[i] for a, b in zip(los, his) for i in range(a, b)}
        with pytest.raises(IndexError):
            s.at(np.array([len(members)]))
        other = Intervals(_random_ranges(rng, n, 5))
        union = s.union(other)
        _check_normalised(union)
        assert _as_set(union.ranges) == oracle | _as_set(other.ranges)


def test_union_all_equals_repeated_union() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        sets = [Intervals(_random_ranges(rng, 500, int(rng.integers(0, 20)))) for _ in range(int(rng.integers(0, 8)))]
        for s in sets[::2]:
            s.add(rng.integers(0, 500, size=7).tolist())  # pending additions are included
        expected = Intervals()
        for s in sets:
            expected = expected.union(s)
        assert Intervals.union_all(sets) == expected
        assert Intervals.union_all(iter(sets)).num_ranges == expected.num_ranges


# --------------------------------------------------------------------------- rounds


def test_default_round_size_is_the_old_arithmetic() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        remaining, world, batch, pad = (int(rng.integers(0, 200)), int(rng.integers(1, 9)),
                                        int(rng.integers(1, 7)), bool(rng.integers(2)))
        split = Split(remaining=remaining, world_size=world, batch_size=batch, pad=pad)
        per_round = world * batch
        batches = -(-remaining // per_round) if pad else remaining // per_round
        dealt = remaining if pad else batches * per_round
        base, extra = divmod(dealt, world)
        assert split.num_batches == batches and split.dealt == dealt and split.accum == 1
        for rank in range(world):
            assert split.start(rank) == rank * base + min(rank, extra)
            assert split.batch_sizes(rank).tolist() == [batch] * batches


def test_rounds_deal_an_exact_number_per_round_at_any_world_size() -> None:
    rng = np.random.default_rng(4)
    for _ in range(300):
        world = int(rng.integers(1, 9))
        batch = int(rng.integers(1, 6))
        per_round = int(rng.integers(world, 4 * world * batch + 2))
        remaining = int(rng.integers(0, 5 * per_round))
        pad = bool(rng.integers(2))
        split = Split(remaining=remaining, world_size=world, batch_size=batch, pad=pad, round_size=per_round)
        shares = [split.share_per_round(r) for r in range(world)]
        assert sum(shares) == per_round and max(shares) - min(shares) <= 1
        assert split.accum == -(-max(shares) // batch)
        rounds = -(-remaining // per_round) if pad else remaining // per_round
        assert split.num_batches == rounds * split.accum
        dealt, valid_per_round = [], np.zeros(rounds, dtype=np.int64)
        for rank in range(world):
            sizes = split.batch_sizes(rank)
            assert sizes.size == split.num_batches and (sizes <= batch).all()
            per_round_sizes = sizes.reshape(rounds, split.accum) if rounds else sizes.reshape(0, 1)
            assert (per_round_sizes.sum(axis=1) == shares[rank]).all()
            assert (np.diff(per_round_sizes, axis=1) <= 0).all()  # larger micro-batches first
            assert (per_round_sizes.max(axis=1, initial=0) - per_round_sizes.min(axis=1, initial=batch) <= 1).all()
            idx, valid = split.batch_indices(rank, range(split.num_batches))
            assert idx.size == sizes.sum()
            assert ((0 <= idx) & (idx < max(remaining, 1))).all()
            real = idx[valid]
            assert real.tolist() == list(range(split.start(rank), split.stop(rank)))  # contiguous run
            pad_src = idx[~valid]
            if split.stop(rank) > split.start(rank):  # padding repeats the rank's own samples
                assert ((split.start(rank) <= pad_src) & (pad_src < split.stop(rank))).all()
            dealt += real.tolist()
            if rounds:
                valid_per_round += valid.reshape(rounds, shares[rank]).sum(axis=1)
        assert len(dealt) == len(set(dealt)) == split.dealt
        if pad:
            assert split.dealt == remaining
            assert (valid_per_round[:-1] == per_round).all()  # only the last round is short
        else:
            assert remaining - split.dealt < per_round and (valid_per_round == per_round).all()


def test_round_size_below_world_size_is_refused() -> None:
    with pytest.raises(ValueError, match="round_size=3 is smaller than world_size=4"):
        Split(remaining=10, world_size=4, batch_size=2, pad=True, round_size=3)


# --------------------------------------------------------------------------- units: snapping and rotation


def _fragment_starts(remaining: Intervals) -> np.ndarray:
    return remaining.offsets[:-1]


def test_rank_plan_partitions_the_rank_and_snaps_units_to_fragment_starts() -> None:
    rng = np.random.default_rng(5)
    snapped_plans = 0
    for _ in range(300):
        n = int(rng.integers(20, 400))
        consumed = Intervals(_random_ranges(rng, n, int(rng.integers(0, 40))))
        remaining = consumed.complement(n)
        world, batch, units = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
        split = Split(remaining=len(remaining), world_size=world, batch_size=batch, pad=bool(rng.integers(2)),
                      round_size=int(rng.integers(world, 3 * world * batch + 1)))
        frags = _fragment_starts(remaining)
        for rank in range(world):
            plan = RankPlan(remaining, split, rank, units)
            assert plan.units[0].batches.start == 0 and plan.units[-1].batches.stop == split.num_batches
            assert all(u.batches.stop == v.batches.start for u, v in zip(plan.units, plan.units[1:]))
            a, b = split.start(rank), split.stop(rank)
            inside = frags[(frags >= a) & (frags < b)]
            assert plan.snapped or len(plan.units) == units
            assert sum(u.padding > 0 for u in plan.units) <= 1
            if plan.snapped:  # every unit holds a fragment start and starts reading there
                snapped_plans += 1
                assert -(-units // 2) <= len(plan.units) <= units
                shift = 0  # the padding (< one round) moves the later units' samples: their rounds hold one
                for u in plan.units:
                    lo, hi = u.real[0] + shift, u.real[1] + shift + u.padding
                    assert ((inside >= lo) & (inside < hi)).any()
                    assert u.first in inside or shift or u.padding
                    shift += u.padding
            idx, valid = split.batch_indices(rank, range(split.num_batches))
            got_idx, got_valid = [], []
            for k, u in enumerate(plan.units):
                i, v = plan.slots(k)
                sizes = plan.batch_sizes(k)
                assert i.size == sizes.sum() and (sizes <= batch).all()
                assert len(u.batches) % split.accum == 0  # units own whole rounds
                assert not (~v[:-1] & v[1:]).any(), "padding slots come last"
                got_idx += i.tolist()
                got_valid += v.tolist()
                batches = plan.micro_batches(k)
                assert [p.size for p, _ in batches] == sizes.tolist()
                if u.real[1] > u.real[0]:  # rotation: delivery starts at the unit's first fragment start
                    later = inside[(inside >= u.real[0]) & (inside < u.real[1])]
                    assert i[0] == (later[0] if later.size else u.real[0])
            assert sorted(np.array(got_idx)[got_valid].tolist()) == sorted(idx[valid].tolist())
            assert sum(got_valid) == b - a and len(got_idx) == idx.size
    assert snapped_plans > 50  # the random cases do exercise snapping


def _deliver_prefixes(remaining: Intervals, split: Split, units: int, rng: np.random.Generator,
                      full: bool, seen: list[int]) -> Intervals:
    """Every rank delivers a random prefix of each unit's micro-batches (all if full)."""
    delivered = []
    for rank in range(split.world_size):
        plan = RankPlan(remaining, split, rank, units)
        for k, u in enumerate(plan.units):
            take = len(u.batches) if full else int(rng.integers(0, len(u.batches) + 1))
            pos = [p[v] for p, v in plan.micro_batches(k)[:take]]
            flat = np.concatenate(pos).tolist() if pos else []
            seen += flat
            part = plan.unit_delivered(k, take)
            assert sorted(_as_set(part.ranges)) == sorted(flat)  # the range form agrees
            delivered.append(part)
    return Intervals.union_all(delivered)


def test_snapping_and_rotation_keep_exactly_once_over_random_resume_chains() -> None:
    rng = np.random.default_rng(6)
    for _ in range(120):
        n = int(rng.integers(1, 300))
        pad = bool(rng.integers(2))
        consumed, seen = Intervals(), []
        hops = int(rng.integers(0, 5))
        for hop in range(hops + 1):  # interrupted passes at random sizes, then one run to its end
            remaining = consumed.complement(n)
            world, batch = int(rng.integers(1, 7)), int(rng.integers(1, 5))
            split = Split(remaining=len(remaining), world_size=world, batch_size=batch, pad=pad,
                          round_size=int(rng.integers(world, 2 * world * batch + 2)))
            units = int(rng.integers(1, 9))
            consumed = consumed.union(_deliver_prefixes(remaining, split, units, rng, hop == hops, seen))
            assert len(seen) == len(set(seen)) == len(consumed), "a sample was delivered twice"
        missing = n - len(seen)
        assert missing == 0 if pad else 0 <= missing < split.per_round


def test_units_deliver_whole_rounds_in_turn_and_the_last_round_holds_the_padding() -> None:
    remaining = Intervals([(0, 98)])
    plan = RankPlan(remaining, Split(remaining=98, world_size=1, batch_size=4, pad=True), 0, 3)
    assert [len(u.batches) for u in plan.units] == [8, 8, 9]  # shorter first: the last unit ends last
    assert [u.padding for u in plan.units] == [0, 0, 2]
    assert plan.delivery_counts(0) == [0, 0, 0]
    assert plan.delivery_counts(7) == [3, 2, 2]
    assert plan.delivery_counts(24) == [8, 8, 8] and plan.delivery_counts(99) == [8, 8, 9]
    assert len(plan.delivered(25)) == 98
    # 5 samples per round in micro-batches of 2, 2, 1: a unit answers with a whole round
    split = Split(remaining=40, world_size=1, batch_size=2, pad=False, round_size=5)
    plan = RankPlan(Intervals([(0, 40)]), split, 0, 2)
    assert split.accum == 3 and [len(u.batches) for u in plan.units] == [12, 12]
    assert plan.delivery_counts(4) == [3, 1] and plan.delivery_counts(8) == [5, 3]
    assert plan.batch_sizes(0).tolist() == [2, 2, 1] * 4
    assert len(plan.delivered(6)) == 10
