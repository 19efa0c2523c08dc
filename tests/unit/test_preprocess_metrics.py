"""The preprocessing exporter serves the job's counters in Prometheus text format."""

from __future__ import annotations

import socket
import urllib.request

import pytest

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


def test_a_taken_port_is_an_error_naming_the_port_and_the_setting() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=rf"port {port} on 127.0.0.1 is already in use .*preprocess.metrics_port"):
            metrics.start_exporter(port, addr="127.0.0.1")
    finally:
        taken.close()
