"""LatentLoader on local disk with real DataLoader worker processes (ranks simulated in-process).

Covers the issue's CI list: union/disjointness at 2 ranks x 2 workers, same seed same
order, interrupt + merge + resume at another world size and worker count, the next
epoch, uneven shards, corrupt and truncated shards and the corrupt-rate error; and
exact rounds at any world size (round_size) with checkpoints of own_only states.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from data_tools.synth import sample_key, write_synthetic_dataset
from trip.config import DataConfig
from trip.data import CorruptDataError, LatentLoader
from trip.data.plan import EpochOrder

SIZES = [10, 7, 13, 10, 9, 11]  # 60 samples, uneven shards
ALL = {sample_key(s, i) for s, n in enumerate(SIZES) for i in range(n)}


@pytest.fixture()
def dataset(tmp_path: Path) -> str:
    write_synthetic_dataset(str(tmp_path / "ds"), SIZES)
    return str(tmp_path / "ds")


def _cfg(dataset: str, **kw: Any) -> DataConfig:
    base = dict(dataset=dataset, micro_batch_size=4, num_workers=2, shuffle_buffer=16, uneven="pad",
                seed=7, retries=1)
    base.update(kw)
    return DataConfig(**base)


def _check_batch(batch: dict[str, Any], bsz: int) -> list[str]:
    """Shapes, dtypes and content agree with the keys; returns the valid keys."""
    assert batch["latents"].shape == (bsz, 4, 3, 4, 4) and batch["latents"].dtype == torch.float32
    assert torch.equal(batch["image_latents"], batch["latents"][:, 0])
    assert batch["text_states"].shape == (bsz, 5, 8)
    assert batch["valid"].dtype == torch.bool and len(batch["keys"]) == len(batch["captions"]) == bsz
    keys = []
    for i, (key, ok) in enumerate(zip(batch["keys"], batch["valid"].tolist())):
        if ok:
            s, n = int(key[1:5]), int(key[6:])
            assert batch["latents"][i, 0, 0, 0, :2].tolist() == [s, n]
            assert batch["captions"][i] == f"caption {key}"
            keys.append(key)
    return keys


def run_ranks(cfg: DataConfig, world: int, state: dict | None = None,
              stop_after: int | None = None) -> tuple[list[list[str]], list[int], list[dict], list[LatentLoader]]:
    """One pass on every rank; returns valid keys per rank, batch counts, states, loaders."""
    keys, counts, states, loaders = [], [], [], []
    for rank in range(world):
        loader = LatentLoader(cfg, rank, world, state=state)
        got, n = [], 0
        for batch in loader:
            got += _check_batch(batch, cfg.micro_batch_size)
            n += 1
            if stop_after is not None and n == stop_after:
                break
        keys.append(got)
        counts.append(n)
        states.append(json.loads(json.dumps(loader.state_dict())))  # must survive JSON
        loaders.append(loader)
    return keys, counts, states, loaders


def test_two_ranks_two_workers_cover_everything_once_and_repeat_by_seed(dataset: str) -> None:
    cfg = _cfg(dataset)
    keys, counts, _, loaders = run_ranks(cfg, 2)
    assert set(keys[0]).isdisjoint(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(ALL)
    assert counts == [loaders[0].batches_per_epoch] * 2
    assert all(lo.epoch == 1 and lo.wait_seconds > 0 for lo in loaders)
    again, _, _, _ = run_ranks(cfg, 2)
    assert again == keys  # same seed, same order, key for key
    other, _, _, _ = run_ranks(dataclasses.replace(cfg, seed=8), 2)
    assert other != keys


@pytest.mark.parametrize("before,after", [((2, 2), (1, 1)), ((1, 1), (3, 2)), ((2, 2), (2, 0))])
def test_interrupt_merge_resume_at_other_world_size_is_exactly_once(
        dataset: str, before: tuple[int, int], after: tuple[int, int]) -> None:
    (w1, nw1), (w2, nw2) = before, after
    first, _, states, _ = run_ranks(_cfg(dataset, num_workers=nw1), w1, stop_after=3)
    merged = LatentLoader.merge_states(states)
    assert merged["epoch"] == 0 and merged["exhausted"] is False
    cfg2 = _cfg(dataset, num_workers=nw2, micro_batch_size=3)  # a resize may change the micro batch
    second, counts, _, loaders = run_ranks(cfg2, w2, state=merged)
    done = [k for r in first for k in r]
    rest = [k for r in second for k in r]
    assert len(done) == 3 * 4 * w1
    assert set(done).isdisjoint(rest)
    assert sorted(done + rest) == sorted(ALL)
    assert len(set(counts)) == 1
    # the next epoch continues: a full pass over everything again, at the new size
    nxt = [k for lo in loaders for b in lo for k in _check_batch(b, 3)]
    assert sorted(nxt) == sorted(ALL)
    assert all(lo.epoch == 2 for lo in loaders)


def test_uneven_shards_drop_gives_equal_batches_and_drops_only_a_tail(dataset: str) -> None:
    for world in (2, 3, 4):
        cfg = _cfg(dataset, uneven="drop", micro_batch_size=4, num_workers=2)
        keys, counts, _, loaders = run_ranks(cfg, world)
        flat = [k for r in keys for k in r]
        assert len(set(counts)) == 1 and counts[0] == loaders[0].batches_per_epoch == 60 // (world * 4)
        assert len(flat) == len(set(flat)) == counts[0] * world * 4
        assert len(ALL) - len(flat) < world * 4


def test_pad_marks_repeats_invalid_and_rank_counts_stay_equal(dataset: str) -> None:
    keys, counts, _, _ = run_ranks(_cfg(dataset, micro_batch_size=8), 3)  # 60 over 3 x 8
    assert counts == [3, 3, 3]
    assert sorted(k for r in keys for k in r) == sorted(ALL)


def test_leaving_early_keeps_position_and_state_checks_dataset(dataset: str, tmp_path: Path) -> None:
    loader = LatentLoader(_cfg(dataset, num_workers=1), 0, 1)
    total = len(loader)
    seen = []
    for i, b in enumerate(loader):
        seen += b["keys"]
        if i == 1:
            break
    assert len(loader) == total - 2 and loader.epoch == 0
    seen += [k for b in loader for k, v in zip(b["keys"], b["valid"]) if v]
    assert sorted(seen) == sorted(ALL) and loader.epoch == 1
    other = str(tmp_path / "other")
    write_synthetic_dataset(other, [5, 5])
    with pytest.raises(ValueError, match="another dataset"):
        LatentLoader(_cfg(other), 0, 1, state=loader.state_dict())


def test_merge_states_rejects_ranks_at_different_positions(dataset: str) -> None:
    _, _, states, _ = run_ranks(_cfg(dataset, num_workers=0), 2, stop_after=1)
    ahead = dict(states[1], epoch=1, consumed=[])
    with pytest.raises(ValueError, match="same step"):
        LatentLoader.merge_states([states[0], ahead])
    # a rank that finished its epoch may sit beside one that has already rolled over
    finished = dict(states[0], exhausted=True)
    assert LatentLoader.merge_states([finished, ahead])["epoch"] == 1


def _rewrite_shard(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "garbage":
        path.write_bytes(bytes(range(256)) * (len(raw) // 256))
    elif how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "bad-npy":  # break the .npy magic of the first sample's latents
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = tar.getmember(next(n for n in tar.getnames() if n.endswith(".latents.npy")))
        out = bytearray(raw)
        out[member.offset_data:member.offset_data + 6] = b"BROKEN"
        path.write_bytes(bytes(out))


def test_corrupt_shards_are_counted_skipped_and_the_rest_delivered(dataset: str) -> None:
    _rewrite_shard(Path(dataset) / "shard-000002.tar", "garbage")  # 13 samples
    _rewrite_shard(Path(dataset) / "shard-000004.tar", "truncate")  # some of 9 samples
    _rewrite_shard(Path(dataset) / "shard-000000.tar", "bad-npy")  # 1 sample
    keys, counts, _, loaders = run_ranks(_cfg(dataset, max_corrupt_fraction=0.9), 2)
    flat = [k for r in keys for k in r]
    corrupt = sum(lo.corrupt_samples for lo in loaders)
    assert len(flat) == len(set(flat)) == len(ALL) - corrupt
    assert not any(k.startswith("s0002") for k in flat)
    assert 13 + 1 < corrupt < 13 + 1 + 9 and sample_key(0, 0) not in flat
    assert sample_key(4, 0) in flat  # the intact head of the truncated shard is kept
    assert len(set(counts)) == 1


def test_past_the_corrupt_rate_the_error_names_the_shard(dataset: str) -> None:
    _rewrite_shard(Path(dataset) / "shard-000002.tar", "garbage")
    loaders = [LatentLoader(_cfg(dataset, max_corrupt_fraction=0.05), r, 2) for r in range(2)]
    with pytest.raises(CorruptDataError, match=r"shard-000002\.tar"):
        for loader in loaders:
            for _ in loader:
                pass


def test_missing_dataset_and_impossible_batches_fail_clearly(dataset: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        LatentLoader(_cfg(str(tmp_path / "nope")), 0, 1)
    with pytest.raises(ValueError, match="fewer than world_size"):
        LatentLoader(_cfg(dataset, uneven="drop", micro_batch_size=32), 0, 2)
    with pytest.raises(ValueError, match="image_frame"):
        LatentLoader(_cfg(dataset, image_frame=9), 0, 1)


def test_shards_without_text_give_batches_without_text_states(tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path / "notext"), [5, 6], text_shape=None)
    loader = LatentLoader(_cfg(str(tmp_path / "notext"), image_frame=2), 0, 1)
    batches = list(loader)
    assert batches and all("text_states" not in b for b in batches)
    assert all(torch.equal(b["image_latents"], b["latents"][:, 2]) for b in batches)
    assert sum(int(b["valid"].sum()) for b in batches) == 11


def test_a_finished_epoch_resumes_into_the_next_one(dataset: str) -> None:
    cfg = _cfg(dataset, num_workers=1)
    loaders = [LatentLoader(cfg, r, 2) for r in range(2)]
    for lo in loaders:  # deliver every batch but stop before the loop notices the end
        for n, _ in enumerate(lo):
            if n == lo.batches_per_epoch - 1:
                break
    merged = LatentLoader.merge_states([lo.state_dict() for lo in loaders])
    assert merged["epoch"] == 0 and merged["exhausted"] is True
    resumed = LatentLoader(cfg, 0, 1, state=merged)
    assert len(resumed) == resumed.batches_per_epoch and resumed.epoch == 1
    assert sorted(k for b in resumed for k, v in zip(b["keys"], b["valid"]) if v) == sorted(ALL)


def test_file_urls_work_like_plain_paths(dataset: str) -> None:
    keys = [k for b in LatentLoader(_cfg(f"file://{dataset}", num_workers=1), 0, 1)
            for k, v in zip(b["keys"], b["valid"]) if v]
    assert sorted(keys) == sorted(ALL)


def _positions_match_keys(batch: dict[str, Any], epoch: int) -> None:
    """`positions` name the very samples of the batch (padding too) in the epoch's order."""
    assert batch["epoch"] == epoch
    assert batch["positions"].dtype == torch.int64 and batch["positions"].shape == batch["valid"].shape
    shard, ordinal = EpochOrder(SIZES, seed=7, epoch=epoch, shuffle_buffer=16).locate(batch["positions"].numpy())
    assert [sample_key(s, o) for s, o in zip(shard.tolist(), ordinal.tolist())] == batch["keys"]


