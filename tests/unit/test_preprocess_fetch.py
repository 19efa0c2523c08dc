"""Downloading http(s) videos (data_tools.fetch) against a real server on 127.0.0.1 that fails
on request (tests/http_faults.py): what is retried, what is not, how long it may take, how big
a video may be, what a URL looks like in a reason, and that the per-host cap holds."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from data_tools.decode import SamplingSpec
from data_tools.fetch import Fetcher, FetchError, FetchPolicy, LocalSlots, fetch_policy, redact_url
from data_tools.synth import write_video
from data_tools.webvid import VideoRow
from pipelines.preprocess import decode_row
from trip.config import ConfigError, PreprocessConfig, load_config

FAST = FetchPolicy(connect_timeout_s=2, read_timeout_s=1, timeout_s=10, tries=4, backoff_s=0.01)
BODY = bytes(range(256)) * 400  # 100 KiB


def test_transient_failures_are_retried_until_the_body_arrives(http_faults) -> None:
    url = http_faults.add("/v.mp4", BODY, faults=("503", "reset", "429", "500"))
    fetch = Fetcher(FetchPolicy(**{**FAST.__dict__, "tries": 5}))
    assert fetch(url) == BODY
    assert http_faults.hits["/v.mp4"] == 5
    assert fetch.stats == {"tries": 5, "retries": 4, "bytes": len(BODY), "failures": {}}


def test_a_reset_every_try_gives_up_after_the_tries_saying_so(http_faults) -> None:
    url = http_faults.add("/r.mp4", BODY, faults=("reset",) * 4)
    fetch = Fetcher(FAST)
    with pytest.raises(FetchError) as e:
        fetch(url)
    assert (e.value.kind, e.value.tries) == ("reset", 4)
    assert e.value.reason == f"connection reset after 4 tries: {url}"
    assert fetch.stats["failures"] == {"reset": 1} and fetch.stats["retries"] == 3


def test_a_body_cut_short_is_a_reset_not_a_video(http_faults) -> None:
    url = http_faults.add("/cut.mp4", BODY, faults=("truncate",))
    fetch = Fetcher(FAST)
    assert fetch(url) == BODY and fetch.stats["retries"] == 1
    with pytest.raises(FetchError) as e:
        Fetcher(FetchPolicy(tries=1))(http_faults.add("/cut2.mp4", BODY, faults=("truncate",)))
    assert e.value.kind == "reset" and f"closed after {len(BODY) // 2} of {len(BODY)} bytes" in e.value.reason


def test_a_404_is_not_retried(http_faults) -> None:
    url = http_faults.url("/gone.mp4")
    with pytest.raises(FetchError) as e:
        Fetcher(FAST)(url)
    assert (e.value.kind, e.value.status, e.value.tries) == ("http_4xx", 404, 1)
    assert e.value.reason == f"HTTP 404 Not Found after 1 try: {url}"
    assert http_faults.hits["/gone.mp4"] == 1


def test_403_fails_at_once_but_408_is_retried(http_faults) -> None:
    with pytest.raises(FetchError) as e:
        Fetcher(FAST)(http_faults.add("/f.mp4", BODY, faults=("403",)))
    assert e.value.tries == 1 and "HTTP 403 Forbidden" in e.value.reason
    assert Fetcher(FAST)(http_faults.add("/t.mp4", BODY, faults=("408",))) == BODY


def test_backoff_grows_with_jitter_and_is_bounded() -> None:
    policy = FetchPolicy(backoff_s=1.0, backoff_max_s=5.0)
    for retry, top in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        waits = [policy.backoff(retry) for _ in range(200)]
        assert top / 2 <= min(waits) and max(waits) <= top
        assert len(set(waits)) > 100  # jittered: tasks that failed together spread out


def test_retries_stop_at_the_overall_deadline(http_faults) -> None:
    url = http_faults.add("/busy.mp4", BODY, faults=("503",) * 50)
    policy = FetchPolicy(read_timeout_s=1, timeout_s=1.0, tries=50, backoff_s=0.2, backoff_max_s=0.4)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        Fetcher(policy)(url)
    assert time.monotonic() - t0 < 1.5
    assert e.value.kind == "http_5xx" and 2 <= e.value.tries < 10 and "out of time" in e.value.reason


def test_a_stalled_response_times_out_and_is_retried(http_faults) -> None:
    http_faults.stall_s = 1.5
    url = http_faults.add("/stall.mp4", BODY, faults=("stall",))
    t0 = time.monotonic()
    fetch = Fetcher(FetchPolicy(read_timeout_s=0.3, timeout_s=5, backoff_s=0.01))
    assert fetch(url) == BODY
    assert time.monotonic() - t0 < 1.4 and fetch.stats["retries"] == 1
    with pytest.raises(FetchError) as e:
        Fetcher(FetchPolicy(read_timeout_s=0.3, timeout_s=5, tries=1))(
            http_faults.add("/stall2.mp4", BODY, faults=("stall",)))
    assert e.value.kind == "timeout" and "read timed out" in e.value.reason


def test_a_drip_feed_cannot_outlast_the_overall_timeout(http_faults) -> None:
    http_faults.stall_s = 0.5  # 50 ms a KiB: each read is quick, the whole body takes 5 s
    url = http_faults.add("/drip.mp4", BODY, faults=("drip",) * 4)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        Fetcher(FetchPolicy(read_timeout_s=1, timeout_s=0.8, backoff_s=0.01))(url)
    assert time.monotonic() - t0 < 1.5
    assert e.value.kind == "timeout" and "over 0.8 s for the video" in e.value.reason


def test_a_video_over_the_size_limit_is_refused_with_or_without_a_length(http_faults) -> None:
    policy = FetchPolicy(max_bytes=50_000, backoff_s=0.01)
    with pytest.raises(FetchError) as e:
        Fetcher(policy)(http_faults.add("/big.mp4", BODY))
    assert (e.value.kind, e.value.tries) == ("too_large", 1) and "0.1 MB is over the" in e.value.reason
    with pytest.raises(FetchError) as e:
        Fetcher(policy)(http_faults.add("/big2.mp4", BODY, faults=("nolength",)))
    assert e.value.kind == "too_large" and http_faults.hits["/big2.mp4"] == 1


def test_urls_lose_their_credentials_and_query_strings() -> None:
    signed = "https://user:secret@cdn.example:8443/a/b.mp4?X-Amz-Signature=abc&X-Amz-Credential=k#t"
    assert redact_url(signed) == "https://cdn.example:8443/a/b.mp4"
    assert redact_url("/data/videos/1.mp4") == "/data/videos/1.mp4"
    assert redact_url("s3://bucket/v.mp4") == "s3://bucket/v.mp4"


def test_a_failed_signed_url_is_named_without_its_signature(http_faults) -> None:
    url = http_faults.url("/private.mp4") + "?sig=TOPSECRET"
    with pytest.raises(FetchError) as e:
        Fetcher(FAST)(url.replace("http://", "http://me:pw@"))
    assert "TOPSECRET" not in e.value.reason and "pw" not in e.value.reason
    assert e.value.reason.endswith(http_faults.url("/private.mp4"))


def test_decode_row_downloads_http_videos_and_records_fetch_failures(http_faults, tmp_path) -> None:
    video = write_video(np.zeros((4, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"))
    url = http_faults.add("/1.mp4", open(video, "rb").read(), faults=("503",)) + "?token=s3cr3t"
    spec = SamplingSpec(num_frames=2, fps=8.0, resolution=16)
    fetch = Fetcher(FAST)

    def row(u: str) -> VideoRow:
        return VideoRow(videoid="1", url=u, caption="c", duration=1.0, page_dir="d", extra="{}")

    clip, ok = decode_row(row(url), spec, fetch=fetch)
    assert clip is not None and ok.status == "ok" and ok.meta["source_url"] == http_faults.url("/1.mp4")
    _, gone = decode_row(row(http_faults.url("/2.mp4") + "?token=s3cr3t"), spec, fetch=fetch)
    assert (gone.status, gone.stage) == ("skipped", "fetch")
    assert gone.reason == f"HTTP 404 Not Found after 1 try: {http_faults.url('/2.mp4')}"
    assert gone.row.url == http_faults.url("/2.mp4")  # what the errors manifest shows
    assert fetch.stats["retries"] == 1 and fetch.stats["failures"] == {"http_4xx": 1}


def test_the_per_host_cap_bounds_concurrent_downloads(http_faults) -> None:
    urls = [http_faults.add(f"/c{i}.mp4", BODY, delay_s=0.1) for i in range(12)]
    slots = LocalSlots(per_host=3)
    fetch = Fetcher(FAST, slots)
    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(fetch, urls)) == [BODY] * 12
    assert http_faults.peak == 3 and slots.peak("127.0.0.1") == 3
    # slots are given back on failures too: 6 failing downloads through a cap of 1, then one more
    one = Fetcher(FetchPolicy(tries=1), LocalSlots(per_host=1))
    for _ in range(6):
        with pytest.raises(FetchError):
            one(http_faults.url("/missing.mp4"))
    assert one(urls[0]) == BODY


def test_a_lease_never_given_back_expires() -> None:
    slots = LocalSlots(per_host=1)
    slots.acquire("h", lease_s=0.2)  # its holder died
    t0 = time.monotonic()
    token = slots.acquire("h", lease_s=5)
    assert 0.1 < time.monotonic() - t0 < 1.0 and token is not None


def test_fetch_settings_come_from_the_preprocess_section_and_are_checked(tmp_path) -> None:
    pre = PreprocessConfig(fetch_connect_timeout_s=3, fetch_read_timeout_s=7, fetch_timeout_s=60,
                           fetch_tries=2, fetch_backoff_s=0.5, fetch_max_mb=1.5)
    assert fetch_policy(pre) == FetchPolicy(connect_timeout_s=3, read_timeout_s=7, timeout_s=60, tries=2,
                                            backoff_s=0.5, max_bytes=int(1.5 * 1024**2))
    for key, value, words in [("fetch_tries", 0, "fetch_tries must be >= 1"),
                              ("fetch_read_timeout_s", 0, "fetch_read_timeout_s must be > 0"),
                              ("fetch_max_per_host", -1, "fetch_max_per_host must be >= 0"),
                              ("fetch_max_mb", -5, "fetch_max_mb must be > 0")]:
        cfg = tmp_path / f"{key}.yaml"
        cfg.write_text(f"preprocess:\n  {key}: {value}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(str(cfg))
