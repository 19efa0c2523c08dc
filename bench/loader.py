"""Samples/s of trip.data.LatentLoader vs a plain webdataset pipeline vs raw fsspec byte reads.

The issue's setting: 800 samples of 16x4x32x32 float16 latents + 77x64 float16 text
states (16 shards of 50), 2 DataLoader workers, batch 8, one full epoch per timing
(workers persist between epochs on both sides), on local disk and on a moto S3 server. The
S3 server runs in its own process so its Python does not share a GIL with the loader
being timed. All are timed in turn, round after round, so that load from other
processes on a shared machine hits them alike. Raw byte reads (every shard fetched with
fsspec `cat_file` by one process) are the issue's ceiling; on S3 our loader reads with
presigned GETs, which are cheaper than fsspec's own reads, so that ratio is not capped at 1.

Two webdataset baselines: the plain pipeline as usually written (float16 numpy batches
out) and the same plus the conversion a training step needs (float32 torch tensors,
done in the workers), which is what our loader delivers.

    python -m bench.loader [--samples 800] [--iters 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from bench.common import free_port, print_table, row
from data_tools.synth import write_synthetic_dataset
from trip import storage
from trip.config import DataConfig
from trip.data import LatentLoader

LATENT_SHAPE = (16, 4, 32, 32)
TEXT_SHAPE = (77, 64)
WORKERS, BATCH = 2, 8


def _fsspec_open(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset stage: open each shard URL with fsspec inside the worker (no s3 handler in wds)."""
    for sample in src:
        fs, path = storage.filesystem(sample["url"])
        with fs.open(path, "rb") as stream:
            yield dict(sample, stream=stream)


def plain_webdataset(urls: list[str], float32: bool = False) -> DataLoader:
    """The usual webdataset pipeline: split by node and worker, expand tars, decode, batch.

    float32=True adds what a training step needs from it (our loader's batch contract):
    float32 torch tensors, converted in the workers.
    """
    stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, _fsspec_open, _expand,
              wds.decode(), wds.to_tuple("latents.npy", "text.npy", "txt"), wds.batched(BATCH)]
    if float32:
        stages.append(wds.map(_to_float32))
    # persistent workers, like ours: every timed epoch measures streaming, not process start-up
    return DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=WORKERS,
                      persistent_workers=True)


def _to_float32(batch: tuple) -> tuple:
    latents, text, captions = batch
    return torch.from_numpy(latents).float(), torch.from_numpy(text).float(), captions


def _expand(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(src))


def count_samples(loader: Any) -> int:
    n = 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else int(batch["valid"].sum())
    return n


def raw_read(urls: list[str]) -> int:
    """Bytes of every shard, read whole by one process: the I/O ceiling."""
    fs, _ = storage.filesystem(urls[0])
    return sum(len(fs.cat_file(storage.filesystem(u)[1])) for u in urls)


def measure(prefix: str, samples: int, iters: int, where: str) -> list[dict]:
    index = write_synthetic_dataset(prefix, [50] * (samples // 50), latent_shape=LATENT_SHAPE,
                                    text_shape=TEXT_SHAPE)
    urls = [storage.join(prefix, s["name"]) for s in index["shards"]]
    cfg = DataConfig(dataset=prefix, micro_batch_size=BATCH, num_workers=WORKERS, uneven="drop",
                     shuffle_buffer=64, pin_memory=False)
    ours, plain, plain32 = LatentLoader(cfg, 0, 1), plain_webdataset(urls), plain_webdataset(urls, True)
    n_ours, n_wds = count_samples(ours), count_samples(plain)
    if n_ours != samples or n_wds != samples:
        raise RuntimeError(f"loaders delivered {n_ours} / {n_wds} samples, expected {samples}")
    t_ours, t_wds, t_wds32, t_raw = time_round_robin([
        lambda: count_samples(ours), lambda: count_samples(plain), lambda: count_samples(plain32),
        lambda: raw_read(urls)], iters=iters)
    ours.close()  # the webdataset workers stop when their loaders are collected
    ours_sps, wds_sps, wds32_sps, raw_sps = (samples / t for t in (t_ours, t_wds, t_wds32, t_raw))
    print(f"[{where}] ours {ours_sps:,.0f} samples/s, plain webdataset {wds_sps:,.0f} "
          f"(float32 torch out: {wds32_sps:,.0f}), raw byte reads {raw_sps:,.0f}")
    return [
        row("loader", f"samples_per_s_{where}", ours_sps, "plain webdataset", wds_sps),
        row("loader", f"samples_per_s_{where}_vs_wds_f32", ours_sps, "webdataset + float32 torch", wds32_sps),
        row("loader", f"samples_per_s_{where}_vs_raw", ours_sps, "raw fsspec byte reads", raw_sps),
    ]


def time_round_robin(fns: list[Callable[[], object]], *, iters: int, warmup: int = 1) -> list[float]:
    """Median seconds of each function, called in turn each round so that load from other
    processes on a shared machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for fn, out in zip(fns, times):
            t = _timed(fn)
            if i >= warmup:
                out.append(t)
    return [statistics.median(t) for t in times]


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process on 127.0.0.1; sets the AWS_* environment."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main(samples: int = 800, iters: int = 3) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += measure(os.path.join(tmp, "ds"), samples, iters, "local")
    proc, _ = _start_moto()
    try:
        fs, _ = storage.filesystem("s3://bench")
        fs.mkdir("bench")
        rows += measure("s3://bench/ds", samples, iters, "s3")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    print_table(main(args.samples, args.iters))
