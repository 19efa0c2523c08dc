"""The demo's steps end to end at a small size: every artefact exists and is valid."""

import json
import math
from pathlib import Path

import av
import pytest

from data_tools.check import validate_dataset
from pipelines.demo import main as demo_main
from trip.model import TRIPModel
from trip.video import read_frames


@pytest.mark.integration
def test_demo_small_run_produces_valid_shards_checkpoint_samples_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--steps", "4", "--videos", "32", "--sample-steps", "3"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert math.isfinite(summary["samples_per_second"]) and summary["samples_per_second"] > 0

    index, problems = validate_dataset(summary["shards"])
    assert not problems and index["num_samples"] == 32

    model = TRIPModel.from_pretrained(summary["model"])
    frames = model.cfg.num_frames
    gifs = sorted(Path(out / "samples").glob("*.gif"))
    mp4s = sorted(Path(out / "samples").glob("*.mp4"))
    assert len(gifs) == len(mp4s) == 4
    for mp4 in mp4s:
        with av.open(str(mp4)) as container:
            assert sum(1 for _ in container.decode(video=0)) == frames
    for gif in gifs:
        assert read_frames(str(gif)).shape[0] == frames
    assert Path(summary["plot"]).is_file()
