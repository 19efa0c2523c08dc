"""A multi-shape (bucketed) preprocessing job end to end on a real local Ray (2 CPUs).

A synthetic corpus of landscape, portrait, square, too-wide and too-short clips of several
lengths -> `run_preprocess` with `preprocess.buckets` (lossless codec, so every latent can be
turned back into the exact frames it came from) -> one tar per bucket and shard, index.json
with the buckets, the clips that fit none in errors.jsonl; then a run stopped after its first
shard and resumed leaves the very bytes a clean run does.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from data_tools.buckets import config_buckets
from data_tools.check import validate_dataset
from data_tools.decode import SamplingSpec, decode_bucketed, resized_size
from data_tools.synth import make_dataset
from data_tools.webvid import read_rows
from pipelines.preprocess import run_preprocess
from tests.files import read_tree
from trip.codec import LosslessCodec
from trip.config import CodecConfig, PreprocessConfig, config_from_dict
from trip.data.shards import dataset_buckets, read_shard

pytestmark = pytest.mark.integration

# (size (H, W), seconds at 8 fps) of video i mod 8, and the bucket it must end in at 4 fps:
# 2 s gives 8 frames, 1 s gives 4, 0.25 s gives 1
VARIANTS = [
    (((32, 56), 2.0), "16x28x8"),   # 16:9 landscape, long
    (((56, 32), 2.0), "28x16x8"),   # portrait, long
    (((32, 32), 1.0), "20x20x4"),   # square, short
    (((32, 56), 1.0), "16x28x4"),   # landscape, short
    (((36, 48), 2.0), "16x28x8"),   # 4:3: just nearer 16:9 than 1:1, crops 24% of its height
    (((16, 64), 2.0), None),        # 4:1: would crop 56%
    (((56, 32), 0.25), None),       # one frame at 4 fps
    (((32, 32), 2.0), "20x20x8"),   # square, long
]
NUM = 10
GRID = {"aspects": ["16:9", "1:1", "9:16"], "pixels": 448, "frames": [4, 8], "multiple_of": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("bucket-corpus"))
    return make_dataset(root, num=NUM, seed=3, fps=8, holdout=0, variants=[v for v, _ in VARIANTS])


def _pre(csv: str, output: str, **kw) -> PreprocessConfig:
    data = {"csv": csv, "output": output, "fps": 4.0, "samples_per_shard": 3, "encode_batch_size": 8,
            "buckets": GRID, **kw}
    return config_from_dict({"preprocess": data}).preprocess


def test_every_clip_lands_in_its_bucket_uncropped_beyond_its_aspect(ray_two_cpus, corpus, tmp_path) -> None:
    out = str(tmp_path / "shards")
    pre = _pre(corpus, out)
    assert pre.bucket_shapes() == [(16, 28, 4), (16, 28, 8), (20, 20, 4), (20, 20, 8), (28, 16, 4), (28, 16, 8)]
    before = {b: REGISTRY.get_sample_value("trip_preprocess_bucket_samples_total", {"bucket": b}) or 0.0
              for b in ("16x28x8", "20x20x4")}
    result = run_preprocess(pre, CodecConfig(kind="lossless", downscale=2), progress=False)
    rows = read_rows(corpus).rows
    want = {r.videoid: VARIANTS[i % len(VARIANTS)][1] for i, r in enumerate(rows)}
    fits = {v: b for v, b in want.items() if b}
    assert (result.ok, result.skipped, result.errors, result.shards) == (len(fits), NUM - len(fits), 0, 4)

    index, problems = validate_dataset(out)
    assert problems == []
    from data_tools.cli import main as data_tools_main

    assert data_tools_main(["validate", out]) == 0
    counts = {b: sum(1 for x in fits.values() if x == b) for b in set(fits.values())}
    buckets = {b.name: b for b in dataset_buckets(index)}
    assert list(buckets) == ["16x28x4", "16x28x8", "20x20x4", "20x20x8", "28x16x4", "28x16x8"]
    assert {n: b.samples for n, b in buckets.items() if b.samples} == counts
    assert result.bucket_samples == {n: counts.get(n, 0) for n in buckets}
    for name, b in buckets.items():
        assert list(b.latent_shape) == [b.frames, 12, b.height // 2, b.width // 2]
        assert name == f"{b.height}x{b.width}x{b.frames}"
    assert index["latent_shape"] == [4, 12, 8, 14] and index["num_samples"] == len(fits)
    assert all(e["name"].startswith(f"{e['bucket']}/shard-") for e in index["shards"])
    for b in ("16x28x8", "20x20x4"):
        got = REGISTRY.get_sample_value("trip_preprocess_bucket_samples_total", {"bucket": b}) - before[b]
        assert got == counts[b]

    codec, seen = LosslessCodec(2), {}
    spec = SamplingSpec(fps=4.0)
    for entry in index["shards"]:
        b = buckets[entry["bucket"]]
        contents = read_shard(os.path.join(out, entry["name"]), latent_shape=b.latent_shape)
        assert not contents.bad and len(contents.samples) == entry["samples"]
        for sample in contents.samples:
            meta = sample.meta
            seen[meta["videoid"]] = entry["bucket"]
            assert meta["bucket"] == entry["bucket"] and meta["resolution"] == [b.height, b.width]
            assert meta["num_frames"] == b.frames == sample.latents.shape[0]
            # the cover resize matches the bucket on one side and exceeds it on at most the other
            src_w, src_h = meta["src_size"]
            rh, rw = meta["resized_size"]
            assert [rw, rh] == list(resized_size(src_w, src_h, (b.height, b.width)))
            assert (rh == b.height and rw >= b.width) or (rw == b.width and rh >= b.height)
            assert meta["crop"] <= pre.bucket_max_crop
            # the latents are exactly the frames of the clip decoded into that bucket
            frames = codec.decode(torch.from_numpy(sample.latents.astype(np.float32)))
            back = (frames * 255).round().byte().permute(0, 2, 3, 1).numpy()
            clip = decode_bucketed(rows[int(sample.key)].url, spec, config_buckets(pre), max_crop=pre.bucket_max_crop)
            np.testing.assert_array_equal(back, clip.frames)
    assert seen == fits

    # the training loader reads the set as written: every sample once, each batch one bucket's
    from trip.config import DataConfig
    from trip.data import LatentLoader

    delivered = []
    for rank in range(2):
        loader = LatentLoader(DataConfig(dataset=out, micro_batch_size=2, num_workers=0, uneven="pad"), rank, 2)
        for batch in loader:
            assert tuple(batch["latents"].shape[1:]) == buckets[batch["bucket"]].latent_shape
            delivered += [(k, batch["bucket"]) for k, ok in zip(batch["keys"], batch["valid"].tolist()) if ok]
    assert len(delivered) == len(fits) == len(set(delivered))
    assert all(fits[rows[int(k)].videoid] == b for k, b in delivered)

    with open(os.path.join(out, "errors.jsonl")) as f:
        errors = {e["videoid"]: e for e in map(json.loads, f)}
    assert sorted(errors) == sorted(v for v, b in want.items() if b is None)
    assert all(e["stage"] == "bucket" and e["status"] == "skipped" for e in errors.values())
    too_wide = [rows[i].videoid for i in range(NUM) if i % len(VARIANTS) == 5]
    too_short = [rows[i].videoid for i in range(NUM) if i % len(VARIANTS) == 6]
    for v in too_wide:
        assert errors[v]["reason"].startswith("aspect 4.00 (W/H): nearest bucket 16x28x8 (1.75) would crop 56% "
                                              "> preprocess.bucket_max_crop=0.25")
    for v in too_short:
        assert errors[v]["reason"].startswith("1 frame at 4 fps, the shortest bucket needs 4")


def test_a_bucketed_rerun_after_a_crash_equals_a_clean_run(ray_two_cpus, corpus, tmp_path) -> None:
    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")

    class Crash(RuntimeError):
        pass

    def crash_after_the_first(shard: int, record: dict, stats: dict) -> None:
        # the task committed its bucket tars before the driver heard of it
        names = [i["name"] for i in record["infos"]]
        assert names and all(os.path.isfile(os.path.join(crashed, n)) for n in names)
        raise Crash(f"stopping after shard {shard}")

    with pytest.raises(Crash):
        run_preprocess(_pre(corpus, crashed), CodecConfig(kind="lossless", downscale=2), progress=False,
                       on_shard_committed=crash_after_the_first)
    partial = read_tree(crashed)
    assert "index.json" not in partial and any(k.endswith(".tar") for k in partial)

    resumed = run_preprocess(_pre(corpus, crashed), CodecConfig(kind="lossless", downscale=2), progress=False)
    assert resumed.shards_skipped == 1
    fresh = run_preprocess(_pre(corpus, clean), CodecConfig(kind="lossless", downscale=2), progress=False)
    assert fresh.shards_skipped == 0
    a, b = read_tree(crashed), read_tree(clean)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], key
    assert not [k for k in a if os.path.basename(k).startswith(".")]  # no partial tar is left behind
    for key, data in partial.items():
        # committed tars are kept as they were; a cancelled task's partial tar (a hidden name no
        # reader lists, removed by the task or by the rerun) may be caught mid-write
        if key.endswith(".tar") and not os.path.basename(key).startswith("."):
            assert a[key] == data, key
    assert {k.split("/")[0] for k in a if k.endswith(".tar")} == {
        "16x28x4", "16x28x8", "20x20x4", "20x20x8", "28x16x8"}

    # another bucket list is another job: its records are refused, not mixed in
    from data_tools.write import JobMismatchError

    with pytest.raises(JobMismatchError):
        run_preprocess(_pre(corpus, clean, bucket_max_crop=0.5), CodecConfig(kind="lossless", downscale=2),
                       progress=False)
