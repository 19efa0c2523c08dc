"""bench.gpu_check on a CPU-only machine: the no-GPU path, its pure helpers, the FLOP
counting on a tiny model, and the Ray section's config (built, validated, not run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_no_gpu_run_exits_0_with_a_null_json_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert "no GPU" in lines[0] and "skipped" in lines[0]
    res = json.loads(lines[-1])
    for key in ("bench", "gpu", "step_seconds", "samples_per_second", "mfu", "peak_mem_gib", "ray_first_seconds",
                "ray_resume_seconds", "resumed_at_step", "vae_frames_per_second", "errors", "total_seconds"):
        assert key in res, key
    assert res["bench"] == "gpu_check"
    assert all(res[k] is None for k in gpu_check.FIGURES if k != "quick"), res
    assert res["errors"] == {} and sorted(res["skipped"]) == sorted(gpu_check.SECTIONS)
    assert isinstance(res["total_seconds"], float) and res["total_seconds"] < 60
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == res


def test_flops_per_step_and_utilization():
    assert gpu_check.model_flops_per_step(1e12, 4) == 12e12
    assert gpu_check.model_flops_per_step(1e12, 4, recompute=True) == 16e12
    # 12 TFLOP in 0.1 s on a 200 TFLOP/s part: 120 TFLOP/s achieved, 60 %
    assert gpu_check.utilization(12e12, 0.1, 200.0) == pytest.approx(0.6)
    assert gpu_check.utilization(989e12, 1.0, 989.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gpu_check.utilization(1.0, 0.0, 989.0)


def test_narrow_unet_keeps_a_valid_config():
    from trip.config import UNetConfig, load_config, to_dict

    base = to_dict(load_config(gpu_check.BASE).model.unet)
    assert gpu_check.narrow_unet(base, 1) == base
    half = gpu_check.narrow_unet(base, 2)
    assert half["block_out_channels"] == [c // 2 for c in base["block_out_channels"]]
    assert half["attention_head_dim"] == base["attention_head_dim"] // 2  # the same heads per block
    for d in (2, 4, 8, 16):
        n = gpu_check.narrow_unet(base, d)
        UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in n.items()})  # validates groups
        assert all(c % n["attention_head_dim"] == 0 for c in n["block_out_channels"])
    with pytest.raises(ValueError):
        gpu_check.narrow_unet({"block_out_channels": [30, 60]}, 4)


def test_choose_ray_width_narrows_when_the_disk_is_short():
    params = {1: 1_400_000_000, 2: 370_000_000, 4: 100_000_000, 8: 30_000_000, 16: 10_000_000}.__getitem__
    per = gpu_check.CKPT_COPIES_ON_DISK * gpu_check.CKPT_BYTES_PER_PARAM
    assert gpu_check.choose_ray_width("auto", False, 10**15, params) == (2, None)
    assert gpu_check.choose_ray_width("auto", True, 10**15, params) == (4, None)
    assert gpu_check.choose_ray_width("full", False, 10**15, params) == (1, None)
    divisor, why = gpu_check.choose_ray_width("full", False, per * 200_000_000, params)
    assert divisor == 4 and "disk" in why
    assert gpu_check.choose_ray_width("half", False, 0, params)[0] == 16  # never fails: narrowest
    with pytest.raises(ValueError):
        gpu_check.choose_ray_width("huge", False, 0, params)


def test_report_and_json_of_an_empty_result():
    res = gpu_check.empty_result()
    res["errors"]["ray"] = "RuntimeError: boom\ntraceback"
    res["notes"].append("a note")
    res["mfu"] = float("nan")
    text = "\n".join(gpu_check.report_lines(res))
    for title in gpu_check.TITLES.values():
        assert title in text
    assert "ERROR" in text and "boom" in text and "traceback" not in text and "note: a note" in text
    assert json.loads(json.dumps(gpu_check.clean_json(res)))["mfu"] is None


@pytest.fixture()
def one_thread():
    """Tiny ops: one thread is faster, and much faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_forward_flops_on_a_tiny_model(tiny_model_config, one_thread):
    from bench.gpu_step import _flops
    from trip.diffusion import TRIPObjective
    from trip.model import TRIPModel

    torch.manual_seed(0)
    mcfg = tiny_model_config()
    objective = TRIPObjective(TRIPModel(mcfg), 0.0).train()
    c, f, s = mcfg.latent_channels, mcfg.num_frames, mcfg.latent_size

    def inputs(b):
        lat = torch.randn(b, c, f, s, s)
        return lat, lat[:, :, 0].clone(), torch.randn(b, 5, mcfg.unet.cross_attention_dim)

    one, two = gpu_check.forward_flops(objective, inputs(1)), gpu_check.forward_flops(objective, inputs(2))
    assert one > 0 and two == pytest.approx(2 * one, rel=1e-6)
    assert all(p.grad is None for p in objective.parameters())  # no graph, no gradients
    # fwd + bwd as executed (bench.gpu_step's count): ~3x forward, ~4x with activation checkpointing
    assert 2.5 < _flops(objective, inputs(2)) / two < 3.5
    objective.model.set_gradient_checkpointing(True)
    assert 3.4 < _flops(objective, inputs(2)) / two < 4.5


def test_ray_config_is_a_valid_one_gpu_run_of_the_base_shapes(tmp_path):
    from pipelines.train import validate

    data, runs = str(tmp_path / "data"), str(tmp_path / "runs")
    cfg = gpu_check.ray_config(data, runs, 4, divisor=2)
    assert cfg.scaling.num_workers == 1 and cfg.scaling.min_workers is None and cfg.scaling.use_gpu
    assert cfg.train.global_batch_size == cfg.data.micro_batch_size == 4 and cfg.grad_accum_steps(1) == 1
    assert cfg.train.max_steps == 4 and cfg.train.checkpoint_every == 2 and cfg.metrics.port == 0
    assert cfg.model.pretrained_unet is None and cfg.run.max_failures == 0
    assert cfg.model.unet.block_out_channels == (160, 320, 640, 640)
    assert cfg.model.gradient_checkpointing and cfg.train.precision == "bf16"
    index = gpu_check.write_ray_dataset(data, cfg)
    assert index["latent_shape"] == [16, 4, 32, 32] and index["text_shape"] == [77, 1024]
    validate(cfg)  # the driver's own checks: dataset shapes vs model, storage writable
    assert gpu_check.ray_config(data, runs, 6).model.unet.block_out_channels == (320, 640, 1280, 1280)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_kill_session_stops_children_in_other_process_groups():
    # like Ray's workers: a grandchild in a process group of its own, same session
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], process_group=0)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    assert _alive(grandchild) and os.getpgid(grandchild) != proc.pid
    gpu_check._kill_session(proc, grace=2.0)
    assert proc.poll() is not None
    assert not _alive(grandchild)


def test_sd_vae_config_builds_a_vae_codec(tmp_path, one_thread):
    from diffusers import AutoencoderKL

    from trip.codec import VAECodec

    AutoencoderKL(**gpu_check.SD_VAE_CONFIG).save_pretrained(tmp_path)
    codec = VAECodec(str(tmp_path), device="cpu", dtype="float32")
    assert (codec.channels, codec.downscale, codec.scaling_factor) == (4, 8, 0.18215)
    assert codec.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 4, 4)
