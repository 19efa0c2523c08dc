"""LatentLoader against a real S3 API (moto server on 127.0.0.1): the core guarantees again.

Shards are fetched by DataLoader worker processes that build their own s3fs clients from
the environment (endpoint and credentials), exactly as on a cluster.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from data_tools.synth import sample_key, write_synthetic_dataset
from trip import storage
from trip.config import DataConfig
from trip.data import CorruptDataError, LatentLoader

pytestmark = pytest.mark.integration

SIZES = [10, 7, 13, 10, 9, 11]
ALL = {sample_key(s, i) for s, n in enumerate(SIZES) for i in range(n)}


@pytest.fixture()
def s3_dataset(s3_bucket: str) -> str:
    prefix = f"{s3_bucket}/latents"
    write_synthetic_dataset(prefix, SIZES)
    return prefix


def _cfg(dataset: str, **kw: Any) -> DataConfig:
    base = dict(dataset=dataset, micro_batch_size=4, num_workers=2, shuffle_buffer=16, uneven="pad",
                seed=11, retries=2)
    base.update(kw)
    return DataConfig(**base)


def _pass(cfg: DataConfig, world: int, state: dict | None = None,
          stop_after: int | None = None) -> tuple[list[list[str]], list[int], list[dict], list[LatentLoader]]:
    keys, counts, states, loaders = [], [], [], []
    for rank in range(world):
        loader = LatentLoader(cfg, rank, world, state=state)
        got, n = [], 0
        for batch in loader:
            for i, (key, ok) in enumerate(zip(batch["keys"], batch["valid"].tolist())):
                if ok:
                    assert batch["latents"][i, 0, 0, 0, :2].tolist() == [int(key[1:5]), int(key[6:])]
                    got.append(key)
            n += 1
            if n == stop_after:
                break
        keys.append(got)
        counts.append(n)
        states.append(json.loads(json.dumps(loader.state_dict())))
        loaders.append(loader)
    return keys, counts, states, loaders


def test_s3_two_ranks_two_workers_disjoint_complete_and_seeded(s3_dataset: str) -> None:
    keys, counts, _, _ = _pass(_cfg(s3_dataset), 2)
    assert set(keys[0]).isdisjoint(keys[1]) and sorted(keys[0] + keys[1]) == sorted(ALL)
    assert counts[0] == counts[1]
    again, _, _, _ = _pass(_cfg(s3_dataset), 2)
    assert again == keys


@pytest.mark.parametrize("before,after", [((2, 2), (1, 1)), ((1, 1), (3, 2)), ((2, 2), (2, 2))])
def test_s3_resume_at_other_world_size_is_exactly_once(
        s3_dataset: str, before: tuple[int, int], after: tuple[int, int]) -> None:
    first, _, states, _ = _pass(_cfg(s3_dataset, num_workers=before[1]), before[0], stop_after=2)
    merged = LatentLoader.merge_states(states)
    second, counts, _, loaders = _pass(_cfg(s3_dataset, num_workers=after[1]), after[0], state=merged)
    done, rest = [k for r in first for k in r], [k for r in second for k in r]
    assert set(done).isdisjoint(rest) and sorted(done + rest) == sorted(ALL)
    assert len(set(counts)) == 1
    nxt, _, _, _ = _pass(_cfg(s3_dataset, num_workers=after[1]), after[0],
                         state=LatentLoader.merge_states([lo.state_dict() for lo in loaders]))
    assert sorted(k for r in nxt for k in r) == sorted(ALL)


def test_s3_uneven_drop_equal_batches(s3_dataset: str) -> None:
    keys, counts, _, _ = _pass(_cfg(s3_dataset, uneven="drop", micro_batch_size=4), 3)
    flat = [k for r in keys for k in r]
    assert counts == [5, 5, 5] and len(flat) == len(set(flat)) == 60


def test_s3_corrupt_shard_skipped_then_rate_error(s3_dataset: str) -> None:
    fs, path = storage.filesystem(storage.join(s3_dataset, "shard-000003.tar"))
    fs.pipe_file(path, b"not a tar at all" * 700)
    fs.invalidate_cache()
    keys, _, _, loaders = _pass(_cfg(s3_dataset, max_corrupt_fraction=0.5), 2)
    flat = [k for r in keys for k in r]
    assert sum(lo.corrupt_samples for lo in loaders) == 10
    assert sorted(flat) == sorted(k for k in ALL if not k.startswith("s0003"))
    with pytest.raises(CorruptDataError, match=r"shard-000003\.tar"):
        _pass(_cfg(s3_dataset, max_corrupt_fraction=0.01), 2)


def test_s3_missing_shard_is_counted_not_fatal_under_the_rate(s3_dataset: str) -> None:
    fs, path = storage.filesystem(storage.join(s3_dataset, "shard-000001.tar"))
    fs.rm(path)
    fs.invalidate_cache()
    keys, _, _, loaders = _pass(_cfg(s3_dataset, max_corrupt_fraction=0.5, num_workers=1), 1)
    assert loaders[0].corrupt_samples == 7
    assert sorted(keys[0]) == sorted(k for k in ALL if not k.startswith("s0001"))


def test_s3_fetch_of_a_missing_object_is_file_not_found(s3_dataset: str) -> None:
    from trip.data.shards import ShardFetcher

    fetcher = ShardFetcher(s3_dataset + "/x", retries=2)
    data = fetcher.fetch(storage.join(s3_dataset, "shard-000000.tar"))
    assert len(data) == int(storage.filesystem(storage.join(s3_dataset, "shard-000000.tar"))[0]
                            .info(storage.join(s3_dataset, "shard-000000.tar"))["size"])
    with pytest.raises(FileNotFoundError, match="shard-999999.tar does not exist"):
        fetcher.fetch(storage.join(s3_dataset, "shard-999999.tar"))
