"""The preprocessing job end to end on a real local Ray (2 CPUs) and a moto S3 server.

synth videos -> shard tasks (decode, encode in the task or through encoder actors, commit)
-> shards + index.json + errors manifest, with a tiny random AutoencoderKL and CLIP text
encoder saved in diffusers layout; then every shard is read back and compared with a
direct encode of the clip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import s3fs
import yaml
from prometheus_client import REGISTRY

from data_tools.check import validate_dataset
from data_tools.decode import SamplingSpec, decode_clip
from data_tools.encode import ClipEncoder
from data_tools.models import save_random_clip_text, save_random_vae
from data_tools.synth import make_dataset, write_csv, write_video
from data_tools.webvid import read_rows
from pipelines.preprocess import run_preprocess
from trip import storage
from trip.codec import LosslessCodec
from trip.config import CodecConfig, PreprocessConfig
from trip.data.shards import read_shard

pytestmark = pytest.mark.integration

SPEC = SamplingSpec(num_frames=4, fps=4.0, resolution=16)


@pytest.fixture(scope="module")
def ray_local(s3_server: str, tmp_path_factory):
    """One local Ray for the module; started after the S3 env is set so workers inherit it."""
    import ray

    os.environ["TRIP_CACHE"] = str(tmp_path_factory.mktemp("trip-cache"))
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, str]:
    """5 synthetic videos (1.5 s at 8 fps, 32 px) and tiny diffusers-format models."""
    root = str(tmp_path_factory.mktemp("preprocess-data"))
    make_dataset(os.path.join(root, "webvid"), num=5, seed=1, size=32, seconds=1.5, fps=8, holdout=0)
    models = os.path.join(root, "models")
    save_random_vae(models, block_out_channels=(8, 16), latent_channels=4)
    save_random_clip_text(models, hidden_size=16)
    return {"root": root, "webvid": os.path.join(root, "webvid"), "models": models}


def _bucket(endpoint: str, name: str) -> s3fs.S3FileSystem:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def _objects(prefix: str) -> dict[str, bytes]:
    fs, root = storage.filesystem(prefix)
    fs.invalidate_cache()
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root)}


def _pre(local: dict[str, str], output: str, **kw) -> PreprocessConfig:
    base = dict(csv=os.path.join(local["webvid"], "results.csv"),
                video_root=os.path.join(local["webvid"], "videos"), output=output, num_frames=4,
                fps=4.0, resolution=16, samples_per_shard=2, encode_batch_size=8)
    base.update(kw)
    return PreprocessConfig(**base)


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_vae_and_clip_job_from_and_to_s3(ray_local, s3_server, local_data) -> None:
    fs = _bucket(s3_server, "pp-vae")
    fs.put(local_data["webvid"] + "/", "pp-vae/webvid", recursive=True)
    fs.put(local_data["models"] + "/", "pp-vae/models/tiny", recursive=True)
    fs.invalidate_cache()
    model_url, out = "s3://pp-vae/models/tiny", "s3://pp-vae/shards"
    ok_before = _counter("trip_preprocess_videos_total", status="ok")
    bytes_before = _counter("trip_preprocess_bytes_total")
    # encoder actors (what a GPU cluster uses), fed batches by the shard tasks
    pre = _pre(local_data, out, csv="s3://pp-vae/webvid/results.csv",
               video_root="s3://pp-vae/webvid/videos", text_encoder=model_url, max_text_length=8,
               encode_on="actors", encode_actors=1, encode_batch_size=4)
    result = run_preprocess(pre, CodecConfig(kind="vae", path=model_url), progress=False)
    assert (result.ok, result.skipped, result.errors, result.shards) == (5, 0, 0, 3)

    index, problems = validate_dataset(out)
    assert problems == []
    assert index["num_samples"] == 5 and [s["samples"] for s in index["shards"]] == [2, 2, 1]
    assert index["latent_shape"] == [4, 4, 8, 8] and index["text_shape"] == [8, 16]
    assert index["codec"] == {"kind": "vae", "source": model_url, "scaling_factor": 0.18215,
                              "latent_channels": 4, "downscale": 2}
    assert index["scaling_factor"] == 0.18215
    assert index["text_encoder"]["hidden_size"] == 16 and index["text_encoder"]["source"] == model_url
    assert len(index["latent_mean"]) == 4 and min(index["latent_std"]) > 0
    assert storage.read_bytes(f"{out}/errors.jsonl") == b""
    assert _counter("trip_preprocess_videos_total", status="ok") - ok_before == 5
    assert _counter("trip_preprocess_bytes_total") - bytes_before == sum(s["bytes"] for s in index["shards"])

    # every latent equals a direct encode of the same clip from the local copy
    rows = read_rows(os.path.join(local_data["webvid"], "results.csv"),
                     video_root=os.path.join(local_data["webvid"], "videos")).rows
    direct = ClipEncoder(CodecConfig(kind="vae", path=local_data["models"]),
                         text_encoder=local_data["models"], max_text_length=8, device="cpu")
    seen = []
    for entry in index["shards"]:
        for sample in read_shard(f"{out}/{entry['name']}").samples:
            row = rows[int(sample.key)]
            assert sample.meta["videoid"] == row.videoid and sample.caption == row.caption
            assert sample.meta["extra"]["direction"] in row.caption
            assert sample.latents.dtype == np.float16 and sample.text.dtype == np.float16
            clip = decode_clip(row.url, SPEC)
            want = direct.encode_frames(clip.frames[None])[0]
            np.testing.assert_allclose(sample.latents.astype(np.float32), want.astype(np.float32),
                                       atol=2e-3, rtol=2e-3)
            np.testing.assert_array_equal(sample.text, direct.encode_text([row.caption])[0])
            seen.append(row.videoid)
    assert seen == [r.videoid for r in rows]


def test_lossless_through_trip_cli_reproduces_the_decoded_clip(ray_local, local_data, tmp_path) -> None:
    from trip.cli import main as trip_main

    out = str(tmp_path / "shards")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"num_frames": 4, "latent_channels": 12, "latent_size": 8},
        "codec": {"kind": "lossless", "downscale": 2},
        "preprocess": {"csv": os.path.join(local_data["webvid"], "results.csv"),
                       "video_root": os.path.join(local_data["webvid"], "videos"),
                       "output": out, "num_frames": 4, "fps": 4.0, "resolution": 16,
                       "samples_per_shard": 4},
    }))
    assert trip_main(["preprocess", "--config", str(config), "--set", "preprocess.limit=4"]) == 0
    index, problems = validate_dataset(out)
    assert problems == [] and index["num_samples"] == 4 and index["num_rows"] == 4
    rows = read_rows(os.path.join(local_data["webvid"], "results.csv"),
                     video_root=os.path.join(local_data["webvid"], "videos")).rows
    codec = LosslessCodec(2)
    for sample in read_shard(os.path.join(out, "shard-000000.tar")).samples:
        import torch

        frames = codec.decode(torch.from_numpy(sample.latents.astype(np.float32)))
        back = (frames * 255).round().byte().permute(0, 2, 3, 1).numpy()
        clip = decode_clip(rows[int(sample.key)].url, SPEC)
        np.testing.assert_array_equal(back, clip.frames)


def test_rerun_after_a_crash_equals_a_clean_run(ray_local, s3_server, local_data, tmp_path) -> None:
    # 5 good rows + a zero-byte video, so the errors manifest is part of the comparison
    webvid = local_data["webvid"]
    rows = _csv_dicts(os.path.join(webvid, "results.csv"))
    open(os.path.join(tmp_path, "empty.mp4"), "wb").close()
    rows.insert(2, {**rows[0], "videoid": "999", "contentUrl": str(tmp_path / "empty.mp4"),
                    "name": "an empty file"})
    csv_path = write_csv(str(tmp_path / "results.csv"), rows)
    _bucket(s3_server, "pp-resume")
    crashed, clean = "s3://pp-resume/crashed", "s3://pp-resume/clean"
    kw = dict(csv=csv_path, video_root=None)

    class Crash(RuntimeError):
        pass

    writers = []

    def crash_after_the_first(shard: int, record: dict, stats: dict) -> None:
        # the task committed the tar before the driver heard of it
        assert record["shard"] in {k.lstrip("/") for k in _objects(crashed)}
        writers.append(stats["pid"])
        raise Crash(f"stopping after shard {shard}")

    with pytest.raises(Crash):
        run_preprocess(_pre(local_data, crashed, **kw), CodecConfig(), progress=False,
                       on_shard_committed=crash_after_the_first)
    assert writers and writers[0] != os.getpid()  # written by a worker task, not the driver
    partial = _objects(crashed)
    # the one record the driver saw is in the manifest; the other task in flight was
    # cancelled, and may or may not have committed its shard (the rerun redoes it either way)
    assert "/_progress/records-000000.jsonl" in partial
    assert len(partial["/_progress/records-000000.jsonl"].decode().splitlines()) == 1
    tars = {k for k in partial if k.endswith(".tar")}
    assert 1 <= len(tars) <= 2 and len(partial) == len(tars) + 1

    resumed = run_preprocess(_pre(local_data, crashed, **kw), CodecConfig(), progress=False)
    assert resumed.shards_skipped == 1 and resumed.ok + resumed.skipped == 4
    fresh = run_preprocess(_pre(local_data, clean, **kw), CodecConfig(), progress=False)
    assert fresh.shards_skipped == 0 and (fresh.ok, fresh.skipped) == (5, 1)

    a, b = _objects(crashed), _objects(clean)
    assert sorted(a) == sorted(b)
    assert {k for k in a if k.endswith(".tar")} == {f"/shard-00000{i}.tar" for i in range(3)}
    for key in a:
        assert a[key] == b[key], key
    assert "/_progress/records.jsonl" in a  # segments compacted: the same files as a clean run
    for key in tars:
        assert a[key] == partial[key]
    errors = [json.loads(line) for line in a["/errors.jsonl"].decode().splitlines()]
    assert [(e["videoid"], e["stage"]) for e in errors] == [("999", "fetch")]


def _csv_dicts(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bad_inputs_go_to_the_errors_manifest_and_the_rest_is_done(ray_local, local_data,
                                                                  tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    good = _csv_dicts(os.path.join(local_data["webvid"], "results.csv"))[:3]
    for r in good:
        shutil.copy(r["contentUrl"], videos / f"{r['videoid']}.mp4")
    whole = open(good[0]["contentUrl"], "rb").read()
    (videos / "501.mp4").write_bytes(whole[: len(whole) // 3])  # truncated
    (videos / "502.mp4").write_bytes(b"")  # zero bytes
    (videos / "503.mp4").write_text("<html>AccessDenied</html>\n" * 10)  # not a video
    write_video(np.zeros((2, 16, 16, 3), np.uint8), str(videos / "504.mp4"), fps=8)  # too short
    bad = [{"videoid": str(v), "contentUrl": "", "duration": "PT00H00M05S", "page_dir": "x",
            "name": f"bad {v}"} for v in (501, 502, 503, 504, 505)]  # 505 has no file at all
    rows = [good[0], *bad[:3], good[1], *bad[3:], good[2]]
    csv_path = write_csv(str(tmp_path / "results.csv"), rows)
    out = str(tmp_path / "shards")
    result = run_preprocess(_pre(local_data, out, csv=csv_path, video_root=str(videos),
                                 path_template="{videoid}.mp4", samples_per_shard=3),
                            CodecConfig(), progress=False)
    assert (result.ok, result.skipped, result.errors) == (3, 5, 0)
    index, problems = validate_dataset(out)
    assert problems == [] and index["num_samples"] == 3 and index["num_errors"] == 5
    keys = [s.meta["videoid"] for e in index["shards"] for s in read_shard(f"{out}/{e['name']}").samples]
    assert keys == [r["videoid"] for r in good]
    with open(os.path.join(out, "errors.jsonl")) as f:
        errors = {e["videoid"]: e for e in map(json.loads, f)}
    assert sorted(errors) == ["501", "502", "503", "504", "505"]
    assert errors["502"]["stage"] == "fetch" and "empty file" in errors["502"]["reason"]
    assert errors["505"]["stage"] == "fetch" and "file not found" in errors["505"]["reason"]
    assert errors["503"]["stage"] == "decode" and "not a decodable video" in errors["503"]["reason"]
    assert errors["504"]["stage"] == "decode" and "too short" in errors["504"]["reason"]
    assert errors["501"]["stage"] == "decode"
    assert all(e["url"].endswith(f"{v}.mp4") for v, e in errors.items())


def _to_webm(src: str, dest: str) -> str:
    """Re-encode a video as VP9 in WebM (as some WebVid copies store their files)."""
    import av

    with av.open(src) as inp:
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with av.open(dest, mode="w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return dest


def test_bad_csv_rows_are_listed_and_webm_videos_found_with_the_default_template(
        ray_local, local_data, tmp_path, capsys) -> None:
    from trip.cli import main as trip_main

    videos = tmp_path / "videos"
    good = _csv_dicts(os.path.join(local_data["webvid"], "results.csv"))[:4]
    for r in good[:2]:
        shutil.copytree(os.path.dirname(r["contentUrl"]), videos / r["page_dir"], dirs_exist_ok=True)
    webm = _to_webm(good[2]["contentUrl"], str(videos / "web" / "2001.webm"))
    # contentUrl says nothing about the extension: the decode stage looks for .mp4, then .webm
    _to_webm(good[3]["contentUrl"], str(videos / "web" / "2002.webm"))
    rows = [good[0],                                                                     # line 2
            {**good[2], "videoid": "2001", "page_dir": "web",
             "contentUrl": "https://videos.example/2001.webm"},                          # line 3
            {**good[0], "name": "the same video again"},                                 # line 4
            {**good[1], "videoid": ""},                                                  # line 5
            good[1],                                                                     # line 6
            {**good[3], "videoid": "2002", "page_dir": "web", "contentUrl": "https://videos.example/2002"},
            {**good[3], "videoid": "2003", "page_dir": "web", "contentUrl": ""}]         # line 8: nowhere
    out = str(tmp_path / "shards")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"num_frames": 4, "latent_channels": 12, "latent_size": 8},
        "codec": {"kind": "lossless", "downscale": 2},
        "preprocess": {"csv": write_csv(str(tmp_path / "results.csv"), rows), "video_root": str(videos),
                       "output": out, "num_frames": 4, "fps": 4.0, "resolution": 16,
                       "samples_per_shard": 2}}))  # path_template left at its default
    assert trip_main(["preprocess", "--config", str(config)]) == 0

    summary = capsys.readouterr().out
    assert "this run: 4 ok, 1 skipped, 0 errors; 2 CSV rows rejected;" in summary, summary
    assert "3 videos or CSV rows not usable" in summary, summary
    index, problems = validate_dataset(out)
    assert problems == [] and index["num_samples"] == 4 and index["num_rejected_rows"] == 2
    with open(os.path.join(out, "errors.jsonl")) as f:
        errors = [json.loads(line) for line in f]
    assert [(e["videoid"], e["stage"], e.get("line")) for e in errors] == [
        (good[0]["videoid"], "csv", 4), ("", "csv", 5), ("2003", "fetch", None)]
    assert errors[0]["reason"] == f"line 4 repeats videoid {good[0]['videoid']} (first on line 2)"
    assert errors[1]["reason"] == "line 5 has an empty videoid"
    tried = [str(videos / "web" / f"2003{e}") for e in (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")]
    assert errors[2]["reason"] == f"file not found, tried 6 paths: {', '.join(tried)}"

    samples = {s.meta["videoid"]: s for e in index["shards"] for s in read_shard(f"{out}/{e['name']}").samples}
    assert sorted(samples) == sorted([good[0]["videoid"], good[1]["videoid"], "2001", "2002"])
    assert samples["2001"].meta["source_url"] == webm
    assert samples["2002"].meta["source_url"].endswith("2002.webm")
    import torch

    frames = LosslessCodec(2).decode(torch.from_numpy(samples["2001"].latents.astype(np.float32)))
    back = (frames * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, decode_clip(webm, SPEC).frames)
