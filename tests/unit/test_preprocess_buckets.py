"""Buckets of a multi-shape preprocessing job: the assignment rule, the config, one shard task."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_tools.buckets import (
    BucketShape,
    assign_bucket,
    config_buckets,
    crop_fraction,
    sampling_words,
)
from data_tools.synth import ShapeMotion, draw_motion, write_csv, write_video
from data_tools.webvid import scan_csv
from pipelines.preprocess import ShardJob, _bucket_specs, _fingerprint, write_shard
from trip.config import BucketGrid, CodecConfig, ConfigError, PreprocessConfig, config_from_dict
from trip.data.shards import read_shard

WIDE8, WIDE16 = BucketShape(64, 112, 8), BucketShape(64, 112, 16)
SQUARE8, SQUARE16 = BucketShape(80, 80, 8), BucketShape(80, 80, 16)
TALL8 = BucketShape(112, 64, 8)
ALL = [WIDE8, WIDE16, SQUARE8, SQUARE16, TALL8]


def pick(width: int, height: int, frames: int, buckets=ALL, max_crop: float = 0.25):
    return assign_bucket(width, height, frames, buckets, max_crop=max_crop, sampling="at 4 fps")


@pytest.mark.parametrize(("size", "frames", "want"), [
    ((1920, 1080), 40, WIDE16),  # 16:9, long: the longest bucket at its aspect
    ((1920, 1080), 12, WIDE8),  # too short for 16 frames
    ((1080, 1920), 40, TALL8),  # portrait: the only portrait bucket has 8 frames
    ((480, 480), 16, SQUARE16),
    ((600, 480), 9, SQUARE8),  # 5:4 is nearer 1:1 than 7:4 in log distance
    ((640, 480), 9, WIDE8),  # 4:3 is (just) nearer 7:4 than 1:1
    ((854, 480), 8, WIDE8),
])
def test_nearest_aspect_then_the_longest_frames(size, frames, want) -> None:
    got = pick(*size, frames)
    assert got.bucket == want, got
    assert got.crop == pytest.approx(crop_fraction(size[0] / size[1], want.aspect))


def test_a_shorter_aspect_match_loses_to_a_bucket_it_cannot_fill_only_by_frames() -> None:
    # 16:9 with 16 frames only: a 10-frame landscape clip goes to the nearest 8-frame bucket
    buckets = [WIDE16, SQUARE8]
    assert pick(1120, 640, 10, buckets, max_crop=0.5).bucket == SQUARE8
    assert pick(1120, 640, 16, buckets, max_crop=0.5).bucket == WIDE16


def test_ties_prefer_more_pixels_then_config_order() -> None:
    small, big = BucketShape(32, 32, 8), BucketShape(64, 64, 8)
    assert pick(100, 100, 8, [small, big]).bucket == big
    assert pick(100, 100, 8, [big, small]).bucket == big
    # a square clip is as far from 4:3 as from 3:4: the first listed wins
    land, port = BucketShape(48, 64, 8), BucketShape(64, 48, 8)
    assert pick(100, 100, 8, [land, port], max_crop=0.3).bucket == land
    assert pick(100, 100, 8, [port, land], max_crop=0.3).bucket == port


def test_too_short_for_every_bucket_says_how_many_frames_it_has() -> None:
    got = pick(1920, 1080, 3)
    assert got.bucket is None
    assert got.reason == "3 frames at 4 fps, the shortest bucket needs 8"
    assert pick(1920, 1080, 1).reason.startswith("1 frame at 4 fps")


def test_an_aspect_far_from_every_bucket_is_refused_with_the_crop() -> None:
    got = pick(400, 100, 8, [WIDE8])
    assert got.bucket is None and got.crop == pytest.approx(1 - 1.75 / 4)
    assert got.reason == ("aspect 4.00 (W/H): nearest bucket 64x112x8 (1.75) would crop 56% > "
                          "preprocess.bucket_max_crop=0.25")
    assert pick(400, 100, 8, [WIDE8], max_crop=0.6).bucket == WIDE8


def test_crop_fraction_is_symmetric_and_zero_at_equal_aspects() -> None:
    assert crop_fraction(2.0, 2.0) == 0.0
    assert crop_fraction(2.0, 1.0) == crop_fraction(1.0, 2.0) == 0.5
    assert sampling_words(None, 2, 1.5) == "at stride 2 from 1.5s" and sampling_words(4.0, None) == "at 4 fps"


# --------------------------------------------------------------------------- config


def test_buckets_from_a_list_and_from_a_grid() -> None:
    pre = config_from_dict({"preprocess": {"buckets": [[64, 112, 8], [80, 80, 16]]}}).preprocess
    assert config_buckets(pre) == [WIDE8, SQUARE16]
    grid = config_from_dict({"preprocess": {"buckets": {"aspects": ["16:9", "1:1", "9:16"], "pixels": 65536,
                                                         "frames": [8, 16], "multiple_of": 16}}}).preprocess
    assert isinstance(grid.buckets, BucketGrid)
    assert grid.bucket_shapes() == [(192, 336, 8), (192, 336, 16), (256, 256, 8), (256, 256, 16),
                                    (336, 192, 8), (336, 192, 16)]
    for h, w, _ in grid.bucket_shapes():
        assert h % 16 == 0 and w % 16 == 0 and abs(h * w - 65536) / 65536 < 0.05
    assert PreprocessConfig().buckets is None and config_buckets(PreprocessConfig()) is None


@pytest.mark.parametrize(("buckets", "match"), [
    ([[64, 112, 8], [64, 112, 8]], r"bucket 64x112x8 \(HxWxF\) appears twice"),
    ([[0, 112, 8]], r"preprocess.buckets\[0\] must be \[height, width, frames\] of integers >= 1"),
    ([[64, 112, -1]], r"preprocess.buckets\[0\]"),
    ([], "at least one"),
    ([[64, 112]], "'preprocess.buckets\\[0\\]' must have 3 entries"),
    ({"aspects": ["wide"]}, r"preprocess.buckets.aspects: 'wide' is not an aspect ratio"),
    ({"aspects": ["16:0"]}, r"preprocess.buckets.aspects"),
    ({"aspect": ["1:1"]}, r"unknown key 'preprocess.buckets.aspect'"),
    ({"pixels": 0}, r"preprocess.buckets.pixels must be >= 1"),
    ({"frames": [8, 8]}, r"preprocess.buckets.frames lists a count twice"),
    ({"frames": []}, r"preprocess.buckets.frames"),
    ({"multiple_of": 0}, r"preprocess.buckets.multiple_of must be >= 1"),
    ({"aspects": ["16:9", "17:9"], "pixels": 256, "multiple_of": 16}, "round to the same size"),
])
def test_bad_buckets_name_the_field(buckets, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"preprocess": {"buckets": buckets}})


def test_bucket_max_crop_must_be_a_fraction() -> None:
    with pytest.raises(ConfigError, match=r"preprocess.bucket_max_crop must lie in \[0, 1\)"):
        config_from_dict({"preprocess": {"bucket_max_crop": 1.0}})


def test_a_bucket_the_codec_cannot_encode_names_the_bucket() -> None:
    with pytest.raises(ConfigError, match=r"bucket 30x40x8 .*not divisible by the codec's downscale 4"):
        _bucket_specs(CodecConfig(kind="lossless", downscale=4), [BucketShape(30, 40, 8)])
    assert _bucket_specs(CodecConfig(kind="lossless", downscale=2), [BucketShape(16, 28, 4)]) == [
        {"name": "16x28x4", "height": 16, "width": 28, "frames": 4, "latent_shape": [4, 12, 8, 14]}]


def test_the_fingerprint_covers_buckets_but_not_an_unbucketed_job() -> None:
    base = PreprocessConfig(csv="a", output="b")
    fp = _fingerprint(base, {"kind": "lossless"}, None, 4)
    assert fp == _fingerprint(PreprocessConfig(csv="a", output="b", bucket_max_crop=0.5), {"kind": "lossless"}, None, 4)
    one = _fingerprint(PreprocessConfig(csv="a", output="b", buckets=((16, 16, 4),)), {"kind": "lossless"}, None, 4)
    two = _fingerprint(PreprocessConfig(csv="a", output="b", buckets=((16, 16, 4), (16, 28, 4))),
                       {"kind": "lossless"}, None, 4)
    assert len({fp, one, two}) == 3


# --------------------------------------------------------------------------- one shard task


def test_a_shard_task_writes_one_tar_per_bucket_in_row_order(tmp_path) -> None:
    m = ShapeMotion("circle", "red", "left", 0.5)
    videos = [((32, 56), 2.0), ((56, 32), 2.0), ((32, 56), 1.0), ((32, 32), 2.0), ((16, 64), 2.0),
              ((32, 56), 2.0), ((32, 32), 0.2)]
    rows = []
    for i, (hw, seconds) in enumerate(videos):
        path = write_video(draw_motion(m, hw, round(seconds * 8)), str(tmp_path / f"v{i}.mp4"), fps=8)
        rows.append({"videoid": str(i), "contentUrl": path, "duration": "PT2S", "page_dir": "d", "name": f"clip {i}"})
    csv = write_csv(str(tmp_path / "r.csv"), rows, columns=["videoid", "contentUrl", "duration", "page_dir", "name"])
    pre = PreprocessConfig(csv=csv, output=str(tmp_path / "out"), fps=4.0, encode_batch_size=4,
                           buckets=((16, 28, 4), (16, 28, 8), (20, 20, 4), (28, 16, 4)))
    codec = CodecConfig(kind="lossless", downscale=2)
    specs = _bucket_specs(codec, config_buckets(pre))
    plan = scan_csv(csv)
    job = ShardJob(pre=pre, codec=codec, columns=plan.columns, identity={"fingerprint": "f", "plan": "p"},
                   latent_shape=specs[0]["latent_shape"], text_shape=None,
                   latent_shapes={s["name"]: s["latent_shape"] for s in specs})
    out = write_shard(job, plan.shard(0, 7))
    record, stats = out["record"], out["stats"]
    assert stats["counts"] == {"ok": 5, "skipped": 2, "error": 0}
    assert stats["buckets"] == {"16x28x8": 2, "28x16x4": 1, "16x28x4": 1, "20x20x4": 1}
    assert [(i["name"], i["samples"], i["bucket"]) for i in record["infos"]] == [
        ("16x28x4/shard-000000.tar", 1, "16x28x4"), ("16x28x8/shard-000000.tar", 2, "16x28x8"),
        ("20x20x4/shard-000000.tar", 1, "20x20x4"), ("28x16x4/shard-000000.tar", 1, "28x16x4")]
    assert [(e["videoid"], e["stage"]) for e in record["errors"]] == [("4", "bucket"), ("6", "bucket")]
    assert "would crop 56%" in record["errors"][0]["reason"]
    assert "1 frame at 4 fps, the shortest bucket needs 4" in record["errors"][1]["reason"]
    wide = read_shard(os.path.join(pre.output, "16x28x8/shard-000000.tar"), latent_shape=[8, 12, 8, 14])
    assert wide.keys == ["000000000", "000000005"] and not wide.bad
    meta = wide.samples[0].meta
    assert meta["bucket"] == "16x28x8" and meta["resolution"] == [16, 28] and meta["num_frames"] == 8
    assert json.loads(json.dumps(meta))["src_size"] == [56, 32]
    assert wide.samples[0].latents.shape == (8, 12, 8, 14) and np.isfinite(wide.samples[0].latents).all()


# --------------------------------------------------------------------------- validate, inspect, eval


def test_validate_inspect_and_eval_read_a_bucketed_set_by_each_shards_shape(tmp_path, capsys) -> None:
    import shutil

    from data_tools.check import validate_dataset
    from data_tools.cli import main as data_tools_main
    from data_tools.synth import write_synthetic_buckets
    from trip.eval.shardset import first_samples

    prefix = str(tmp_path / "set")
    index = write_synthetic_buckets(prefix, {"8x14x4": ((4, 12, 4, 7), [3, 2]), "10x10x2": ((2, 12, 5, 5), [1])})
    assert validate_dataset(prefix)[1] == []
    assert [s.latents.shape for s in first_samples(prefix, index)] == [(2, 12, 5, 5)] + [(4, 12, 4, 7)] * 5
    assert data_tools_main(["validate", prefix]) == 0
    assert "2 buckets" in capsys.readouterr().out
    assert data_tools_main(["inspect", prefix, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "bucket 8x14x4: None" not in out and "latents [4, 12, 4, 7], 5 samples in 2 shards" in out
    # a tar in a bucket folder that index.json does not list is a problem
    shutil.copy(os.path.join(prefix, "8x14x4/shard-000000.tar"), os.path.join(prefix, "8x14x4/shard-000009.tar"))
    assert validate_dataset(prefix)[1] == ["8x14x4/shard-000009.tar: in " + prefix + " but not listed in index.json"]


def test_the_run_config_schema_takes_both_bucket_forms_and_names_a_bad_one() -> None:
    import jsonschema

    from trip.config_schema import run_config_schema

    validator = jsonschema.Draft7Validator(run_config_schema())
    for good in ([[64, 112, 8]], {"aspects": ["16:9"], "pixels": 4096, "frames": [8]}, None):
        assert not list(validator.iter_errors({"preprocess": {"buckets": good}})), good
        config_from_dict({"preprocess": {"buckets": good}})
    for bad in ([[64, 112]], {"aspect": ["16:9"]}, "wide"):
        errors = list(validator.iter_errors({"preprocess": {"buckets": bad}}))
        assert errors and list(errors[0].absolute_path)[:2] == ["preprocess", "buckets"], bad
        with pytest.raises(ConfigError, match="preprocess.buckets"):
            config_from_dict({"preprocess": {"buckets": bad}})


def test_a_rotated_phone_video_goes_to_the_portrait_bucket_upright(tmp_path) -> None:
    from data_tools.decode import SamplingSpec, decode_bucketed
    from tests.unit.test_preprocess_decode import _rotated_video

    # stored 64 x 32 landscape, displayed 32 wide x 64 tall: the portrait bucket, whole
    path = _rotated_video(str(tmp_path / "rot.mp4"), "mpeg4")
    clip = decode_bucketed(path, SamplingSpec(fps=8.0), [BucketShape(16, 32, 2), BucketShape(32, 16, 2)],
                           max_crop=0.25)
    assert clip.meta["bucket"] == "32x16x2" and clip.meta["rotation"] == 90
    assert clip.meta["src_size"] == [64, 32] and clip.meta["resized_size"] == [32, 16] and clip.meta["crop"] == 0
    f = clip.frames[0].mean(axis=2)
    assert clip.frames.shape == (2, 32, 16, 3) and f[:, :2].mean() > 200 and f[:, -4:].mean() < 30


def test_synth_draws_landscape_portrait_and_square_clips_of_several_lengths(tmp_path) -> None:
    import av

    from data_tools.synth import make_dataset
    from data_tools.webvid import read_rows

    m = ShapeMotion("square", "blue", "right", 0.5)
    wide = draw_motion(m, (16, 40), 3)
    assert wide.shape == (3, 16, 40, 3)
    assert np.array_equal(draw_motion(m, (24, 24), 3), draw_motion(m, 24, 3))  # a pair of equal sides is the int
    csv = make_dataset(str(tmp_path), num=3, fps=8, holdout=1, size=(16, 24),
                       variants=[((16, 32), 1.0), ((32, 16), 2.0), (16, 0.5)])
    rows = read_rows(csv).rows
    got = []
    for r in rows:
        with av.open(r.url) as c:
            s = c.streams.video[0]
            got.append((s.height, s.width, sum(1 for _ in c.decode(s))))
    assert got == [(16, 32, 8), (32, 16, 16), (16, 16, 4)]
    assert [r.duration for r in rows] == [1.0, 2.0, 0.0]  # the CSV's ISO durations, whole seconds
    with av.open(str(tmp_path / "holdout" / "000.mp4")) as c:
        assert (c.streams.video[0].height, c.streams.video[0].width) == (16, 24)
    with pytest.raises(ValueError, match="even"):
        make_dataset(str(tmp_path / "odd"), num=1, holdout=0, variants=[((15, 32), 1.0)])