def _rounds(cfg: DataConfig, world: int, round_size: int, state: dict | None, rounds: int | None,
            ) -> tuple[list[list[dict[str, Any]]], list[LatentLoader]]:
    """Every rank's batches of one pass (the first `rounds` rounds if given)."""
    out, loaders = [], []
    for rank in range(world):
        loader = LatentLoader(cfg, rank, world, state=state, round_size=round_size)
        batches = []
        for batch in loader:
            _check_batch(batch, len(batch["valid"]))
            _positions_match_keys(batch, 0)
            batches.append(batch)
            if rounds is not None and len(batches) == rounds * loader.micro_batches_per_round:
                break
        out.append(batches)
        loaders.append(loader)
    return out, loaders


def _valid_per_round(batches: list[list[dict[str, Any]]], accum: int) -> list[int]:
    counts = {len(b) for b in batches}
    assert len(counts) == 1, "ranks yielded different numbers of micro-batches"
    n = counts.pop()
    return [sum(int(b[j]["valid"].sum()) for b in batches for j in range(i, i + accum)) for i in range(0, n, accum)]


def _keys(batches: list[list[dict[str, Any]]]) -> list[str]:
    return [k for rank in batches for b in rank for k, v in zip(b["keys"], b["valid"].tolist()) if v]


