"""Deferred checkpoint serialization: host copies now, files later, same content."""

from __future__ import annotations

from collections import OrderedDict

import torch

from trip.train.snapshot import SnapshotEngine, host_copy_all, write_snapshots


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
