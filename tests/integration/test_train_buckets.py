"""Training and sampling on a bucketed, non-square dataset, with real Ray processes.

Two buckets: landscape clips of 8 frames (latents 4 x 6) and portrait clips of 4 frames
(latents 6 x 4). A worker is SIGKILLed mid-run; the run resumes from its last checkpoint.
Checked: every step on every rank trains one bucket, all ranks the same one; every sample
of every bucket is trained on exactly once per epoch along the surviving steps; the
exported model samples both shapes.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch

from tests.integration.test_train_faults import kill_rank_at, rows, surviving

pytestmark = pytest.mark.integration
# name -> (latent shape [F, C, h, w], shard sizes); the tiny codec is a x8 pixel unshuffle
BUCKETS = {"32x48x8": ((8, 192, 4, 6), [8, 8]), "48x32x4": ((4, 192, 6, 4), [8, 8])}
SAMPLES, GLOBAL_BATCH, STEPS = 32, 8, 8


def test_bucketed_run_survives_sigkill_exactly_once_and_samples_both_shapes(s3_bucket, tmp_path):
    import ray

    from data_tools.synth import write_synthetic_buckets
    from pipelines.train import run_training, validate
    from tests.integration.callbacks import recording
    from tests.integration.test_train_ray import make_config
    from trip.pipeline import TRIPPipeline
    from trip.train.checkpoint import RunDir
    from trip.train.export import export_checkpoint

    write_synthetic_buckets(f"{s3_bucket}/buckets", BUCKETS, text_shape=None)
    cfg = make_config(s3_bucket, "buckets", STEPS, **{"data.dataset": f"{s3_bucket}/buckets",
                                                     "run.max_failures": 2})
    validate(cfg)
    debug = tmp_path / "debug"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        t, killed = kill_rank_at(debug, 3)
        res = run_training(cfg, recording(debug, slow=0.3))
        t.join(5)
    finally:
        ray.shutdown()
    assert killed and res.steps == STEPS
    assert len({r["attempt"] for r in rows(debug)}) == 2  # one restart

    final = surviving(debug)
    assert sorted(final) == list(range(1, STEPS + 1))
    shape_of = {}
    for step, rs in final.items():
        buckets = {b for r in rs for b in r["buckets"]}
        assert len(buckets) == 1, (step, rs)  # one bucket per step, on every rank
        assert sum(len(r["keys"]) for r in rs) == GLOBAL_BATCH
        shape_of[step] = buckets.pop()
    per_epoch = SAMPLES // GLOBAL_BATCH
    for epoch in range(STEPS // per_epoch):
        steps = range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)
        seen = collections.Counter(k for s in steps for r in final[s] for k in r["keys"])
        assert len(seen) == SAMPLES and set(seen.values()) == {1}, (epoch, seen)
        assert collections.Counter(shape_of[s] for s in steps) == {name: 2 for name in BUCKETS}

    run = RunDir(f"{s3_bucket}/runs", "buckets")
    export_checkpoint(run.url, str(tmp_path / "model"))
    pipe = TRIPPipeline.from_pretrained(str(tmp_path / "model"))
    for name in BUCKETS:
        h, w, f = (int(x) for x in name.split("x"))
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        out = pipe(image=image, num_frames=f, height=h, width=w, num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).frames
        assert tuple(out.shape) == (1, f, 3, h, w) and torch.isfinite(out).all(), (name, out.shape)
