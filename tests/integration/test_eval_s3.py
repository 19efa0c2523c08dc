"""`trip eval` reads its clips and CLIP model from, and writes its report to, an S3 server.

The moto server speaks the real S3 HTTP API; the same fsspec code paths serve real object
stores. Only the CLIP metric runs here: FVD/FID storage paths are the same functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from trip.cli import main as trip_main


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.integration
def test_eval_clips_model_and_report_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    import s3fs
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    rng = np.random.default_rng(0)
    local = tmp_path / "clips"
    local.mkdir()
    for i in range(2):
        _write_mp4(local / f"clip{i}.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16)).save_pretrained(tmp_path / "clip")
    fs = s3fs.S3FileSystem()
    bucket = s3_bucket[len("s3://"):]
    fs.put(str(local) + "/", f"{bucket}/generated", recursive=True)
    fs.put(str(tmp_path / "clip") + "/", f"{bucket}/models/clip", recursive=True)

    out = f"{s3_bucket}/reports/eval.json"
    assert trip_main(["eval", "--generated", f"{s3_bucket}/generated", "--clip", f"{s3_bucket}/models/clip",
                      "--out", out]) == 0
    fs.invalidate_cache()
    report = json.loads(fs.cat_file(f"{bucket}/reports/eval.json"))
    assert report["num_generated"] == 2 and report["num_frames"] == 5
    assert sorted(report["per_video"]) == ["clip0.mp4", "clip1.mp4"]
    assert -100.0 <= report["metrics"]["f_consistency_all"] < 100.0
