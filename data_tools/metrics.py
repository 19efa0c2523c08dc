"""Prometheus metrics of the preprocessing job (updated by the driver, one process).

Bounded label sets only: `status` is one of ok | skipped | error, `kind` one of
`data_tools.fetch.KINDS`, `bucket` one of the job's configured buckets (HxWxF), never a
video id or a URL.
`start_exporter(port)` serves them on /metrics; port 0 means no exporter.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram

from trip.metrics import serve_metrics

STATUSES = ("ok", "skipped", "error")

VIDEOS = Counter("trip_preprocess_videos", "Videos processed by the preprocessing job, by outcome "
                 "(ok: written; skipped: unusable input; error: failed in our code)", ["status"])
BYTES = Counter("trip_preprocess_bytes", "Bytes of committed shards written by preprocessing")
ENCODE_SECONDS = Histogram("trip_preprocess_encode_seconds",
                           "Codec + text-encoder seconds per clip in the encode actors",
                           buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0))
SHARDS = Counter("trip_preprocess_shards", "Shards committed by preprocessing")
# counted in the shard tasks, returned with their stats: a shard's counts arrive when it commits
FETCH_RETRIES = Counter("trip_preprocess_fetch_retries", "Retried downloads of http(s) videos "
                        "(5xx, 408, 429, connection resets, timeouts)")
FETCH_FAILURES = Counter("trip_preprocess_fetch_failures", "http(s) videos given up on, by kind "
                         "(data_tools.fetch.KINDS)", ["kind"])
BUCKET_SAMPLES = Counter("trip_preprocess_bucket_samples", "Samples written to each bucket of a multi-shape "
                         "job (preprocess.buckets; one series per configured bucket)", ["bucket"])
FETCH_BYTES = Counter("trip_preprocess_fetch_bytes", "Bytes of http(s) videos downloaded")

for _status in STATUSES:  # expose every series from the start, at 0
    VIDEOS.labels(status=_status)


def start_exporter(port: int, addr: str = "0.0.0.0") -> WSGIServer | None:
    """Serve /metrics on `port` in a daemon thread (0 disables); returns the server or None."""
    if not port:
        return None
    server, _ = serve_metrics(port, addr, setting="preprocess.metrics_port")
    return server
