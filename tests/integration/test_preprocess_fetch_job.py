"""The preprocessing job over HTTP: every video is a contentUrl on a 127.0.0.1 server that
fails on request (tests/http_faults.py), as WebVid's own servers do.

Injected 503s, 429s and connection resets are retried until the videos arrive; a permanent
404 becomes a line in the errors manifest (stage fetch, its reason, the URL without its
signed query string); a crash after the first shard loses nothing; a rerun skips committed
shards without a request; the per-host cap holds across the shard tasks of the cluster.
"""

from __future__ import annotations

import json
import os

import pytest
from prometheus_client import REGISTRY

from data_tools.check import validate_dataset
from data_tools.synth import make_dataset, write_csv
from pipelines.preprocess import run_preprocess
from trip.config import CodecConfig, PreprocessConfig
from trip.data.shards import read_shard

pytestmark = pytest.mark.integration

SIGNATURE = "X-Amz-Signature=s3cr3t"


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[dict[str, str]]:
    """6 synthetic WebVid rows (1.5 s at 8 fps, 32 px) with their video bytes."""
    root = str(tmp_path_factory.mktemp("fetch-data"))
    make_dataset(root, num=6, seed=2, size=32, seconds=1.5, fps=8, holdout=0)
    import csv

    with open(os.path.join(root, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        with open(r["contentUrl"], "rb") as v:
            r["bytes"] = v.read()
    return rows


def _serve(server, rows: list[dict[str, str]], faults: dict[int, tuple[str, ...]], missing: set[int],
           delay_s: float = 0.0) -> list[dict[str, str]]:
    """The rows with contentUrl on `server` (signed URLs); rows in `missing` are never served."""
    out = []
    for i, r in enumerate(rows):
        path = f"/{r['page_dir']}/{r['videoid']}.mp4"
        if i not in missing:
            server.add(path, r["bytes"], faults=faults.get(i, ()), delay_s=delay_s)
        out.append({**{k: v for k, v in r.items() if k != "bytes"},
                    "contentUrl": f"{server.url(path)}?{SIGNATURE}"})
    return out


def _pre(csv_path: str, output: str, **kw) -> PreprocessConfig:
    base = dict(csv=csv_path, video_root=None, output=output, num_frames=4, fps=4.0, resolution=16,
                samples_per_shard=2, encode_batch_size=8, fetch_tries=4, fetch_backoff_s=0.01,
                fetch_connect_timeout_s=5, fetch_read_timeout_s=5, fetch_timeout_s=30)
    base.update(kw)
    return PreprocessConfig(**base)


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_flaky_http_videos_are_all_encoded_and_the_404_is_listed(ray_two_cpus, videos, http_faults,
                                                                 tmp_path) -> None:
    faults = {0: ("503", "503"), 1: ("reset",), 3: ("reset", "503"), 4: ("429",)}
    rows = _serve(http_faults, videos, faults, missing={2})
    csv_path = write_csv(str(tmp_path / "results.csv"), rows)
    out = str(tmp_path / "shards")
    retries_before = _counter("trip_preprocess_fetch_retries_total")
    gone_before = _counter("trip_preprocess_fetch_failures_total", kind="http_4xx")

    class Crash(RuntimeError):
        pass

    def crash(shard: int, record: dict, stats: dict) -> None:
        assert stats["fetch"]["retries"] == 3 and stats["fetch"]["failures"] == {}  # rows 0 and 1
        raise Crash(f"stopping after shard {shard}")

    # one shard in flight: the crash leaves exactly shard 0 committed
    with pytest.raises(Crash):
        run_preprocess(_pre(csv_path, out, shards_in_flight=1), CodecConfig(), progress=False,
                       on_shard_committed=crash)
    resumed = run_preprocess(_pre(csv_path, out), CodecConfig(), progress=False)
    assert (resumed.shards_skipped, resumed.ok, resumed.skipped, resumed.errors) == (1, 3, 1, 0)

    index, problems = validate_dataset(out)
    assert problems == [] and index["num_samples"] == 5 and index["num_errors"] == 1
    samples = [s for e in index["shards"] for s in read_shard(f"{out}/{e['name']}").samples]
    assert [s.meta["videoid"] for s in samples] == [r["videoid"] for i, r in enumerate(rows) if i != 2]
    for s in samples:
        assert s.meta["source_url"] == rows[int(s.key)]["contentUrl"].split("?")[0]
    with open(os.path.join(out, "errors.jsonl")) as f:
        errors = [json.loads(line) for line in f]
    gone = rows[2]["contentUrl"].split("?")[0]
    assert errors == [{"videoid": rows[2]["videoid"], "url": gone, "stage": "fetch", "status": "skipped",
                       "reason": f"HTTP 404 Not Found after 1 try: {gone}"}]
    assert SIGNATURE not in open(os.path.join(out, "errors.jsonl")).read()
    # every transient fault cost one retry, counted in the tasks and reported to the driver
    assert _counter("trip_preprocess_fetch_retries_total") - retries_before == 6
    assert _counter("trip_preprocess_fetch_failures_total", kind="http_4xx") - gone_before == 1

    hits = dict(http_faults.hits)
    again = run_preprocess(_pre(csv_path, out), CodecConfig(), progress=False)
    assert again.shards_skipped == 3 and again.ok == 0 and dict(http_faults.hits) == hits


def test_the_per_host_cap_holds_across_shard_tasks(ray_two_cpus, videos, http_faults, tmp_path) -> None:
    rows = _serve(http_faults, videos, {}, missing=set(), delay_s=0.3)  # downloads long enough to overlap
    csv_path = write_csv(str(tmp_path / "results.csv"), rows)
    result = run_preprocess(_pre(csv_path, str(tmp_path / "shards"), samples_per_shard=3, shards_in_flight=2,
                                 fetch_max_per_host=1), CodecConfig(), progress=False)
    assert (result.ok, result.shards) == (6, 2)
    assert http_faults.peak == 1 and sum(http_faults.hits.values()) == 6
