"""Transient storage errors are retried with backoff inside the workers; persistent ones fail
with the shard's name; the state counts batches handed to the step, not prefetched ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from data_tools.synth import sample_key, write_synthetic_dataset
from trip.config import DataConfig
from trip.data import LatentLoader

SIZES = [6, 9, 5, 8]


class FlakyFileSystem(LocalFileSystem):
    """Local files behind a connection that drops: the first read of every shard fails, and
    reads of files named in FLAKY_ALWAYS fail every time. State lives in marker files so it
    is shared with DataLoader worker processes."""

    protocol = ("flaky",)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kw: Any) -> bytes:
        path = self._strip_protocol(path)
        if path.endswith(".tar"):
            if os.path.basename(path) in os.environ.get("FLAKY_ALWAYS", "").split(","):
                raise ConnectionResetError(f"injected: {path} unreachable")
            marker = Path(path + ".failed-once")
            if not marker.exists():
                marker.touch()
                raise ConnectionResetError(f"injected: connection reset reading {path}")
        return super().cat_file(path, start, end, **kw)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture()
def flaky_dataset(tmp_path: Path) -> str:
    write_synthetic_dataset(str(tmp_path / "ds"), SIZES)
    return f"flaky://{tmp_path / 'ds'}"


def _cfg(dataset: str, **kw: Any) -> DataConfig:
    return DataConfig(**dict(dict(dataset=dataset, micro_batch_size=4, num_workers=2, uneven="pad",
                                  retries=3, shuffle_buffer=8), **kw))


def test_transient_errors_are_retried_and_every_sample_arrives(flaky_dataset: str, tmp_path: Path) -> None:
    keys = []
    for rank in range(2):
        keys += [k for b in LatentLoader(_cfg(flaky_dataset), rank, 2) for k, v in zip(b["keys"], b["valid"]) if v]
    assert sorted(keys) == sorted(sample_key(s, i) for s, n in enumerate(SIZES) for i in range(n))
    assert len(list((tmp_path / "ds").glob("*.failed-once"))) == len(SIZES)  # each failed, then read


def test_a_shard_that_stays_unreachable_fails_with_its_name(flaky_dataset: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAKY_ALWAYS", "shard-000001.tar")
    loader = LatentLoader(_cfg(flaky_dataset, retries=1, num_workers=1), 0, 1)
    with pytest.raises(OSError, match=r"shard-000001\.tar failed after 2 attempts"):
        for _ in loader:
            pass


def test_state_counts_delivered_batches_not_prefetched_ones(tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path / "ds"), [20, 20])
    loader = LatentLoader(_cfg(str(tmp_path / "ds"), prefetch_factor=4), 0, 1)
    it = iter(loader)
    first = next(it)
    assert sum(b - a for a, b in loader.state_dict()["consumed"]) == 4  # 2 workers x 4 batches prefetched
    second = next(it)
    delivered = set(first["keys"]) | set(second["keys"])
    state = loader.state_dict()
    assert sum(b - a for a, b in state["consumed"]) == 8
    it.close()
    rest = [k for b in LatentLoader(_cfg(str(tmp_path / "ds")), 0, 1, state=state) for k in b["keys"]]
    assert delivered.isdisjoint(rest) and len(delivered) + len(rest) == 40
