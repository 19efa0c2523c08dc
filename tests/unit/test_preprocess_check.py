"""`data_tools validate` finds what is wrong with a dataset; `inspect` prints and makes GIFs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.check import validate_dataset
from data_tools.cli import main as data_tools_main
from data_tools.synth import ShapeMotion, draw_motion
from trip.codec import LosslessCodec
from trip.data.shards import ShardWriter, build_index, write_index


@pytest.fixture()
def dataset(tmp_path) -> str:
    """Two shards (2 + 1 samples) of lossless latents of synthetic clips [4, 12, 8, 8]."""
    out = str(tmp_path / "ds")
    codec = LosslessCodec(2)
    infos = []
    for shard, keys in enumerate([["a0", "a1"], ["b0"]]):
        w = ShardWriter(out, shard)
        for k in keys:
            frames = draw_motion(ShapeMotion("circle", "red", "left", 0.5), 16, 4)
            lat = codec.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).numpy()
            w.add(k, lat, {"videoid": k}, f"caption {k}")
        infos.append(w.commit())
    write_index(out, build_index(infos, latent_shape=[4, 12, 8, 8], text_shape=None,
                                 codec=codec.identity(), text_encoder=None))
    return out


def test_sound_dataset_validates(dataset: str, capsys: pytest.CaptureFixture) -> None:
    index, problems = validate_dataset(dataset)
    assert problems == [] and index["num_samples"] == 3
    assert data_tools_main(["validate", dataset]) == 0
    assert "3 samples: OK" in capsys.readouterr().out


def test_problems_are_named(dataset: str, capsys: pytest.CaptureFixture) -> None:
    os.remove(os.path.join(dataset, "shard-000001.tar"))
    shutil.copy(os.path.join(dataset, "shard-000000.tar"), os.path.join(dataset, "shard-000009.tar"))
    index_path = os.path.join(dataset, "index.json")
    index = json.load(open(index_path))
    index["shards"][0]["samples"] = 5
    json.dump(index, open(index_path, "w"))
    _, problems = validate_dataset(dataset)
    text = "\n".join(problems)
    assert "shard-000001.tar: listed in index.json but missing" in text
    assert "shard-000000.tar: 2 samples, index.json says 5" in text
    assert "shard-000009.tar: in" in text and "not listed" in text
    assert data_tools_main(["validate", dataset]) == 1
    assert "problem(s)" in capsys.readouterr().out


def test_wrong_shapes_are_found(tmp_path) -> None:
    out = str(tmp_path / "ds")
    w = ShardWriter(out, 0)
    w.add("k", np.zeros([4, 12, 4, 4], np.float32), {}, "c")
    write_index(out, build_index([w.commit()], latent_shape=[4, 12, 8, 8], text_shape=[7, 16],
                                 codec={"kind": "lossless", "downscale": 2, "scaling_factor": 1.0},
                                 text_encoder=None))
    _, problems = validate_dataset(out)
    assert any(p.startswith("shard-000000.tar:k: ") and "k.text.npy missing" in p
               and "k.latents.npy: shape [4, 12, 4, 4], index.json says [4, 12, 8, 8]" in p for p in problems)


def test_inspect_prints_and_writes_a_gif_of_the_decoded_clip(dataset: str, tmp_path,
                                                            capsys: pytest.CaptureFixture) -> None:
    gif = str(tmp_path / "a1.gif")
    assert data_tools_main(["inspect", dataset, "--shard", "0", "--gif", gif, "--key", "a1",
                            "--scale", "1"]) == 0
    out = capsys.readouterr().out
    assert "a0  video a0  latents [4, 12, 8, 8] float16" in out and "'caption a1'" in out
    with Image.open(gif) as im:
        assert im.n_frames == 4
        first = np.asarray(im.convert("RGB"))
    expected = draw_motion(ShapeMotion("circle", "red", "left", 0.5), 16, 4)[0]
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 8  # GIF palette rounding
    assert data_tools_main(["inspect", dataset, "--shard", "7"]) == 2
    assert "out of range" in capsys.readouterr().err
