"""`trip eval` end to end on tiny MP4/GIF files written here with PyAV.

Networks are tiny and random (a CLIP saved with save_pretrained, TorchScript I3D and
Inception stand-ins with the StyleGAN-style signature), but every file goes through the
same loading, decoding, preprocessing and report code as real weights would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trip.cli import main as trip_main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions on a shared 2-core machine: OpenMP threads spinning against other
    processes made one Inception forward 50x slower than a single thread. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



class TinyI3D(nn.Module):
    """[B, 3, T, 224, 224] -> [B, 6]: pool, one 3D conv, global average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = F.avg_pool3d(x, (1, 16, 16))
        return torch.tanh(self.conv(x)).mean((2, 3, 4))


class TinyInception(nn.Module):
    """[B, 3, 299, 299] in [0, 255] -> [B, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.avg_pool2d(x / 128.0 - 1.0, 23)
        return torch.tanh(self.conv(x)).mean((2, 3))


def _write(path: Path, frames: np.ndarray) -> None:
    gif = path.suffix == ".gif"
    with av.open(str(path), "w", format="gif" if gif else None) as container:
        stream = container.add_stream("gif" if gif else "libx264", rate=8)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if gif else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _moving_square(rng: np.random.Generator, t: int = 8, size: int = 32) -> np.ndarray:
    frames = np.full((t, size, size, 3), rng.integers(0, 100, 3), dtype=np.uint8)
    y, x, dy, dx = rng.integers(0, size - 8), rng.integers(0, size - 8), *rng.integers(-2, 3, 2)
    for i in range(t):
        yy, xx = np.clip(y + i * dy, 0, size - 8), np.clip(x + i * dx, 0, size - 8)
        frames[i, yy:yy + 8, xx:xx + 8] = rng.integers(150, 256, 3)
    return frames


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for name, count in (("generated", 4), ("reference", 5)):
        (root / name).mkdir()
        for i in range(count):
            _write(root / name / f"clip{i}.{'gif' if i == 0 else 'mp4'}", _moving_square(rng))
    (root / "generated" / "notes.txt").write_text("not a video; ignored")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16)).save_pretrained(root / "clip")
    torch.jit.script(TinyI3D()).save(str(root / "i3d.pt"))
    torch.jit.script(TinyInception()).save(str(root / "inception.pt"))
    return {k: str(root / k) for k in ("generated", "reference", "clip")} | {
        "i3d": str(root / "i3d.pt"), "inception": str(root / "inception.pt"), "root": str(root)}


def _eval(assets: dict[str, str], out: Path, *extra: str) -> int:
    return trip_main(["eval", "--generated", assets["generated"], "--clip", assets["clip"],
                      "--i3d", assets["i3d"], "--inception", assets["inception"], "--out", str(out), *extra])


def test_eval_cli_writes_a_finite_report(assets: dict[str, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    assert _eval(assets, out, "--reference", assets["reference"]) == 0
    report = json.loads(out.read_text())
    assert report["num_generated"] == 4 and report["num_reference"] == 5 and report["num_frames"] == 8
    metrics = report["metrics"]
    assert {"f_consistency_4", "f_consistency_all", "fvd", "fid", "psnr", "ssim"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert report["paired"] == 4  # clip0..3 have same-named references (clip4 has no partner)
    assert -100.0 <= metrics["f_consistency_all"] < 100.0
    assert metrics["fvd"] > 0 and metrics["fid"] > 0  # different clips, different statistics
    assert sorted(report["per_video"]) == ["clip0.gif", "clip1.mp4", "clip2.mp4", "clip3.mp4"]
    assert set(report["reference_metrics"]) == {"f_consistency_4", "f_consistency_all"}
    printed = capsys.readouterr().out
    assert "fvd" in printed and "f_consistency_4" in printed and str(out) in printed


def test_eval_cli_identical_sets_give_zero_fvd_and_fid(assets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "same.json"
    assert _eval(assets, out, "--reference", assets["generated"], "--num-frames", "6") == 0
    report = json.loads(out.read_text())
    assert report["num_frames"] == 6
    assert report["metrics"]["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert report["metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)


def test_eval_cli_f_consistency_alone_needs_no_reference(assets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "fc.json"
    assert trip_main(["eval", "--generated", assets["generated"], "--clip", assets["clip"],
                      "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"f_consistency_4", "f_consistency_all"}


def test_eval_cli_bad_input_is_a_clear_error_and_writes_no_report(
        assets: dict[str, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "never.json"
    assert _eval(assets, out) == 2
    assert "--reference" in capsys.readouterr().err
    assert _eval(assets, out, "--reference", assets["reference"], "--num-frames", "20") == 2
    assert "fewer than --num-frames 20" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.mp4").write_bytes(b"this is not an mp4 file")
    assert trip_main(["eval", "--generated", str(broken), "--clip", assets["clip"], "--out", str(out)]) == 2
    assert "bad.mp4" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert trip_main(["eval", "--generated", str(empty), "--clip", assets["clip"], "--out", str(out)]) == 2
    assert "no video files" in capsys.readouterr().err
    assert trip_main(["eval", "--generated", assets["generated"], "--out", str(out)]) == 2
    assert "nothing to compute" in capsys.readouterr().err
    assert trip_main(["eval", "--generated", assets["generated"], "--reference", str(empty.parent / "broken"),
                      "--out", str(out)]) == 2  # bad.mp4 is unreadable: named
    assert "bad.mp4" in capsys.readouterr().err
    unpaired = tmp_path / "unpaired"
    unpaired.mkdir()
    _write(unpaired / "other.mp4", _moving_square(np.random.default_rng(1)))
    assert trip_main(["eval", "--generated", assets["generated"], "--reference", str(unpaired),
                      "--out", str(out)]) == 2
    assert "same name" in capsys.readouterr().err
    assert not out.exists()


def test_eval_cli_weight_free_quality_against_same_named_references(tmp_path: Path) -> None:
    """No weights at all: PSNR, SSIM and motion per pair, a finite report."""
    from data_tools.synth import ShapeMotion, draw_motion

    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir(), ref.mkdir()
    for i, d in enumerate(("right", "down")):
        clip = draw_motion(ShapeMotion("square", "yellow", d, 0.5), 32, 8)
        _write(ref / f"{i:03d}.mp4", clip)
        _write(gen / f"{i:03d}.mp4", clip if i == 0 else np.repeat(clip[:1], 8, axis=0))  # 001: a still clip
    out = tmp_path / "q.json"
    assert trip_main(["eval", "--generated", str(gen), "--reference", str(ref), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    per = report["per_video"]
    assert per["000.mp4"]["displacement_ratio"] == pytest.approx(1.0, abs=0.1)  # H.264 coding blurs the edges a little
    assert per["001.mp4"]["displacement_ratio"] == pytest.approx(0.0, abs=0.1)
    assert per["000.mp4"]["psnr"] > per["001.mp4"]["psnr"] and per["000.mp4"]["ssim"] > 0.9
    assert report["metrics"]["displacement_ratio_min"] == pytest.approx(0.0, abs=0.1)


def _write_shard_set(prefix: Path, clips: list[np.ndarray]) -> None:
    """Clips encoded with the lossless codec into shards, through the real shard contract."""
    from trip.codec import LosslessCodec
    from trip.data.shards import ShardWriter, build_index, write_index

    codec = LosslessCodec(2)
    infos = []
    for s, part in enumerate((clips[:2], clips[2:])):
        writer = ShardWriter(str(prefix), s)
        for i, frames in enumerate(part):
            latents = codec.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).numpy()
            writer.add(f"c{s}_{i}", latents, {"videoid": f"c{s}_{i}"}, "a moving square")
        infos.append(writer.commit())
    write_index(str(prefix), build_index(infos, latent_shape=list(latents.shape), text_shape=None,
                                         codec=codec.identity(), text_encoder=None))


def test_eval_cli_reads_a_latent_shard_set_through_its_codec(assets: dict[str, str], tmp_path: Path) -> None:
    from trip.eval.cli import load_clips

    rng = np.random.default_rng(5)
    clips = [_moving_square(rng) for _ in range(5)]
    _write_shard_set(tmp_path / "shards", clips)
    loaded = load_clips(str(tmp_path / "shards"), num_frames=None)
    assert sorted(loaded) == ["c0_0", "c0_1", "c1_0", "c1_1", "c1_2"]
    # Lossless codec + fp16 latents: the decoded frames are the original pixels.
    for original, decoded in zip(clips, loaded.values()):
        np.testing.assert_array_equal(decoded, original)
    assert len(load_clips(str(tmp_path / "shards"), num_frames=4, limit=3)) == 3
    out = tmp_path / "shards.json"
    assert trip_main(["eval", "--generated", str(tmp_path / "shards"), "--reference", str(tmp_path / "shards"),
                      "--i3d", assets["i3d"], "--limit", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_generated"] == 4 and report["metrics"]["fvd"] == pytest.approx(0.0, abs=1e-6)
