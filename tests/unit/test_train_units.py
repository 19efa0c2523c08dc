"""Training pieces that need no Ray workers: DeepSpeed config, LR schedule, checkpoint
layout, completeness, commit and retention, per-sample draws, export, the metrics exporter,
and config validation."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.unit.checkpoints import fake_checkpoint
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


def _fake_checkpoint(run_root: Path, step: int, world: int = 2, complete: bool = True) -> Path:
    return fake_checkpoint(run_root, step, world, complete)


def storage_local(url: str) -> str:
    from trip import storage

    return storage.local_path(url)


def test_torn_checkpoint_is_skipped_and_the_previous_one_used(tmp_path):
    run_root = tmp_path / "runs" / "r"
    _fake_checkpoint(run_root, step=2)
    torn = _fake_checkpoint(run_root, step=4, complete=False)
    run = ckpt.RunDir(str(tmp_path / "runs"), "r")
    assert run.steps() == [2, 4]
    rec, why = run.check(4)
    assert rec is None and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in why
    assert run.latest().step == 2
    # a file of the right name but the wrong size (a truncated copy) is not complete either
    (torn / f"{ckpt.DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert run.check(4)[0] is None
    (torn / f"{ckpt.DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"xx")
    assert run.latest().step == 4
    # no complete checkpoint at all: start from scratch rather than load a broken one
    for step in (2, 4):
        (Path(storage_local(run.checkpoint_url(step))) / ckpt.RECORD).unlink()
    assert run.latest() is None


def test_completeness_is_a_lookup_per_file():
    expected = {f"ds/zero_pp_rank_{r}_x.pt": 10 for r in range(512)} | {"ema/a": 3}
    present = dict(expected)
    assert ckpt.missing_files(expected, present) == []
    del present["ds/zero_pp_rank_7_x.pt"]
    present["ema/a"] = 2
    assert sorted(ckpt.missing_files(expected, present)) == ["ds/zero_pp_rank_7_x.pt", "ema/a"]


def test_own_files_are_a_ranks_zero_files_and_ema_slice_only(tmp_path):
    _fake_checkpoint(tmp_path / "runs" / "r", step=2, world=3)
    rec = ckpt.RunDir(str(tmp_path / "runs"), "r").latest().record
    assert sorted(ckpt.own_files(rec, 1)) == [
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ckpt.partition_file("ema", 1, 3)]


def test_retention_keeps_the_newest_complete_and_drops_older_torn_ones(tmp_path):
    run_root = tmp_path / "runs" / "r"
    for step, ok in ((2, True), (4, False), (6, True), (8, True), (10, False)):
        _fake_checkpoint(run_root, step=step, complete=ok)
    run = ckpt.RunDir(str(tmp_path / "runs"), "r")
    assert run.retain(2) == [2, 4]
    assert run.steps() == [6, 8, 10]  # a torn checkpoint newer than the last complete one may be in flight


def test_commit_waits_until_every_listed_file_is_in_storage(tmp_path):
    run = ckpt.RunDir(str(tmp_path / "runs"), "r")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a").write_bytes(b"aaaa")
    record = {"format": ckpt.FORMAT, "step": 2, "world_size": 2, "files": ["ds/a", "ds/b"]}
    writer = ckpt.CheckpointWriter(run, commit_timeout_s=30)
    writer.submit(2, str(staging), {"ds/a": str(staging / "a")}, record)  # rank 0's file only
    rec_path = Path(storage_local(run.checkpoint_url(2))) / ckpt.RECORD
    deadline = time.time() + 10
    while not (Path(storage_local(run.checkpoint_url(2))) / "ds" / "a").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert not rec_path.exists(), "committed before rank 1's file arrived"
    assert run.latest() is None
    other = tmp_path / "b"
    other.write_bytes(b"bb")
    run.put(str(other), "checkpoints/step-000000002/ds/b")  # "rank 1" finishes its upload
    writer.wait()
    committed = json.loads(rec_path.read_text())
    assert committed["step"] == 2 and committed["files"] == {"ds/a": 4, "ds/b": 2} and run.latest().step == 2
    assert not staging.exists()  # the local copies are removed once uploaded
    writer.close()


def test_a_commit_that_never_completes_fails_loudly(tmp_path):
    run = ckpt.RunDir(str(tmp_path / "runs"), "r")
    staging = tmp_path / "staging"
    staging.mkdir()
    writer = ckpt.CheckpointWriter(run, commit_timeout_s=0.5)
    writer.submit(2, str(staging), {}, {"format": ckpt.FORMAT, "step": 2, "world_size": 2, "files": ["ds/b"]})
    with pytest.raises(TimeoutError, match="not committed.*ds/b"):
        writer.wait()
    writer.close()


def test_history_keeps_the_newest_row_of_a_step_trained_twice(tmp_path):
    run = ckpt.RunDir(str(tmp_path / "runs"), "r")
    run.write_history(2, [{"step": 1, "loss": 1.0, "time": 1}, {"step": 2, "loss": 0.9, "time": 2}])
    # an attempt that wrote its segment for step 4, then died before the commit ...
    run.write_history(4, [{"step": 3, "loss": 9.0, "time": 3}, {"step": 4, "loss": 9.0, "time": 4}])
    # ... and the next one, resumed at 2, checkpointed at 3 (preemption) and then at 6
    run.write_history(3, [{"step": 3, "loss": 0.8, "time": 10}])
    run.write_history(6, [{"step": s, "loss": 0.8 - s / 100, "time": 10 + s} for s in (4, 5, 6)])
    rows = run.history()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["loss"] == 0.8 and rows[3]["loss"] == pytest.approx(0.76)
    assert [r["step"] for r in run.history(up_to=4)] == [1, 2, 3, 4]


def test_sample_draws_depend_on_the_sample_not_on_its_batch():
    from trip.diffusion import SampleDraws

    draws = SampleDraws(seed=3, num_train_timesteps=1000, text_dropout=0.5)
    t_a, n_a, k_a = draws(torch.tensor([5, 9, 11]), 2, (4, 2, 3, 3))
    t_b, n_b, k_b = draws(torch.tensor([11, 5]), 2, (4, 2, 3, 3))  # another rank's batch, another order
    assert torch.equal(n_a[0], n_b[1]) and torch.equal(n_a[2], n_b[0])
    assert t_a[0] == t_b[1] and bool(k_a[2]) == bool(k_b[0])
    assert not torch.equal(n_a[0], n_a[1])
    t_c, n_c, _ = draws(torch.tensor([5]), 3, (4, 2, 3, 3))  # the next epoch draws anew
    assert not torch.equal(n_c[0], n_a[0])
    many = draws(torch.arange(400), 0, (1,))[2].float().mean()
    assert 0.4 < float(many) < 0.6  # text kept with probability 1 - text_dropout


def test_export_ema_or_raw_weights_to_a_sampleable_model(tmp_path):
    from trip.model import TRIPModel
    from trip.train.export import export_checkpoint

    run_root = tmp_path / "runs" / "r"
    _fake_checkpoint(run_root, step=2)
    _fake_checkpoint(run_root, step=4, complete=False)
    used = export_checkpoint(str(run_root), str(tmp_path / "ema"))  # the run dir: newest complete one
    assert used.endswith("step-000000002")
    export_checkpoint(used, str(tmp_path / "raw"), use_ema=False, format="trip")
    ema, raw = TRIPModel.from_pretrained(str(tmp_path / "ema")), TRIPModel.from_pretrained(str(tmp_path / "raw"))
    name, p = next(iter(raw.state_dict().items()))
    assert torch.allclose(ema.state_dict()[name], p + 1)
    assert json.loads((tmp_path / "ema" / "trip.json").read_text())["config"]["codec"]["kind"] == "lossless"
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["codec"]["kind"] == "lossless"
    with pytest.raises(ValueError, match="incomplete"):
        export_checkpoint(str(run_root / "checkpoints" / "step-000000004"), str(tmp_path / "bad"))


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
    (["train.global_batch_size=1"], "smaller than the largest world size"),
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
    from data_tools.synth import write_synthetic_dataset
    from pipelines.train import validate

    write_synthetic_dataset(str(tmp_path / "data"), [8], latent_shape=(8, 12, 4, 4), text_shape=None)
    cfg = load_config(TINY, [f"data.dataset={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"latent_shape \[8, 12, 4, 4\]"):
        validate(cfg)


def test_a_missing_base_model_is_named_before_any_worker_starts(tmp_path):
    from data_tools.synth import write_synthetic_dataset
    from pipelines.train import validate

    write_synthetic_dataset(str(tmp_path / "data"), [16], latent_shape=(8, 192, 4, 4), text_shape=None)
    cfg = load_config(TINY, [f"data.dataset={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}",
                             f"model.pretrained_model={tmp_path / 'no-base'}", "train.lora.rank=4"])
    with pytest.raises(ConfigError, match=r"model.pretrained_model: .*no-base does not exist"):
        validate(cfg)


def test_configs_without_the_new_fields_keep_their_hash():
    """The hash names a checkpoint's config: a resume compares it. LoRA and pretrained_model,
    added later, leave the hash of configs that do not set them as it was."""
    plain = load_config(TINY)
    assert plain.hash() == "4a44985a788d2864"  # the hash before train.lora existed
    assert load_config(TINY, ["train.lora.rank=4", "model.pretrained_unet=x"]).hash() != \
        load_config(TINY, ["model.pretrained_unet=x"]).hash()
