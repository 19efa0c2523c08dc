"""The bucketed loader: one bucket per micro-batch, the same bucket on every rank at every
round, every sample of every bucket exactly once per epoch across interrupts and resizes.

The pure plan (`trip.data.plan.BucketPlan`) is checked by simulation at sizes the real
loader would take minutes for; the real loader (DataLoader worker processes, shards on
disk) on a small dataset of three buckets of different shapes and frame counts.
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_tools.synth import sample_key, write_synthetic_buckets
from trip.config import DataConfig
from trip.data import LatentLoader
from trip.data.plan import BucketPlan, Intervals, Split, bucket_schedule

# name -> (latent shape [F, C, h, w], shard sizes): landscape, portrait and square, two lengths
BUCKETS = {"land": ((4, 3, 4, 6), [9, 8, 7]), "port": ((4, 3, 6, 4), [6, 5]), "sq": ((2, 3, 4, 4), [10, 3])}
SHAPES = {name: shape for name, (shape, _) in BUCKETS.items()}


def _keys_by_bucket() -> dict[str, set[str]]:
    out, s = {}, 0
    for name, (_, sizes) in BUCKETS.items():
        out[name] = {sample_key(s + j, i) for j, n in enumerate(sizes) for i in range(n)}
        s += len(sizes)
    return out


ALL_BY_BUCKET = _keys_by_bucket()
ALL = set().union(*ALL_BY_BUCKET.values())


@pytest.fixture()
def dataset(tmp_path: Path) -> str:
    write_synthetic_buckets(str(tmp_path / "ds"), BUCKETS)
    return str(tmp_path / "ds")


def _cfg(dataset: str, **kw: Any) -> DataConfig:
    base = dict(dataset=dataset, micro_batch_size=2, num_workers=2, shuffle_buffer=8, uneven="pad", seed=3, retries=1)
    base.update(kw)
    return DataConfig(**base)


def _check(batch: dict[str, Any]) -> list[str]:
    """The batch is one bucket's: its shape, its keys; each tensor belongs to its key."""
    name = batch["bucket"]
    assert tuple(batch["latents"].shape[1:]) == SHAPES[name]
    keys = []
    for i, (key, ok) in enumerate(zip(batch["keys"], batch["valid"].tolist())):
        if ok:
            assert key in ALL_BY_BUCKET[name], (key, name)
            assert batch["latents"][i, 0, 0, 0, :2].tolist() == [int(key[1:5]), int(key[6:])]
            keys.append(key)
    return keys


def _run(cfg: DataConfig, world: int, state: dict | None, rounds: int | None,
         round_size: int | None = None) -> tuple[list[list[tuple[str, list[str]]]], dict]:
    """Every rank's rounds (bucket, valid keys) of one pass, stopped after `rounds` rounds;
    returns them and the merged state (rank 0 full, the others own_only)."""
    out, states = [], []
    for rank in range(world):
        loader = LatentLoader(cfg, rank, world, state=state, round_size=round_size)
        accum, got, current = loader.micro_batches_per_round, [], []
        for n, batch in enumerate(loader, 1):
            current.append(batch)
            if n % accum == 0:
                assert len({b["bucket"] for b in current}) == 1  # a round is one bucket
                got.append((current[0]["bucket"], [k for b in current for k in _check(b)]))
                current = []
                if rounds is not None and len(got) == rounds:
                    break
        out.append(got)
        states.append(json.loads(json.dumps(loader.state_dict(own_only=rank > 0))))
        loader.close()
    return out, LatentLoader.merge_states(states)


def _assert_lockstep(per_rank: list[list[tuple[str, list[str]]]]) -> None:
    schedules = [[b for b, _ in rounds] for rounds in per_rank]
    assert all(s == schedules[0] for s in schedules), schedules


