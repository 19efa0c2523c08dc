"""The loader's exactly-once state stays small at 512 ranks x 8 DataLoader workers x 10.7M samples.

Pure plan arithmetic on positions (no shards, no I/O): a chain of interrupted passes at
alternating world sizes, each rank delivering a few micro-batches in the order its units
answer, then a checkpoint merged the way the training loop does it (rank 0's full state
plus every other rank's own_only state), then one pass run to its end. Also: random world
sizes, unit counts, batch and round sizes and progress keep the ranges within ranks x units,
and a merge of own_only states alone is refused while it could miss the restored set.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from trip.data.loader import STATE_VERSION, LatentLoader
from trip.data.plan import Intervals, RankPlan, Split

N = 10_700_000
UNITS = 8  # DataLoader workers per rank
BATCH = 4  # micro-batch size
ROUND = 4096  # global batch: 2 micro-batches per round at 512 ranks, uneven shares at 384 and 448
CHAIN = [512, 384, 512, 448, 512, 384, 512, 448]  # world size of each interrupted pass
STEPS = 3  # micro-batches delivered per unit before each interruption


def _state(consumed: Intervals, **extra: Any) -> dict[str, Any]:
    return {"version": STATE_VERSION, "dataset": "scale", "num_samples": N, "epoch": 0, "seed": 0,
            "shuffle_buffer": 64, "consumed": consumed.to_list(), "exhausted": False, **extra}


def _pass(state: dict[str, Any], world: int, pad: bool, batches: int | None) -> tuple[dict[str, Any], int]:
    """Every rank delivers its first `batches` micro-batches (all if None); returns the merged
    state of the checkpoint taken then and how many positions were delivered."""
    base = Intervals(state["consumed"])
    remaining = base.complement(N)
    split = Split(remaining=len(remaining), world_size=world, batch_size=BATCH, pad=pad, round_size=ROUND)
    own = []
    for rank in range(world):
        plan = RankPlan(remaining, split, rank, UNITS)
        own.append(plan.delivered(split.num_batches if batches is None else batches))
    states = [_state(base.union(own[0]))]
    states += [_state(mine, own_only=True, restored_epoch=0) for mine in own[1:]]
    return LatentLoader.merge_states(states), sum(len(o) for o in own)


@pytest.mark.parametrize("pad", [True, False])
def test_resize_chain_at_512_ranks_keeps_state_small_and_exactly_once(pad: bool) -> None:
    state, delivered = _state(Intervals()), 0
    for world in CHAIN:
        state, got = _pass(state, world, pad, STEPS * UNITS)
        delivered += got
        consumed = Intervals(state["consumed"])
        assert len(consumed) == delivered, "a position was delivered twice"
        assert consumed.num_ranges <= 1.25 * max(CHAIN) * UNITS
        assert len(json.dumps(state)) < 1_000_000
    state, got = _pass(state, max(CHAIN), pad, None)
    delivered += got
    assert len(Intervals(state["consumed"])) == delivered
    assert delivered == N if pad else 0 <= N - delivered < ROUND


def test_ranges_stay_within_ranks_x_units_at_random_sizes_and_progress() -> None:
    rng = np.random.default_rng(7)
    for _ in range(12):
        n, units, batch = int(rng.integers(20_000, 100_000)), int(rng.integers(2, 9)), int(rng.integers(1, 9))
        pad, round_size = bool(rng.integers(2)), int(rng.integers(64, 64 * batch * 3 + 1))
        consumed, delivered, widest = Intervals(), 0, 0
        for _hop in range(8):
            world = int(rng.integers(8, 65))
            widest = max(widest, world)
            remaining = consumed.complement(n)
            split = Split(remaining=len(remaining), world_size=world, batch_size=batch, pad=pad, round_size=round_size)
            own = [RankPlan(remaining, split, rank, units).delivered(int(rng.integers(0, 4 * units * split.accum)))
                   for rank in range(world)]
            delivered += sum(len(o) for o in own)
            consumed = Intervals.union_all([consumed, *own])
            assert len(consumed) == delivered, "a position was delivered twice"
            assert consumed.num_ranges <= 1.25 * widest * units


def test_merging_own_only_states_needs_the_restored_base() -> None:
    own = [_state(Intervals([(r * 10, r * 10 + 3)]), own_only=True, restored_epoch=0) for r in range(4)]
    with pytest.raises(ValueError, match="full state_dict"):
        LatentLoader.merge_states(own)
    merged = LatentLoader.merge_states([_state(Intervals([(0, 3), (100, 200)])), *own[1:]])
    assert merged["consumed"] == [[0, 3], [10, 13], [20, 23], [30, 33], [100, 200]]
    assert "own_only" not in merged and "restored_epoch" not in merged
    # a rank that has rolled into a new epoch since its restore holds that epoch's whole set
    rolled = [dict(s, epoch=1) for s in own]
    assert LatentLoader.merge_states(rolled)["epoch"] == 1
