"""The preprocessing exporter serves the job's counters in Prometheus text format."""

from __future__ import annotations

import urllib.request

from data_tools import metrics
from tests.conftest import free_port


def test_exporter_serves_bounded_status_series() -> None:
    assert metrics.start_exporter(0) is None
    server = metrics.start_exporter(free_port(), addr="127.0.0.1")
    assert server is not None
    try:
        before = metrics.VIDEOS.labels(status="skipped")._value.get()
        metrics.VIDEOS.labels(status="skipped").inc()
        metrics.ENCODE_SECONDS.observe(0.02)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    for status in metrics.STATUSES:
        assert f'trip_preprocess_videos_total{{status="{status}"}}' in text
    assert f'trip_preprocess_videos_total{{status="skipped"}} {before + 1}' in text
    assert "trip_preprocess_bytes_total" in text
    assert 'trip_preprocess_encode_seconds_bucket{le="0.05"}' in text
