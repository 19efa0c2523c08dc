"""LoRA fine-tuning on 2 ZeRO-3 workers under Ray Train, on a base model exported by `trip export`.

One short run (4 steps, checkpoint every 2) resumed to 6 steps, then both exports: the base
weights stay bit-identical on every rank, the checkpoint holds only adapters and their
optimizer state, the resumed run continues after its checkpoint, the exported adapter loads
into the base pipeline and changes its output, and the merged export samples like base +
adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.integration.callbacks import SaveParameters, recording
from tests.integration.test_train_checkpoints import _config, _local_dataset
from tests.integration.test_train_faults import rows
from tests.unit.checkpoints import fake_checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


def _base_model(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A base model directory as `trip export` writes it, and its weights."""
    from trip.config import load_config
    from trip.model import TRIPModel
    from trip.train.export import export_checkpoint

    cfg = load_config(TINY)
    torch.manual_seed(11)
    state = TRIPModel(cfg.model, cfg.diffusion).state_dict()
    export_checkpoint(str(fake_checkpoint(tmp_path / "runs" / "base", step=1, cfg=cfg, state=state)),
                      str(tmp_path / "base"), use_ema=False)
    return tmp_path / "base", state


def _frames(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return pipe(image=image, num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                output_type="latent").frames


def test_lora_on_two_zero3_workers_trains_only_adapters_resumes_and_exports(tmp_path):
    import ray
    from safetensors.torch import load_file

    from pipelines.train import run_training
    from trip.model.lora import base_key, is_adapter
    from trip.pipeline import TRIPPipeline
    from trip.train import checkpoint as ckpt
    from trip.train import partitions
    from trip.train.export import export_checkpoint

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    base_dir, base = _base_model(tmp_path)
    data = _local_dataset(tmp_path)
    storage = str(tmp_path / "runs")
    debug, params = tmp_path / "debug", tmp_path / "params"
    lora = {"model.pretrained_model": str(base_dir), "train.lora.rank": 4, "train.lora.alpha": 8,
            "train.ema_decay": 0.5}
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        first = run_training(_config(storage, data, "lora", 4, **lora), recording(debug))
        assert first.steps == 4
        second = run_training(_config(storage, data, "lora", 6, **lora), [*recording(debug), SaveParameters(params)])
        assert second.steps == 6
    finally:
        ray.shutdown()

    # the resumed attempt started right after the step-4 checkpoint
    attempts = sorted({r["attempt"] for r in rows(debug)})
    assert len(attempts) == 2
    assert min(r["step"] for r in rows(debug) if r["attempt"] == attempts[1]) == 5

    # every rank's frozen base is bit-identical to the base model; the adapters moved
    moved = 0
    for r in range(2):
        mine = load_file(str(params / f"params-rank{r}-of-2.safetensors"))
        frozen = [n for n in mine if not is_adapter(n)]
        assert len(frozen) == len(base)
        for name in frozen:
            full = base[base_key(name)].flatten()
            start, stop = partitions.partition_range(full.numel(), r, 2)
            assert torch.equal(mine[name][: stop - start], full[start:stop]), (r, name)
        moved += sum(int(mine[n].abs().max() > 0) for n in mine if ".lora_B." in n)
    assert moved > 0  # B starts at zero: training changed it

    # the checkpoint holds adapters and their optimizer state only
    run = ckpt.RunDir(storage, "lora")
    found = run.latest()
    assert found.step == 6
    local = tmp_path / "ckpt"
    rels = [f for f in found.record["files"] if f.startswith(("weights/", "ema/"))]
    run.download(found.step, rels, str(local))
    for rel in rels:
        names = list(partitions.read_partition_file(str(local / rel)).tensors)
        assert names and all(is_adapter(n) for n in names), (rel, [n for n in names if not is_adapter(n)][:3])
    base_bytes = sum(t.numel() * t.element_size() for t in base.values())
    ds_bytes = sum(size for f, size in found.record["files"].items() if f.startswith("ds/"))
    assert ds_bytes < 0.1 * base_bytes, (ds_bytes, base_bytes)  # full fine-tuning: ~3x base_bytes (fp32 + Adam)

    # exports: the adapter changes the base pipeline's output; merged = base + adapter
    export_checkpoint(run.url, str(tmp_path / "adapter"))
    export_checkpoint(run.url, str(tmp_path / "merged"), merge_lora=True)
    pipe = TRIPPipeline.from_pretrained(str(base_dir))
    plain = _frames(pipe)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    adapted = _frames(pipe)
    assert not torch.allclose(plain, adapted)
    torch.testing.assert_close(_frames(TRIPPipeline.from_pretrained(str(tmp_path / "merged"))), adapted,
                               rtol=1e-4, atol=1e-4)
