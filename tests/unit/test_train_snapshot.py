"""Deferred checkpoint serialization: host copies now, files later, same content."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from trip.train.snapshot import SnapshotEngine, host_copy_all, write_snapshots

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "tiny_cpu.yaml"


def test_a_deferred_save_writes_the_state_as_it_was_when_saved(tmp_path):
    live = {"optimizer_state_dict": {"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": [{"lr": 0.1}]},
            "fp32": [torch.arange(6.0).view(2, 3)], "meta": OrderedDict(step=7), "name": "x",
            "param_shapes": [OrderedDict(w=torch.Size([2, 3]))]}  # DeepSpeed's zero_to_fp32 calls .numel()
    engine = SnapshotEngine()
    engine.save(live, str(tmp_path / "ds" / "zero_pp_rank_0_optim_states.pt"))
    # training goes on and updates the live tensors in place before anything is written
    live["optimizer_state_dict"]["state"][0]["exp_avg"].mul_(5)
    live["fp32"][0].add_(100)
    live["optimizer_state_dict"]["param_groups"][0]["lr"] = 0.5
    pending = engine.take()
    assert engine.take() == []
    assert not (tmp_path / "ds").exists()  # nothing was written on the training path
    write_snapshots(pending)
    back = torch.load(tmp_path / "ds" / "zero_pp_rank_0_optim_states.pt", weights_only=False)
    assert torch.equal(back["optimizer_state_dict"]["state"][0]["exp_avg"], torch.ones(4))
    assert torch.equal(back["fp32"][0], torch.arange(6.0).view(2, 3))
    assert back["optimizer_state_dict"]["param_groups"][0]["lr"] == 0.1  # containers are copied too
    assert back["meta"] == OrderedDict(step=7) and back["name"] == "x"
    assert type(back["param_shapes"][0]["w"]) is torch.Size  # not rebuilt as a plain tuple
    assert not list(tmp_path.rglob("*.partial"))


def test_host_copy_all_is_one_copy_per_dtype_with_the_original_shapes():
    live = [torch.randn(3, 4), torch.randn(5).bfloat16(), torch.randn(2), torch.zeros(0)]
    copies = host_copy_all(live)
    assert [(c.shape, c.dtype) for c in copies] == [(t.shape, t.dtype) for t in live]
    assert all(torch.equal(c, t) for c, t in zip(copies, live))
    live[0].add_(1)
    assert not torch.equal(copies[0], live[0])
    assert copies[0].untyped_storage().data_ptr() == copies[2].untyped_storage().data_ptr()  # one buffer


# --------------------------------------------------------------------------- ZeroSnapshot


def _same(a, b, where="state"):
    """Deep equality of two checkpoint states: keys and their order, types, tensor bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _zero_snapshot_rank(rank: int, world: int, port: int, out: str) -> None:
    import os
    import tempfile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from trip.config import load_config
    from trip.diffusion import TRIPObjective
    from trip.model import TRIPModel
    from trip.train.ds_config import deepspeed_config
    from trip.train.snapshot import SnapshotEngine, ZeroSnapshot

    deepspeed.init_distributed(dist_backend="gloo")
    # threshold 0: every parameter partitioned; a high threshold keeps small ones whole on
    # every rank. A persistent buffer that training changes stands for running statistics.
    for threshold in (0, 10_000):
        cfg = load_config(TINY, [f"train.zero.param_persistence_threshold={threshold}"])
        torch.manual_seed(0)
        model = TRIPModel(cfg.model, cfg.diffusion)
        model.register_buffer("seen", torch.zeros(3))
        groups = model.param_groups()
        params = [{"params": groups[n], "lr": 1e-3, "name": n} for n in ("unet", "fusion")]
        ds_cfg = deepspeed_config(cfg.train, micro_batch_size=2, grad_accum=1, world_size=world, on_gpu=False)
        engine, *_ = deepspeed.initialize(model=TRIPObjective(model, 0.0), model_parameters=params, config=ds_cfg)
        scratch = tempfile.mkdtemp()
        fast = ZeroSnapshot(engine, scratch, "ds")
        assert fast.fast
        m = cfg.model
        g = torch.Generator().manual_seed(rank)
        for step in range(3):  # the optimizer state, step counters and persistent weights move
            lat = torch.randn(2, m.latent_channels, m.num_frames, m.latent_size, m.latent_size, generator=g)
            loss = engine(lat, lat[:, :, 0], None, None)
            engine.backward(loss)
            engine.step()
            model.seen.add_(1)
            got = fast.capture(os.path.join(scratch, "fast"), {"trip_step": step})
            # DeepSpeed's own save of the same moment, captured the same way
            slow = SnapshotEngine()
            engine.checkpoint_engine = slow
            engine.save_checkpoint(os.path.join(scratch, "fast"), tag="ds", client_state={"trip_step": step})
            engine.checkpoint_engine = fast.snapshots
            want = slow.take()
            assert [p for p, _ in got] == [p for p, _ in want], ([p for p, _ in got], [p for p, _ in want])
            for (path, a), (_, b) in zip(got, want):
                _same(a, b, os.path.basename(path))
        # parameters are placeholders after DeepSpeed's release; the buffer is re-read every time
        assert list(fast.model[0][2]) == ["model.seen"]
    with open(os.path.join(out, f"rank{rank}.ok"), "w") as f:
        f.write("ok")


def test_zero_snapshot_files_equal_deepspeeds_own_save(tmp_path):
    """The fast capture writes what `engine.save_checkpoint` would, key for key and bit for
    bit, on 2 gloo ranks after real optimizer steps, partitioned and persistent parameters."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.start_processes(_zero_snapshot_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]
