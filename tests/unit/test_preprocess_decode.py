"""PyAV clip decoding: which frames, what size, rotation, and skips instead of crashes."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from data_tools.decode import SamplingSpec, SkipVideo, decode_clip, resized_size, to_tensor
from data_tools.synth import write_video


def _ramp_video(path: str, frames: int = 30, fps: int = 8, size: int = 32) -> str:
    """Frame i is a flat grey of value 8 * i: the decoded value tells the frame index."""
    video = np.stack([np.full((size, size, 3), 8 * i, np.uint8) for i in range(frames)])
    return write_video(video, path, fps=fps)


def _frame_indices(clip) -> list[int]:
    return [round(float(f.mean()) / 8) for f in clip.frames]


def test_fps_sampling_takes_every_other_frame_of_an_8fps_video(tmp_path) -> None:
    path = _ramp_video(str(tmp_path / "ramp.mp4"))
    clip = decode_clip(path, SamplingSpec(num_frames=4, fps=4.0, resolution=16))
    assert clip.frames.shape == (4, 16, 16, 3) and clip.frames.dtype == np.uint8
    assert _frame_indices(clip) == [0, 2, 4, 6]
    assert clip.meta["frame_times"] == [0.0, 0.25, 0.5, 0.75]
    assert clip.meta["src_fps"] == 8.0


def test_stride_sampling_from_start_offset(tmp_path) -> None:
    path = _ramp_video(str(tmp_path / "ramp.mp4"))
    clip = decode_clip(path, SamplingSpec(num_frames=4, fps=None, frame_stride=3, start_offset=0.5,
                                          resolution=16))
    assert _frame_indices(clip) == [4, 7, 10, 13]


def test_seek_for_a_late_start_offset(tmp_path) -> None:
    path = _ramp_video(str(tmp_path / "ramp.mp4"))
    clip = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, start_offset=2.0, resolution=16))
    assert _frame_indices(clip) == [16, 17]


def test_threads_do_not_change_frames(tmp_path) -> None:
    path = _ramp_video(str(tmp_path / "ramp.mp4"))
    one = decode_clip(path, SamplingSpec(num_frames=4, fps=4.0, resolution=16, threads=1))
    two = decode_clip(path, SamplingSpec(num_frames=4, fps=4.0, resolution=16, threads=2))
    np.testing.assert_array_equal(one.frames, two.frames)


def test_short_side_resize_then_centre_crop(tmp_path) -> None:
    # 96x64: left third red, middle green, right blue; resized to 48x32 and cropped to the
    # middle 32 columns, so the crop's centre is green and its edges half red / half blue
    video = np.zeros((8, 64, 96, 3), np.uint8)
    video[:, :, :32] = (255, 0, 0)
    video[:, :, 32:64] = (0, 255, 0)
    video[:, :, 64:] = (0, 0, 255)
    path = write_video(video, str(tmp_path / "wide.mp4"))
    clip = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=32))
    assert clip.frames.shape == (2, 32, 32, 3)
    assert clip.meta["src_size"] == [96, 64]
    f = clip.frames[0].astype(int)
    assert f[16, 16].argmax() == 1
    assert f[16, 2].argmax() == 0 and f[16, 29].argmax() == 2
    assert resized_size(96, 64, 32) == (48, 32)
    assert resized_size(64, 96, 32) == (32, 48)


def _edges_video(path: str, height: int, width: int) -> str:
    """Grey frames with a red band along the first and a blue band along the last 12 pixels of
    the long side: both survive a decode only if nothing of the long side is cropped."""
    video = np.full((8, height, width, 3), 128, np.uint8)
    if width >= height:
        video[:, :, :12], video[:, :, -12:] = (255, 0, 0), (0, 0, 255)
    else:
        video[:, :12], video[:, -12:] = (255, 0, 0), (0, 0, 255)
    return write_video(video, path)


@pytest.mark.parametrize("source, target", [((64, 96), (16, 24)), ((96, 64), (24, 16))],
                         ids=["landscape", "portrait"])
def test_a_height_width_resolution_keeps_the_aspect_and_crops_nothing_of_its_own_aspect(tmp_path, source, target):
    path = _edges_video(str(tmp_path / "v.mp4"), *source)
    clip = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=target))
    assert clip.frames.shape == (2, *target, 3)
    f = clip.frames[0].astype(int)
    first, last = (f[:, 0], f[:, -1]) if target[1] > target[0] else (f[0], f[-1])
    assert (first.argmax(axis=-1) == 0).all() and (last.argmax(axis=-1) == 2).all()  # both bands kept
    square = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=16)).frames[0].astype(int)
    assert abs(square[0, 0] - 128).max() < 30  # a square crop cuts the bands away


def test_a_resolution_pair_covers_the_target_and_crops_only_the_excess_side(tmp_path) -> None:
    assert resized_size(128, 64, (16, 24)) == (32, 16)  # 2:1 into 3:2: width has the excess
    assert resized_size(64, 128, (24, 16)) == (16, 32)
    assert resized_size(96, 64, (16, 24)) == (24, 16)  # same aspect: no crop at all
    assert resized_size(96, 64, (32, 32)) == resized_size(96, 64, 32) == (48, 32)
    path = _edges_video(str(tmp_path / "v.mp4"), 64, 96)
    square = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=16)).frames
    pair = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=(16, 16))).frames
    np.testing.assert_array_equal(square, pair)


def _rotated_video(path: str, codec: str) -> str:
    """A stored 64 x 32 landscape video with a white strip along its top and a display
    rotation of 90 degrees (a phone held upright)."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(4):
            image = np.zeros((32, 64, 3), np.uint8)
            image[:8] = 255  # white strip along the top of the stored picture
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_rotation_metadata_is_applied(tmp_path) -> None:
    path = _rotated_video(str(tmp_path / "rot.mp4"), "libx264" if "libx264" in av.codecs_available else "mpeg4")
    clip = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=32))
    assert clip.meta["rotation"] == 90
    f = clip.frames[0].mean(axis=2)
    # displayed upright (rotated 90 degrees counter-clockwise, as ffmpeg's autorotate does)
    # the top strip becomes the left edge of a 32 x 64 picture, centre-cropped to 32 x 32
    assert f[:, :3].mean() > 200 and f[:, -4:].mean() < 30 and f[:3, 8:].mean() < 30


