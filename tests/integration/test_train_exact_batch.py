"""The exact global batch at any world size, and export of a sharded checkpoint.

Real DeepSpeed ZeRO-3 engines in 2 and 3 gloo processes (no Ray: the Trainer is driven
directly) train one optimizer step on the same 12 samples (one global batch) from the same
seed. At W=2 each rank takes 6 samples in 2 micro-batches of 3, at W=3 each takes 4 in one:
the averaged gradient, hence the global gradient norm and the update, must agree to float
tolerance (with the UNet's dropout off: its masks follow the batch layout). Then `trip export` of each sharded checkpoint must equal, bit for bit, the
consolidation of the live partitions and DeepSpeed's own fp32 reconstruction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port
from trip.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"
GLOBAL = 12


def _config(data: str, runs: str, name: str, steps: int = 1, **extra: object):
    sets = {"data.dataset": data, "run.storage_path": runs, "run.name": name, "train.max_steps": steps,
            "train.global_batch_size": GLOBAL, "data.micro_batch_size": 4, "data.num_workers": 0,
            "train.warmup_steps": 1, "train.min_lr_ratio": 1.0, "train.checkpoint_every": 1,
            "train.log_every": 1, "train.text_dropout": 0.0, "metrics.port": 0,
            "model.temporal_conv_dropout": 0.0, **extra}  # dropout masks depend on the batch layout
    return load_config(TINY, [f"{k}={v}" for k, v in sets.items()])


def _rank(rank: int, world: int, port: int, data: str, runs: str, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trip.train.loop import Trainer

        cfg = _config(data, runs, name)
        scratch = os.path.join(out, f"scratch-{rank}")
        os.makedirs(scratch, exist_ok=True)
        trainer = Trainer(cfg, rank, world, 0, scratch)
        trainer.run()
        # this rank's live partitions after the step, for an independent consolidation
        parts = {n.removeprefix("model."): (p.ds_tensor.detach().clone(), p.ds_numel, tuple(p.ds_shape))
                 for n, p in trainer.named if hasattr(p, "ds_tensor")}
        torch.save(parts, os.path.join(out, f"parts-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _train(tmp: Path, world: int, data: str) -> Path:
    out = tmp / f"w{world}"
    out.mkdir()
    mp.spawn(_rank, args=(world, free_port(), data, str(tmp / "runs"), f"w{world}", str(out)), nprocs=world,
             join=True)
    return out


def _consolidate_live(out: Path, world: int) -> dict[str, torch.Tensor]:
    ranks = [torch.load(out / f"parts-{r}.pt") for r in range(world)]
    full = {}
    for name, (_, numel, shape) in ranks[0].items():
        flat = torch.cat([ranks[r][name][0].reshape(-1) for r in range(world)])
        full[name] = flat[:numel].view(shape).float()
    return full


@pytest.fixture(scope="module")
def two_and_three(tmp_path_factory):
    from data_tools.synth import write_synthetic_dataset

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    tmp = tmp_path_factory.mktemp("exact")
    data = str(tmp / "data")
    write_synthetic_dataset(data, [5, 7], latent_shape=(8, 192, 4, 4), text_shape=None)  # one global batch
    return tmp, {w: _train(tmp, w, data) for w in (2, 3)}


def test_two_and_three_ranks_take_the_same_first_step(two_and_three):
    from trip.model import TRIPModel
    from trip.train.checkpoint import RunDir

    tmp, outs = two_and_three
    cfg = _config("unused", str(tmp / "runs"), "w2")
    torch.manual_seed(cfg.train.seed)
    init = {k: v.float() for k, v in TRIPModel(cfg.model, cfg.diffusion).state_dict().items()}
    after = {w: _consolidate_live(outs[w], w) for w in outs}
    norms = {w: RunDir(str(tmp / "runs"), f"w{w}").history()[0]["grad_norm"] for w in outs}
    assert norms[2] == pytest.approx(norms[3], rel=1e-4), norms
    assert norms[2] > 0
    # Adam's first update is lr * g / (|g| + eps): +-lr wherever |g| >> eps, so it is exact up to
    # float noise except for gradients within a few eps of zero, where that noise moves it by a
    # fraction of lr. A different sample set or weighting flips signs: differences of 2 lr.
    lr = cfg.train.lr_unet
    moved, off, total = 0, 0, 0
    for name, w0 in init.items():
        d2, d3 = after[2][name] - w0, after[3][name] - w0
        torch.testing.assert_close(d2, d3, rtol=1e-3, atol=0.1 * lr, msg=lambda m, n=name: f"{n}: {m}")
        off, total = off + int((d2 - d3).abs().gt(1e-6).sum()), total + d2.numel()
        moved += int(d2.abs().max() > 0)
    assert off / total < 1e-3, f"{off} of {total} update elements differ by more than 1e-6"
    assert moved > len(init) // 2, "the step changed almost nothing: the comparison would be empty"


def test_export_of_a_sharded_checkpoint_is_the_consolidated_weights_bit_for_bit(two_and_three, tmp_path):
    from safetensors.torch import load_file

    from trip.train.checkpoint import RunDir
    from trip.train.export import export_checkpoint

    tmp, outs = two_and_three
    for world, out in outs.items():
        run = RunDir(str(tmp / "runs"), f"w{world}")
        export_checkpoint(run.url, str(tmp_path / f"raw{world}"), use_ema=False, format="trip")
        exported = load_file(str(tmp_path / f"raw{world}" / "model.safetensors"))
        live = _consolidate_live(out, world)
        assert exported.keys() == live.keys()
        for name, t in live.items():
            assert torch.equal(exported[name], t), f"W={world}: {name} differs from the live partitions"
        # DeepSpeed's own reconstruction from the fp32 optimizer partitions agrees too
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        found = run.latest()
        local = tmp_path / f"ds{world}"
        run.download(found.step, [r for r in found.record["files"] if r.startswith("ds/")], str(local))
        ds = get_fp32_state_dict_from_zero_checkpoint(str(local), tag="ds")
        for name, t in live.items():
            assert torch.equal(ds[f"model.{name}"].float(), t), f"W={world}: {name} differs from zero_to_fp32"
        # the EMA export is a different, equally complete model
        export_checkpoint(run.url, str(tmp_path / f"ema{world}"), format="trip")
        ema = load_file(str(tmp_path / f"ema{world}" / "model.safetensors"))
        assert ema.keys() == exported.keys()
        cfg = json.loads((tmp_path / f"ema{world}" / "config.json").read_text())
        assert cfg["codec"]["kind"] == "lossless"


def test_a_resize_converts_once_and_later_resizes_reuse_the_conversion(two_and_three, tmp_path):
    """The universal conversion lands next to the checkpoint; a second resize from the same
    checkpoint reads it back without the ZeRO files it was made from."""
    import shutil

    from trip.train import checkpoint as ckpt

    tmp, _ = two_and_three
    src = ckpt.RunDir(str(tmp / "runs"), "w2")
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "w2", runs / "w2")  # a copy: the other tests read the original
    run = ckpt.RunDir(str(runs), "w2")
    found = run.latest()
    assert found.step == src.latest().step
    first = ckpt.ensure_universal(run, found, converter=True, workers=2, scratch=str(tmp_path / "s1"))
    assert any(f.startswith("universal/zero/") for f in first["files"])
    assert set(first["files"]) <= set(run.listing(found.step))
    for rel in [f for f in found.record["files"] if f.startswith("ds/")]:  # the sources are gone
        (runs / "w2" / "checkpoints" / ckpt.step_name(found.step) / rel).unlink()
    again = ckpt.ensure_universal(run, found, converter=True, workers=2, scratch=str(tmp_path / "s2"))
    assert again == first
    local = ckpt.fetch_universal(run, found, again, str(tmp_path / "cache"))
    assert (Path(local) / "universal" / "zero").is_dir()
    # another rank of the same machine finds the local copy complete and does not download again
    assert ckpt.fetch_universal(run, found, again, str(tmp_path / "cache")) == local