@pytest.mark.parametrize("workers", [0, 2])
def test_every_round_is_one_bucket_on_every_rank_and_the_epoch_covers_all_once(dataset: str, workers: int) -> None:
    per_rank, state = _run(_cfg(dataset, num_workers=workers), 2, None, None)
    _assert_lockstep(per_rank)
    keys = [k for rounds in per_rank for _, ks in rounds for k in ks]
    assert sorted(keys) == sorted(ALL)
    assert state["epoch"] == 1 and state["consumed"] == []  # the pass ran out: the next epoch is whole
    assert {b for b, _ in per_rank[0]} == set(BUCKETS)


def test_interrupts_and_a_2_1_2_resize_deliver_every_bucket_exactly_once(dataset: str) -> None:
    cfg = _cfg(dataset)
    done: list[str] = []
    state = None
    for world, rounds in ((2, 3), (1, 4), (2, 2)):  # each stops part-way, like a SIGKILL after a checkpoint
        per_rank, state = _run(cfg, world, state, rounds)
        _assert_lockstep(per_rank)
        done += [k for r in per_rank for _, ks in r for k in ks]
        assert state["epoch"] == 0
    per_rank, state = _run(_cfg(dataset, num_workers=0), 2, state, None)  # the rest, another worker count
    _assert_lockstep(per_rank)
    done += [k for r in per_rank for _, ks in r for k in ks]
    counts = collections.Counter(done)
    assert set(counts) == ALL and set(counts.values()) == {1}
    nxt, _ = _run(cfg, 1, state, None)  # the next epoch is whole again
    assert sorted(k for _, ks in nxt[0] for k in ks) == sorted(ALL)


def test_small_buckets_are_dropped_or_padded_by_policy_without_empty_passes(dataset: str, caplog) -> None:
    # a round of 16 samples: "port" (11) and "sq" (13) are smaller than one round
    with caplog.at_level(logging.WARNING, logger="trip.data.loader"):
        loader = LatentLoader(_cfg(dataset, uneven="drop", micro_batch_size=8), 0, 2)
    assert "bucket port has 11 samples, fewer than one round of 16" in caplog.text
    per_rank, state = _run(_cfg(dataset, uneven="drop", micro_batch_size=8), 2, None, None)
    assert [b for b, _ in per_rank[0]] == ["land"] and state["epoch"] == 1  # 24 samples: one round
    assert len(loader) == 1 and LatentLoader(_cfg(dataset, uneven="drop", micro_batch_size=8), 0, 2,
                                             state=state).__len__() == 1  # the next epoch, not an empty one
    padded, _ = _run(_cfg(dataset, uneven="pad", micro_batch_size=8), 2, None, None)
    assert sorted(k for r in padded for _, ks in r for k in ks) == sorted(ALL)
    with pytest.raises(ValueError, match="in every bucket: no rank would get a batch"):
        LatentLoader(_cfg(dataset, uneven="drop", micro_batch_size=16), 0, 2)


def test_per_bucket_batch_sizes_keep_the_round_count_and_scale_the_round(dataset: str) -> None:
    cfg = _cfg(dataset, bucket_batch="tokens", micro_batch_size=2)
    loader = LatentLoader(cfg, 0, 2, round_size=4)
    # "sq" clips have a third of the others' latent elements: three times the micro-batch and the round
    sizes = collections.defaultdict(set)
    rounds = collections.defaultdict(set)
    for batch in loader:
        sizes[batch["bucket"]].add(len(batch["valid"]))
        rounds[batch["bucket"]].add(batch["round_size"])
    assert loader.micro_batches_per_round == 1
    assert sizes == {"land": {2}, "port": {2}, "sq": {6}} and rounds == {"land": {4}, "port": {4}, "sq": {12}}
    explicit = LatentLoader(_cfg(dataset, bucket_batch_sizes={"port": 1}), 0, 2, round_size=4)
    assert {b["bucket"]: len(b["valid"]) for b in explicit}["port"] == 1
    with pytest.raises(ValueError, match=r"data.bucket_weights names \['nope'\]"):
        LatentLoader(_cfg(dataset, bucket_weights={"nope": 2.0}), 0, 1)


