"""Shared fixtures: environment for CPU DeepSpeed/Ray, and an S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 speaking the real S3 HTTP API; yields its endpoint.

    The AWS variables are set for the whole session so that fsspec/s3fs, Ray and worker
    processes started by tests find the endpoint the same way production code does.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test; yields 's3://<bucket>'."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    # parametrized tests share their first 40 characters: a hash of the full id keeps them apart
    name = name.rstrip("-") + "-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture()
def http_faults() -> Iterator[object]:
    """A fault-injecting HTTP server on 127.0.0.1 (tests/http_faults.py), stopped after the test."""
    from tests.http_faults import FaultServer

    server = FaultServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[None]:
    """One local Ray with 2 CPUs for the module that asks for it, shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
