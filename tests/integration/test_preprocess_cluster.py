"""The preprocessing job on a two-node Ray cluster (`cluster_utils`, one CPU a node, no CPU
on the head): the shard tasks spread over both nodes and each commits its own shard to the
shared S3 output; the driver only collects records."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import s3fs

from data_tools.check import validate_dataset
from data_tools.synth import make_dataset
from pipelines.preprocess import run_preprocess
from trip.config import CodecConfig, PreprocessConfig

pytestmark = pytest.mark.integration


def test_shard_tasks_spread_over_two_nodes(s3_server, tmp_path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    webvid = str(tmp_path / "webvid")
    make_dataset(webvid, num=8, seed=3, size=32, seconds=1.5, fps=8, holdout=0)
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir("pp-cluster")
    out = "s3://pp-cluster/shards"
    pre = PreprocessConfig(csv=os.path.join(webvid, "results.csv"), video_root=os.path.join(webvid, "videos"),
                           output=out, num_frames=4, fps=4.0, resolution=16, samples_per_shard=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    seen: list[tuple[str, int]] = []
    try:
        ray.init(address=cluster.address)
        result = run_preprocess(pre, CodecConfig(), progress=False,
                                on_shard_committed=lambda shard, record, stats: seen.append(
                                    (stats["node"], stats["pid"])))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert (result.ok, result.shards) == (8, 8)
    by_node = Counter(node for node, _ in seen)
    assert set(by_node) == {n.node_id for n in nodes}, by_node  # both nodes wrote shards
    assert all(pid != os.getpid() for _, pid in seen)
    index, problems = validate_dataset(out)
    assert problems == [] and index["num_samples"] == 8
