"""Training pieces that need no Ray workers: DeepSpeed config, LR schedule, checkpoint
completeness and fallback, export, the metrics exporter, and config validation."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from trip.config import ConfigError, load_config
from trip.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


def test_deepspeed_config_keeps_global_batch_per_world_size():
    from trip.train.ds_config import deepspeed_config

    cfg = load_config(TINY, ["scaling.min_workers=1", "scaling.max_workers=2"])
    for world in (1, 2):
        accum = cfg.grad_accum_steps(world)
        ds = deepspeed_config(cfg.train, micro_batch_size=cfg.data.micro_batch_size, grad_accum=accum,
                              world_size=world, on_gpu=False)
        assert ds["train_batch_size"] == cfg.train.global_batch_size
        assert ds["zero_optimization"]["stage"] == 3
        assert ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["bf16"]["enabled"] is False
    gpu = deepspeed_config(load_config(TINY, ["train.precision=bf16"]).train, micro_batch_size=4, grad_accum=1,
                           world_size=2, on_gpu=True, load_universal=True)
    assert gpu["bf16"]["enabled"] and gpu["checkpoint"]["load_universal"]
    assert gpu["optimizer"]["params"]["torch_adam"] is False


def test_lr_warmup_then_cosine_to_min_ratio():
    from trip.train.ds_config import lr_factor

    train = load_config(TINY, ["train.warmup_steps=10", "train.max_steps=110", "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, train) == pytest.approx(0.1)
    assert lr_factor(9, train) == pytest.approx(1.0)
    assert lr_factor(60, train) == pytest.approx(0.55)
    assert lr_factor(110, train) == pytest.approx(0.1)
    values = [lr_factor(s, train) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _fake_checkpoint(root: Path, step: int, world: int = 2, complete: bool = True) -> Path:
    """A checkpoint directory with the files a 2-rank ZeRO-3 save writes (tiny contents)."""
    from safetensors.torch import save_file

    from trip.model import TRIPModel

    cfg = load_config(TINY)
    model = TRIPModel(cfg.model, cfg.diffusion)
    (root / ckpt.DS_TAG).mkdir(parents=True)
    for r in range(world):
        for kind in ("model", "optim"):
            (root / ckpt.DS_TAG / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt").write_bytes(b"x")
        ckpt.write_json(str(root / "rng" / f"rank{r}.json"), ckpt.rng_state())
    state = model.state_dict()
    save_file(state, str(root / "weights.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(root / "ema.safetensors"))
    ckpt.write_json(str(root / ckpt.META_NAME), {
        "format": ckpt.FORMAT, "step": step, "world_size": world, "config": cfg.to_dict(),
        "files": ckpt.expected_files(world, True)})
    if not complete:  # rank 1's upload never arrived
        os.remove(root / ckpt.DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return root


def test_torn_checkpoint_is_rejected_and_the_previous_one_used(tmp_path):
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    run = tmp_path / "run"
    good = _fake_checkpoint(run / "checkpoint_2026-01-01_00-00-01.000000", step=2)
    torn = _fake_checkpoint(run / "checkpoint_2026-01-01_00-00-02.000000", step=4, complete=False)
    assert ckpt.read_meta(str(good))["step"] == 2
    assert ckpt.read_meta(str(torn)) is None
    fs = pafs.LocalFileSystem()
    chosen = ckpt.find_resume_checkpoint(Checkpoint(path=str(torn), filesystem=fs))
    assert Path(chosen.path) == good
    assert ckpt.find_resume_checkpoint(Checkpoint(path=str(good), filesystem=fs)).path == str(good)
    # no complete checkpoint at all: start from scratch rather than load a broken one
    os.remove(good / "rng" / "rank0.json")
    assert ckpt.find_resume_checkpoint(Checkpoint(path=str(torn), filesystem=fs)) is None


def test_rng_state_roundtrip_through_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_export_ema_or_raw_weights_to_a_sampleable_model(tmp_path):
    from trip.model import TRIPModel
    from trip.train.export import export_checkpoint

    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint_2026-01-01_00-00-01.000000", step=2)
    _fake_checkpoint(run / "checkpoint_2026-01-01_00-00-02.000000", step=4, complete=False)
    used = export_checkpoint(str(run), str(tmp_path / "ema"))  # the run dir: newest complete one
    assert used.endswith("00-00-01.000000")
    export_checkpoint(used, str(tmp_path / "raw"), use_ema=False)
    ema, raw = TRIPModel.from_pretrained(str(tmp_path / "ema")), TRIPModel.from_pretrained(str(tmp_path / "raw"))
    name, p = next(iter(raw.state_dict().items()))
    assert torch.allclose(ema.state_dict()[name], p + 1)
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["codec"]["kind"] == "lossless"
    with pytest.raises(ValueError, match="incomplete"):
        export_checkpoint(str(run / "checkpoint_2026-01-01_00-00-02.000000"), str(tmp_path / "bad"))


def test_exporter_serves_fixed_names_and_labels_only():
    from trip.metrics import NullMetrics, build_metrics, safe_label

    assert isinstance(build_metrics("r", 0, 0, 0), NullMetrics)
    with pytest.raises(ValueError, match="run.name"):
        build_metrics("s3://key:secret@bucket", 0, 0, free_port())
    assert safe_label("trip-tiny_1.0", "x") == "trip-tiny_1.0"
    port = free_port()
    m = build_metrics("unit-run", 3, 0, port)
    try:
        m.world(2, 1)
        m.step(seconds=0.2, samples=8, loss=0.5, grad_norm=1.5, lrs={"unet": 1e-3, "fusion": 2e-3}, step=7)
        m.data_wait(0.1)
        m.corrupt(2)
        m.checkpoint_saved(1.0)
        text = urllib.request.urlopen(m.url, timeout=5).read().decode()
    finally:
        m.close()
    for line in ("trip_train_samples_total", "trip_train_steps_total", "trip_train_loss",
                 "trip_train_grad_norm", "trip_data_wait_seconds_total", "trip_data_corrupt_samples_total",
                 "trip_checkpoint_save_seconds_bucket", "trip_train_world_size", "trip_train_restarts_total",
                 "trip_train_step_seconds_bucket", "trip_train_last_step_timestamp_seconds"):
        assert f"\n{line}{{" in text, line
    assert 'trip_train_lr{group="fusion",node=' in text
    assert 'rank="3"' in text and 'run="unit-run"' in text
    assert 'trip_train_step{node=' in text


@pytest.mark.parametrize(("override", "message"), [
    (["train.global_batch_size=6"], "not divisible"),
    (["train.no_such_key=1"], "no_such_key"),
    ([], "index.json"),
])
def test_bad_config_fails_before_any_worker_starts(override, message, tmp_path, capsys):
    import argparse

    from pipelines.train import cli

    sets = [f"data.dataset={tmp_path / 'missing'}", f"run.storage_path={tmp_path / 'runs'}", *override]
    rc = cli(argparse.Namespace(config=str(TINY), overrides=sets))
    assert rc == 2
    assert message in capsys.readouterr().err


def test_dataset_shape_mismatch_is_named(tmp_path):
    from pipelines.train import validate
    from trip.data.synth import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "data"), [8], latent_shape=(8, 12, 4, 4), text_shape=None)
    cfg = load_config(TINY, [f"data.dataset={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"latent_shape \[8, 12, 4, 4\]"):
        validate(cfg)
