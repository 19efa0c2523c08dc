"""The demo's steps end to end at a small size: every artefact exists and is valid."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest

from data_tools.check import validate_dataset
from trip.model import TRIPModel
from trip.video import read_frames

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_small_run_produces_valid_shards_checkpoint_samples_and_summary(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("TRIP_LOG_LEVEL", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "pipelines.demo", "--out", str(out), "--steps", "4",
                           "--videos", "32", "--sample-steps", "3"], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "TRIP_CACHE": str(tmp_path / "cache")}, timeout=900)
    console = proc.stdout + proc.stderr
    (tmp_path / "console.txt").write_text(console)
    assert proc.returncode == 0, console[-4000:]
    check_quiet_console(console)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert math.isfinite(summary["samples_per_second"]) and summary["samples_per_second"] > 0
    # the demo scores its own samples against the held-back videos (values: bench, not tests)
    per_clip = summary["quality"]["per_clip"]
    assert sorted(per_clip) == ["000", "001", "002", "003"]
    for figures in per_clip.values():
        assert {"psnr", "psnr_first", "psnr_last", "ssim", "displacement_ratio"} <= set(figures)
        assert all(math.isfinite(v) for v in figures.values())
    assert math.isfinite(summary["quality"]["mean"]["displacement_ratio_min"])
    # validated while it trained, from the held-back videos: once, at the validation step
    assert list(summary["validation"]) == ["4"] and math.isfinite(summary["validation"]["4"]["loss"])
    val = out / "store" / "runs" / "trip-tiny" / "validation" / "step-000000004"
    assert (val / "result.json").is_file() and (val / "contact_sheet.png").is_file()
    assert len(list(val.glob("*.gif"))) == len(list(val.glob("*.mp4"))) == 4

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


def check_quiet_console(console: str) -> None:
    """What a newcomer sees: our stage lines, no dependency chatter."""
    lines = [ln for ln in re.split(r"[\r\n]", console) if ln.strip()]  # progress bars redraw with \r
    ours = [ln for ln in lines if ln.startswith("[trip]")]
    assert len(console.splitlines()) <= 80, console
    for stage in ("1/4 synth", "2/4 preprocess", "3/4 train", "4/4 export + sample", "done"):
        assert any(stage in ln for ln in ours), (stage, console)
    assert any(re.search(r"\[trip\] step 4/4 +loss", ln) for ln in ours), console
    assert "FutureWarning" not in console and "DeprecationWarning" not in console, console
    # Ray's loggers at INFO ("2026-... INFO worker.py:2038 -- Started a local Ray instance"),
    # Ray Train's controller, and the dashboard-less placement-group cleaner
    ray_info = [ln for ln in lines if re.search(r"\bINFO\b.*\.py:\d+ --", ln)
                or "Requesting resources" in ln or "training worker group" in ln
                or "PlacementGroupCleaner" in ln or "Failed to query Ray Train Controller" in ln]
    assert not ray_info, ray_info
    assert "built successfully" not in console and "termination requested" not in console, console