def test_bucket_counters_and_weights(dataset: str) -> None:
    loader = LatentLoader(_cfg(dataset, num_workers=0), 0, 1)
    list(loader)
    assert dict(loader.bucket_samples) == {n: len(k) for n, k in ALL_BY_BUCKET.items()}
    assert all(loader.bucket_slots[n] >= loader.bucket_samples[n] for n in BUCKETS)
    first = [b["bucket"] for b in LatentLoader(_cfg(dataset, num_workers=0, bucket_weights={"sq": 1000.0}), 0, 1)]
    assert first[:3] == ["sq"] * 3  # a heavy weight draws the bucket's rounds first


# ----------------------------------------------------------------------------- the pure plan


def test_schedule_is_proportional_and_the_same_for_the_same_inputs() -> None:
    s = bucket_schedule([600, 300, 100], seed=1, epoch=0)
    assert np.bincount(s).tolist() == [600, 300, 100]
    assert np.array_equal(s, bucket_schedule([600, 300, 100], seed=1, epoch=0))
    assert not np.array_equal(s, bucket_schedule([600, 300, 100], seed=1, epoch=1))
    for head in (100, 500):  # any prefix draws about in proportion
        share = np.bincount(s[:head], minlength=3) / head
        assert np.abs(share - [0.6, 0.3, 0.1]).max() < 0.1, share


def _simulate(sizes: list[int], worlds: list[int], units: int, batch: int, seed: int) -> int:
    """Passes at the given world sizes, each interrupted at a random round (the last runs
    out); checks lockstep and exactly-once; returns the most fragments any bucket had."""
    rng = np.random.default_rng(seed)
    consumed = [Intervals() for _ in sizes]
    most, delivered = 0, [0] * len(sizes)
    for p, world in enumerate(worlds):
        remaining = [c.complement(n) for c, n in zip(consumed, sizes)]
        most = max(most, max(r.num_ranges for r in remaining))
        splits = [Split(remaining=len(r), world_size=world, batch_size=batch, pad=True, micro_batches=2)
                  for r in remaining]
        schedule = bucket_schedule([s.num_rounds for s in splits], seed=seed, epoch=0)
        plans = [BucketPlan(remaining, splits, rank, units, schedule) for rank in range(world)]
        order = [[int(plans[r].unit_items(u)[j]) for u, j in plans[r].delivery_order()] for r in range(world)]
        assert all(o == order[0] for o in order)  # every rank's t-th round is the same bucket
        last = p == len(worlds) - 1
        stop = len(order[0]) if last else int(rng.integers(0, len(order[0]) + 1))
        for rank in range(world):
            for b, got in enumerate(plans[rank].delivered(stop)):
                merged = consumed[b].union(got)
                assert len(merged) == len(consumed[b]) + len(got)  # nothing delivered twice
                assert len(got) == 0 or got.ends[-1] <= sizes[b]
                delivered[b] += len(got)
                consumed[b] = merged
    assert delivered == sizes  # everything exactly once (checked disjoint above)
    return most


def test_plan_is_exactly_once_in_lockstep_across_resizes_and_fragments_stay_bounded() -> None:
    worlds = [8, 4, 8, 2, 6, 8, 3, 8, 8, 5, 8, 4, 8, 7, 8, 8]
    for seed in range(3):
        most = _simulate([1700, 900, 333], worlds, units=2, batch=3, seed=seed)
        assert most <= 2 * max(worlds) * 2, most  # under 2 x ranks x units after 16 resumes (grows ~log of resumes)


def test_window_and_shift_move_a_bucket_between_its_own_and_the_global_numbering() -> None:
    consumed = Intervals([(2, 5), (8, 14), (20, 21)])
    assert consumed.window(4, 12).ranges == [(0, 1), (4, 8)]
    assert consumed.window(4, 12).shifted(4) == Intervals([(4, 5), (8, 12)])
    assert consumed.window(14, 20).ranges == []
