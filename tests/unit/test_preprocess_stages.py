"""The job's stages on their own, without Ray: decoding a row, encoding a batch, one shard
task from CSV byte range to committed tar."""

from __future__ import annotations

import os

import numpy as np

from data_tools.decode import SamplingSpec
from data_tools.synth import write_csv, write_video
from data_tools.webvid import VideoRow, scan_csv
from pipelines.preprocess import Encoder, ShardJob, decode_row, write_shard
from trip.config import CodecConfig, PreprocessConfig
from trip.data.shards import read_shard

SPEC = SamplingSpec(num_frames=2, fps=8.0, resolution=16)


def _row(i: int, url: str) -> VideoRow:
    return VideoRow(videoid=str(i), url=url, caption=f"clip {i}", duration=1.0, page_dir="d", extra="{}")


def test_decode_row_reports_skips_and_passes_clips(tmp_path) -> None:
    path = write_video(np.zeros((4, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"))
    clip, good = decode_row(_row(0, path), SPEC)
    assert good.status == "ok" and clip is not None and clip.shape == (2, 16, 16, 3)
    clip, gone = decode_row(_row(1, str(tmp_path / "gone.mp4")), SPEC)
    assert clip is None and (gone.status, gone.stage) == ("skipped", "fetch")
    clip, odd = decode_row(_row(2, None), SPEC)  # type: ignore[arg-type]  # a bug, not bad input
    assert clip is None and odd.status == "error" and odd.stage == "decode" and "Error" in odd.reason


def test_decode_row_looks_for_other_extensions_when_told(tmp_path) -> None:
    found = write_video(np.zeros((4, 16, 16, 3), np.uint8), str(tmp_path / "v.mkv"))
    guess = str(tmp_path / "v.mp4")
    assert decode_row(_row(0, guess), SPEC)[1].stage == "fetch"
    clip, o = decode_row(_row(0, guess), SPEC, other_exts=True)
    assert o.status == "ok" and clip is not None and o.meta["source_url"] == found
    _, gone = decode_row(_row(1, str(tmp_path / "gone.mp4")), SPEC, other_exts=True)
    assert gone.stage == "fetch" and "gone.m4v" in gone.reason


def test_encoder_encodes_a_batch_of_clips() -> None:
    enc = Encoder(CodecConfig(kind="lossless", downscale=2), None, 8, 4)
    lat, text, seconds = enc.encode(np.zeros((3, 2, 16, 16, 3), np.uint8), ["a", "b", "c"])
    assert lat.shape == (3, 2, 12, 8, 8) and lat.dtype == np.float16 and text is None and seconds >= 0


def _job(tmp_path, videos: list[str | None], resolution: int | tuple[int, int] = 16,
         latent_shape: tuple[int, ...] = (2, 12, 8, 8)) -> tuple[ShardJob, object]:
    rows = [{"videoid": str(i), "contentUrl": v or str(tmp_path / f"missing{i}.mp4"), "duration": "PT1S",
             "page_dir": "d", "name": f"clip {i}"} for i, v in enumerate(videos)]
    csv = write_csv(str(tmp_path / "r.csv"), rows, columns=["videoid", "contentUrl", "duration", "page_dir", "name"])
    pre = PreprocessConfig(csv=csv, output=str(tmp_path / "out"), num_frames=2, fps=8.0, resolution=resolution,
                           encode_batch_size=2)  # one clip a batch: several batches in flight
    plan = scan_csv(csv)
    job = ShardJob(pre=pre, codec=CodecConfig(kind="lossless", downscale=2), columns=plan.columns,
                   identity={"fingerprint": "f", "plan": "p"}, latent_shape=list(latent_shape), text_shape=None)
    return job, plan


def test_a_shard_task_writes_its_rows_in_order_and_names_the_failures(tmp_path) -> None:
    video = write_video(np.full((4, 16, 16, 3), 128, np.uint8), str(tmp_path / "v.mp4"))
    job, plan = _job(tmp_path, [video, None, video, video])
    out = write_shard(job, plan.shard(0, 4))
    record, stats = out["record"], out["stats"]
    assert stats["counts"] == {"ok": 3, "skipped": 1, "error": 0}
    assert record["info"]["samples"] == 3 and record["shard"] == "shard-000000.tar"
    assert [(e["videoid"], e["stage"]) for e in record["errors"]] == [("1", "fetch")]
    keys = read_shard(os.path.join(job.pre.output, "shard-000000.tar")).keys
    assert keys == ["000000000", "000000002", "000000003"]
    # the second shard of two rows a shard starts at row 2
    assert write_shard(job, plan.shard(1, 2))["record"]["info"]["samples"] == 2


def test_an_encode_failure_is_its_videos_error_not_the_shards(tmp_path) -> None:
    # 15 px clips decode fine but the 2x pixel-unshuffle codec refuses them: every batch fails
    video = write_video(np.zeros((4, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"))
    job, plan = _job(tmp_path, [video, video], resolution=15)
    out = write_shard(job, plan.shard(0, 2))
    assert out["stats"]["counts"] == {"ok": 0, "skipped": 0, "error": 2}
    assert {e["stage"] for e in out["record"]["errors"]} == {"encode"}
    assert "divisible" in out["record"]["errors"][0]["reason"] and out["record"]["info"] is None


def test_a_shard_task_writes_non_square_latents_of_a_height_width_resolution(tmp_path) -> None:
    from data_tools.encode import latent_shape

    shape = latent_shape(CodecConfig(kind="lossless", downscale=2), 2, (16, 24))
    assert shape == [2, 12, 8, 12]
    video = write_video(np.full((4, 32, 64, 3), 128, np.uint8), str(tmp_path / "wide.mp4"))
    job, plan = _job(tmp_path, [video, video], resolution=(16, 24), latent_shape=tuple(shape))
    out = write_shard(job, plan.shard(0, 2))
    assert out["stats"]["counts"] == {"ok": 2, "skipped": 0, "error": 0}
    contents = read_shard(os.path.join(job.pre.output, "shard-000000.tar"), latent_shape=shape)
    assert len(contents.keys) == 2 and not contents.bad and contents.samples[0].latents.shape == (2, 12, 8, 12)
