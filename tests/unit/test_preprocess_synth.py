"""The synthetic WebVid dataset: deterministic, and its captions say what the video shows."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as data_tools_main
from data_tools.decode import SamplingSpec, decode_clip
from data_tools.synth import BACKGROUND, COLORS, make_dataset
from data_tools.webvid import read_rows
from tests.files import read_tree
from trip.eval.quality import psnr


def test_same_seed_same_bytes_other_seed_other_videos(tmp_path) -> None:
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_dataset(a, num=4, seed=3, size=32, seconds=1, holdout=1)
    make_dataset(b, num=4, seed=3, size=32, seconds=1, holdout=1)
    make_dataset(c, num=4, seed=4, size=32, seconds=1, holdout=1)
    fa, fb, fc = read_tree(a), read_tree(b), read_tree(c)
    # contentUrl holds absolute paths, so compare the CSVs without that column
    for files, root in ((fa, a), (fb, b)):
        for name in ("results.csv", "holdout/results.csv"):
            files[name] = files[name].replace(root.encode(), b"ROOT")
    assert fa == fb
    videos = sorted(k for k in fa if k.startswith("videos/"))
    assert len(videos) == 4
    assert [fa[k] for k in videos] != [fc[k] for k in videos]
    assert [r.caption for r in read_rows(os.path.join(a, "results.csv")).rows] != \
        [r.caption for r in read_rows(os.path.join(c, "results.csv")).rows]


def _centroid(frame: np.ndarray) -> tuple[float, float, np.ndarray]:
    diff = np.abs(frame.astype(int) - np.array(BACKGROUND)).sum(-1) > 120
    ys, xs = np.nonzero(diff)
    return float(xs.mean()), float(ys.mean()), frame[diff].mean(axis=0)


def test_captions_describe_colour_and_motion(tmp_path) -> None:
    root = str(tmp_path / "s")
    csv_path = make_dataset(root, num=32, seed=0, size=64, seconds=4, fps=8, holdout=0)
    rows = read_rows(csv_path, video_root=os.path.join(root, "videos")).rows
    # balanced: all 32 (shape, colour, direction) combinations appear once in 32 videos
    assert len({r.caption for r in rows}) == 32
    for row in rows:
        clip = decode_clip(row.url, SamplingSpec(num_frames=8, fps=4.0, resolution=32))
        (x0, y0, col), (x1, y1, _) = _centroid(clip.frames[0]), _centroid(clip.frames[-1])
        words = row.caption.split()
        colour, direction = words[1], words[-1]
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        assert moved[direction] > 4, (row.caption, moved)  # pixels at 32 px over 2 s
        across = abs(y1 - y0) if direction in ("left", "right") else abs(x1 - x0)
        assert across < 1.5, row.caption
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - col).sum())
        assert nearest == colour, row.caption


def test_synth_cli_writes_csv_videos_and_holdout(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "cli")
    assert data_tools_main(["synth", "--out", out, "--num", "3", "--size", "32", "--seconds", "1",
                            "--holdout", "2"]) == 0
    with open(os.path.join(out, "holdout", "captions.csv")) as f:
        holdout = list(csv.DictReader(f))
    assert [h["file"] for h in holdout] == ["000.png", "001.png"]
    assert all(os.path.isfile(os.path.join(out, "holdout", h["file"])) for h in holdout)
    # the whole held-back video is kept as the reference its samples are scored against
    ref = decode_clip(os.path.join(out, "holdout", "000.mp4"), SamplingSpec(num_frames=8, fps=8.0, resolution=32))
    first = np.asarray(Image.open(os.path.join(out, "holdout", "000.png")))
    assert psnr(ref.frames[:1], first[None])[0] > 25  # the same first frame, through MPEG-4 4:2:0
    rows = read_rows(os.path.join(out, "results.csv")).rows
    assert len(rows) == 3 and all(os.path.isfile(r.url) for r in rows)
    assert rows[0].duration == 1.0
    assert "3 videos" in capsys.readouterr().out


def test_by_color_motion_ties_every_direction_to_its_colour(tmp_path):
    import csv

    from data_tools.synth import COLOR_DIRECTIONS

    make_dataset(str(tmp_path), num=16, seed=0, size=32, seconds=1, holdout=0, motion="by_color")
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and {r["color"] for r in rows} == set(COLOR_DIRECTIONS)
    assert all(COLOR_DIRECTIONS[r["color"]] == r["direction"] for r in rows)
