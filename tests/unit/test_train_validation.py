"""Validation during training: deterministic held-out loss, artefacts once per step,
independent of the world size that wrote the checkpoint, checkpoints kept until validated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.synth import COLOR_DIRECTIONS, ShapeMotion, draw_motion
from trip import storage
from trip.config import load_config, to_dict
from trip.model import TRIPModel
from trip.train import checkpoint as ckpt
from trip.train import partitions
from trip.train.validation import RESULT, ValidationSet, ValidationWatcher, Validator, fixed_draws

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "tiny_cpu.yaml"


def _validation_set(prefix: Path, count: int = 3) -> str:
    """Synthetic moving shapes through the lossless codec into a shard set."""
    from trip.codec import LosslessCodec
    from trip.data.shards import ShardWriter, build_index, write_index

    codec = LosslessCodec(8)
    writer = ShardWriter(str(prefix), 0)
    for i, color in enumerate(list(COLOR_DIRECTIONS)[:count]):
        frames = draw_motion(ShapeMotion("square", color, COLOR_DIRECTIONS[color], 0.5), 32, 8)
        latents = codec.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).numpy()
        writer.add(f"{i:09d}", latents.astype(np.float16), {"videoid": str(i)}, f"a {color} square")
    info = writer.commit()
    write_index(str(prefix), build_index([info], latent_shape=list(latents.shape), text_shape=None,
                                         codec=codec.identity(), text_encoder=None))
    return str(prefix)


def _cfg(tmp_path: Path, validation: str, **extra: str):
    sets = {"data.validation": validation, "train.checkpoint_every": "2", "train.validate_every": "2",
            "train.validation_videos": "2", "sample.steps": "2", "run.storage_path": str(tmp_path / "runs"),
            "metrics.port": "0", **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in sets.items()])


def _seeded(cfg, seed: int) -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return [(n, p.detach()) for n, p in TRIPModel(cfg.model, cfg.diffusion).named_parameters()]


def _commit(cfg, run: ckpt.RunDir, step: int, world: int, seed: int = 0, ema_seed: int | None = None) -> str:
    """A committed checkpoint holding a seeded model's weights (and the same as EMA, or
    another seeded model's with `ema_seed`) as `world` ranks' ZeRO-3 partitions, the way
    the training loop writes them."""
    weights = _seeded(cfg, seed)
    ema = weights if ema_seed is None else _seeded(cfg, ema_seed)
    files = {}
    for kind, named in (("weights", weights), ("ema", ema)):
        for r in range(world):
            entries = []
            for name, t in named:
                lo, hi = partitions.partition_range(t.numel(), r, world)
                part = torch.zeros(partitions.partition_size(t.numel(), world))
                part[: max(0, min(hi, t.numel()) - lo)] = t.flatten()[lo:hi]
                entries.append((name, part, t.numel(), tuple(t.shape), True))
            rel = ckpt.partition_file(kind, r, world)
            path = Path(storage.local_path(run.checkpoint_url(step))) / rel
            partitions.write_partitions(str(path), entries, rank=r, world_size=world, kind=kind)
            files[rel] = path.stat().st_size
    record = {"format": ckpt.FORMAT, "step": step, "world_size": world, "config": to_dict(cfg),
              "config_hash": cfg.hash(), "files": files, "loader": {}, "restarts": 0}
    run.write_bytes(f"checkpoints/{ckpt.step_name(step)}/{ckpt.RECORD}", json.dumps(record).encode())
    return run.checkpoint_url(step)


def test_fixed_draws_cover_the_schedule_and_never_change():
    t, noise = fixed_draws(4, (2, 3), 1000)
    assert t.tolist() == [125, 375, 625, 875]
    t2, noise2 = fixed_draws(4, (2, 3), 1000)
    assert torch.equal(noise, noise2) and torch.equal(t, t2)


def test_same_weights_same_figures_whatever_world_size_wrote_them(tmp_path):
    cfg = _cfg(tmp_path, _validation_set(tmp_path / "val"))
    validator = Validator(to_dict(cfg))
    assert validator.val.latents.shape == (3, 192, 8, 4, 4) and validator.val.text is None
    results = {}
    for world in (1, 2):
        run = ckpt.RunDir(str(tmp_path / f"runs-w{world}"), "val")
        url = _commit(cfg, run, 2, world)
        results[world] = validator.validate(2, url, run.validation_url(2))
        out = Path(storage.local_path(run.validation_url(2)))
        assert sorted(p.name for p in out.iterdir()) == [
            "000_000000000.gif", "000_000000000.mp4", "001_000000001.gif", "001_000000001.mp4",
            "contact_sheet.png", RESULT]
        assert json.loads((out / RESULT).read_text())["loss"] == results[world]["loss"]
    assert results[1]["loss"] == results[2]["loss"]  # bit for bit: the weights are the same
    assert results[1]["per_clip"] == results[2]["per_clip"]
    assert math.isfinite(results[1]["loss"]) and results[1]["loss"] > 0
    assert {"psnr", "ssim", "displacement_ratio"} <= set(results[1])  # the clips show one moving object
    other = ckpt.RunDir(str(tmp_path / "runs-other"), "val")
    url = _commit(cfg, other, 2, 1, seed=1)
    changed = validator.validate(2, url, other.validation_url(2), {"loss": -1.0, "loss_rises": 2})
    assert changed["loss"] != results[1]["loss"]  # other weights, another loss
    assert changed["loss_rises"] == 3  # it rose once more (what the alert counts)
    assert validator.validate(2, url, other.validation_url(2), {"loss": 1e9, "loss_rises": 2})["loss_rises"] == 0


def _zero3_params(cfg, rank: int, world: int) -> list[tuple[str, torch.nn.Parameter]]:
    """A fresh (other-seeded) model's parameters carrying the attributes ZeRO-3 gives them on
    `rank` of `world` (`ds_tensor`: this rank's flat partition, `ds_numel`, `ds_shape`): what
    `PartitionedEMA` and `partitions.param_entries` see in a training rank."""
    out = []
    for name, t in _seeded(cfg, 99):
        p = torch.nn.Parameter(t.clone())
        lo, hi = partitions.partition_range(t.numel(), rank, world)
        p.ds_tensor = torch.zeros(partitions.partition_size(t.numel(), world))
        p.ds_tensor[: hi - lo] = t.flatten()[lo:hi]
        p.ds_numel, p.ds_shape = t.numel(), tuple(t.shape)
        out.append((name, p))
    return out


def _resume_and_save(cfg, old: ckpt.RunDir, new: ckpt.RunDir, step: int, world: int, scratch: Path) -> str:
    """Resume the checkpoint of `old` at `step` on `world` ranks, restoring each rank's EMA
    slice the way `Trainer._restore_ema` does (the overlapping old files only), then save it
    untrained into `new` as the resumed ranks write a checkpoint. Returns its URL."""
    from trip.train.ema import PartitionedEMA

    found = old.latest(at_most=step)
    old_world = int(found.record["world_size"])
    files = {}
    for rank in range(world):
        named = _zero3_params(cfg, rank, world)
        ema = PartitionedEMA(named, cfg.train.ema_decay)
        numels = [int(p.ds_numel) for _, p in named]
        need = partitions.source_ranks(numels, old_world, rank, world)
        rels = {r: ckpt.partition_file("ema", r, old_world) for r in need}
        dest = scratch / f"w{world}-r{rank}"
        old.download(step, rels.values(), str(dest))
        parts = partitions.read_local_partitions({r: str(dest / rel) for r, rel in rels.items()},
                                                 [(n, num, True) for (n, _), num in zip(named, numels)],
                                                 rank=rank, world_size=world, kind="ema")
        ema.load_partitions(parts)
        rel = ckpt.partition_file("ema", rank, world)
        path = Path(storage.local_path(new.checkpoint_url(step))) / rel
        partitions.write_partitions(str(path), partitions.param_entries(named, ema.shadow), rank=rank,
                                    world_size=world, kind="ema")
        files[rel] = path.stat().st_size
    record = dict(found.record, world_size=world, files=files, restarts=1)
    new.write_bytes(f"checkpoints/{ckpt.step_name(step)}/{ckpt.RECORD}", json.dumps(record).encode())
    return new.checkpoint_url(step)


def test_the_same_weights_validate_to_the_same_loss_before_and_after_a_resume(tmp_path):
    """Issue 14: a run resumed (at world size 2 or 1) from a checkpoint holds the EMA it
    saved, and validating those weights again, by a restarted validator, gives the loss
    of before the resume bit for bit; so does re-validating the checkpoint itself."""
    from safetensors.torch import load_file

    from trip.train.export import export_checkpoint
    from trip.train.validation import validation_loss

    cfg = _cfg(tmp_path, _validation_set(tmp_path / "val"), **{"train.validation_videos": "0"})
    before = ckpt.RunDir(str(tmp_path / "before"), "val")
    url = _commit(cfg, before, 2, world=2, seed=0, ema_seed=1)  # EMA != weights: validation reads the EMA
    loss = Validator(to_dict(cfg)).validate(2, url, before.validation_url(2))["loss"]
    assert math.isfinite(loss) and loss > 0
    ema = {n: t for n, t in _seeded(cfg, 1)}
    for world in (2, 1):
        after = ckpt.RunDir(str(tmp_path / f"after-w{world}"), "val")
        resumed = _resume_and_save(cfg, before, after, 2, world, tmp_path / "scratch")
        export_checkpoint(resumed, str(tmp_path / f"m{world}"), format="trip")
        restored = load_file(str(tmp_path / f"m{world}" / "model.safetensors"))
        assert restored.keys() == ema.keys() and all(torch.equal(restored[n], ema[n]) for n in ema)
        # a validator started after the resume (a new actor): the same figure, bit for bit
        again = Validator(to_dict(cfg)).validate(2, resumed, after.validation_url(2))["loss"]
        assert again == loss, (world, again, loss)
    # the real validation function on the restored weights in a plain model, and a lost
    # result of the checkpoint itself redone after a restart: still the same number
    model = TRIPModel.from_pretrained(str(tmp_path / "m1")).eval()
    assert validation_loss(model, Validator(to_dict(cfg)).val) == loss
    redone = Validator(to_dict(cfg)).validate(2, url, before.validation_url(2))["loss"]
    assert redone == loss


def test_watcher_validates_each_step_once_across_restarts_and_retention_waits(tmp_path):
    cfg = _cfg(tmp_path, _validation_set(tmp_path / "val"), **{"train.validation_videos": "0"})
    run = ckpt.RunDir(cfg.run.storage_path, cfg.run.name, validate_every=2)
    validator = Validator(to_dict(cfg))
    calls: list[int] = []

    def validate(step: int, url: str, out: str, previous: dict | None) -> dict:
        calls.append(step)
        assert (previous is None) == (step == 2)  # the step before's result, from storage
        return validator.validate(step, url, out, previous)

    for step in (2, 4):
        _commit(cfg, run, step, 1)
    (Path(storage.local_path(run.checkpoint_url(6))) / "ds").mkdir(parents=True)  # a torn checkpoint: no record
    assert run.retain(keep=1) == []  # 2 awaits its validation: kept although keep=1
    seen: list[int] = []
    watcher = ValidationWatcher(run, 2, validate, on_result=lambda s, f: seen.append(s))
    assert watcher.run_pending() == [2, 4] and seen == [2, 4]
    assert watcher.run_pending() == []
    # a new driver (a restart) finds nothing to do; a lost result is redone, once
    assert ValidationWatcher(run, 2, validate).run_pending() == []
    Path(storage.local_path(run.validation_url(4)), RESULT).unlink()
    assert ValidationWatcher(run, 2, validate).run_pending() == [4]
    assert calls == [2, 4, 4]
    results = [json.loads(Path(storage.local_path(run.validation_url(s)), RESULT).read_text()) for s in (2, 4)]
    assert results[0]["loss_rises"] == 0 and results[1]["loss_rises"] == 0  # the same weights: no rise
    assert run.retain(keep=1) == [2]  # validated now: retention applies again


def test_the_watcher_thread_reports_a_failure_and_training_config_rules(tmp_path):
    run = ckpt.RunDir(str(tmp_path / "runs"), "val", validate_every=2)
    cfg = _cfg(tmp_path, _validation_set(tmp_path / "val"))
    _commit(cfg, run, 2, 1)

    def broken(step: int, url: str, out: str, previous: dict | None) -> dict:
        raise RuntimeError("validation set unreadable")

    watcher = ValidationWatcher(run, 2, broken, poll_s=0.01).start()
    watcher.finish()
    assert isinstance(watcher.error, RuntimeError) and watcher.results == {}
    with pytest.raises(ValueError, match="multiple of train.checkpoint_every"):
        _cfg(tmp_path, "x", **{"train.validate_every": "3"})
    with pytest.raises(ValueError, match="data.validation is empty"):
        load_config(TINY, ["train.validate_every=250"])
    with pytest.raises(FileNotFoundError, match="data.validation: dataset index not found"):
        ValidationSet.load(str(tmp_path / "nothing"), 4)