def _merge_own_only(loaders: list[LatentLoader]) -> dict[str, Any]:
    """The checkpoint as the training loop takes it: rank 0's full state, the others' own deliveries."""
    states = [loaders[0].state_dict()] + [lo.state_dict(own_only=True) for lo in loaders[1:]]
    states = json.loads(json.dumps(states))
    merged = LatentLoader.merge_states(states)
    assert merged == LatentLoader.merge_states([lo.state_dict() for lo in loaders])  # same as full states
    if len(loaders) > 1:
        with pytest.raises(ValueError, match="full state_dict"):
            LatentLoader.merge_states(states[1:])
    return merged


def test_round_size_gives_exact_rounds_and_own_only_checkpoints_resume_exactly_once(dataset: str) -> None:
    # 3 ranks, 10 samples per round in micro-batches of at most 4: 4 + 3 + 3
    first, loaders = _rounds(_cfg(dataset), 3, 10, None, rounds=2)
    assert [lo.micro_batches_per_round for lo in loaders] == [1, 1, 1]
    assert [lo.batches_per_epoch for lo in loaders] == [6, 6, 6]
    assert [{len(b["valid"]) for b in rank} for rank in first] == [{4}, {3}, {3}]
    assert _valid_per_round(first, 1) == [10, 10]
    own = [lo.state_dict(own_only=True) for lo in loaders]
    assert all(s["own_only"] and s["restored_epoch"] == 0 for s in own)
    merged = _merge_own_only(loaders)
    assert "own_only" not in merged and merged["exhausted"] is False

    # 2 ranks, 7 per round, micro-batches of at most 3 (2 + 2 and 2 + 1), one reader each
    cfg2 = _cfg(dataset, micro_batch_size=3, num_workers=1)
    second, loaders = _rounds(cfg2, 2, 7, merged, rounds=2)
    assert [lo.micro_batches_per_round for lo in loaders] == [2, 2]
    assert [[len(b["valid"]) for b in rank] for rank in second] == [[2, 2] * 2, [2, 1] * 2]
    assert _valid_per_round(second, 2) == [7, 7]
    own = loaders[1].state_dict(own_only=True)  # only what this loader delivered, not the restored base
    assert sum(b - a for a, b in own["consumed"]) == sum(int(b["valid"].sum()) for b in second[1])
    merged = _merge_own_only(loaders)

    # 4 ranks, 9 per round, the rest of the epoch: 60 - 20 - 14 = 26 = 9 + 9 + 8 (padded)
    third, loaders = _rounds(_cfg(dataset, micro_batch_size=2, num_workers=2), 4, 9, merged, rounds=None)
    assert _valid_per_round(third, 2) == [9, 9, 8]
    done = _keys(first) + _keys(second) + _keys(third)
    assert len(done) == len(set(done)) and sorted(done) == sorted(ALL)
    assert all(lo.epoch == 1 for lo in loaders)