def test_rotation_is_applied_before_the_crop_to_a_height_width_pair(tmp_path) -> None:
    path = _rotated_video(str(tmp_path / "rot.mp4"), "mpeg4")
    # displayed upright it is a 32 wide x 64 tall portrait: a [32, 16] target keeps all of it
    clip = decode_clip(path, SamplingSpec(num_frames=2, fps=8.0, resolution=(32, 16)))
    f = clip.frames[0].mean(axis=2)
    assert clip.frames.shape == (2, 32, 16, 3)
    assert f[:, :2].mean() > 200 and f[:, -4:].mean() < 30


def test_to_tensor_layout() -> None:
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[..., 1] = 255
    t = to_tensor(frames)
    assert t.shape == (2, 3, 4, 4) and float(t[:, 1].min()) == 1.0 and float(t[:, 0].max()) == 0.0


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "short"])
def test_bad_files_are_skips_with_reasons(tmp_path, case: str) -> None:
    path = str(tmp_path / f"{case}.mp4")
    expect = {"missing": ("fetch", "file not found"), "empty": ("fetch", "empty file"),
              "text": ("decode", "not a decodable video"), "truncated": ("decode", ""),
              "short": ("decode", "too short")}[case]
    if case == "empty":
        open(path, "wb").close()
    elif case == "text":
        with open(path, "w") as f:
            f.write("<html><body>404 not found</body></html>\n" * 20)
    elif case == "truncated":
        _ramp_video(str(tmp_path / "whole.mp4"))
        data = open(tmp_path / "whole.mp4", "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    elif case == "short":
        _ramp_video(path, frames=3)
    with pytest.raises(SkipVideo) as info:
        decode_clip(path, SamplingSpec(num_frames=4, fps=4.0, resolution=16))
    assert info.value.stage == expect[0]
    assert expect[1] in info.value.reason
    assert path in info.value.reason


def test_fallbacks_are_tried_only_when_the_file_is_missing(tmp_path) -> None:
    spec = SamplingSpec(num_frames=2, fps=4.0, resolution=16)
    webm = _ramp_video(str(tmp_path / "1.webm"))
    clip = decode_clip(str(tmp_path / "1.mp4"), spec, fallbacks=[str(tmp_path / "1.mkv"), webm])
    assert _frame_indices(clip) == [0, 2] and clip.meta["source_url"] == webm
    (tmp_path / "2.mp4").write_bytes(b"")  # present but empty: a skip, not a reason to look on
    with pytest.raises(SkipVideo, match="empty file"):
        decode_clip(str(tmp_path / "2.mp4"), spec, fallbacks=[webm])
    tried = [str(tmp_path / f"3{e}") for e in (".mp4", ".webm", ".mov")]
    with pytest.raises(SkipVideo) as info:
        decode_clip(tried[0], spec, fallbacks=tried[1:])
    assert info.value.stage == "fetch"
    assert info.value.reason == f"file not found, tried 3 paths: {', '.join(tried)}"


def test_slow_source_repeats_frames(tmp_path) -> None:
    path = _ramp_video(str(tmp_path / "slow.mp4"), frames=6, fps=2)
    clip = decode_clip(path, SamplingSpec(num_frames=6, fps=4.0, resolution=16))
    assert _frame_indices(clip) == [0, 0, 1, 1, 2, 2]


def test_http_urls_are_fetched_and_404_is_a_skip(tmp_path) -> None:
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    _ramp_video(str(tmp_path / "ramp.mp4"))
    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        clip = decode_clip(f"{base}/ramp.mp4", SamplingSpec(num_frames=4, fps=4.0, resolution=16))
        assert _frame_indices(clip) == [0, 2, 4, 6]
        with pytest.raises(SkipVideo, match="HTTP 404 .* after 1 try") as info:
            decode_clip(f"{base}/gone.mp4", SamplingSpec(num_frames=4, fps=4.0, resolution=16))
        assert info.value.stage == "fetch"
    finally:
        server.shutdown()
        server.server_close()
