"""The streaming latent loader: exactly-once delivery across restarts and world-size changes.

Plain webdataset splits *shards* between ranks and workers and keeps no position, so a
job restarted at another size repeats or skips data, and uneven shards give ranks
different batch counts (a collective hang). This loader splits *samples* instead, by a
rule that can be recomputed anywhere.

Design
------
1. Global order. For epoch e the samples are ordered by `plan.EpochOrder`: shards
   permuted by (seed, e), consecutive shards grouped until a group holds
   `shuffle_buffer` samples, each group's samples permuted by (seed, e, group). The
   order depends on the dataset's index.json, seed, epoch and shuffle_buffer only,
   never on world size or worker count. A sample's place in it is its *position*;
   every batch carries its slots' `positions` and `epoch`, so per-sample randomness
   derived from (seed, epoch, position) is the same at any world size.
2. State. What has been delivered is a set of positions of the current epoch, kept as
   sorted [start, stop) ranges (`plan.Intervals`, numpy arrays), plus the epoch, seed,
   shuffle_buffer and a fingerprint of the shard list. A position is recorded in the
   main process when its batch is handed to the training step (not when a DataLoader
   worker produced it, so prefetched batches are never counted); padding is never recorded.
3. Rounds. At the start of a pass the not-yet-delivered positions are numbered 0..R-1
   ("remaining index"). They are dealt in rounds of G = `round_size` samples (default
   W x micro_batch_size; e.g. the global batch of one optimizer step): rank r of W takes
   G // W of each round (+1 for r < G % W) in `micro_batches_per_round` micro-batches of
   at most micro_batch_size, the same count on every rank (`plan.Split`). Rank r owns
   one contiguous run of remaining indices holding its share of every round.
     - uneven="drop": only whole rounds are dealt; the fewer than G samples at the end
       of the epoch's order are not delivered in this epoch (they are different samples
       every epoch since the order is reshuffled);
     - uneven="pad": all R are dealt; the last round's samples are spread evenly over
       the ranks and its other slots hold repeats of the rank's own samples whose
       `valid` entry is False, so the step can mask them.
4. Units. A rank's rounds are cut into contiguous runs, one per DataLoader worker (at
   least two: a single reader alternates between two), and each unit reads its run in
   order, so a worker reads one region of the order and every shard is fetched about
   once per epoch. A DataLoader item is one whole round, so any `micro_batches_per_round`
   consecutive micro-batches from the start of a pass are one round: a step of that many
   holds exactly G samples across ranks (the padding of a padded pass sits in the
   round each rank delivers last). A resume leaves the remaining positions in pieces
   (fragments); `plan.RankPlan` keeps their number bounded by ranks x units over any
   number of resumes: unit boundaries snap to fragment starts and each unit starts
   reading at the first fragment start it holds (rotation), so interrupted progress
   eats fragments from their heads instead of cutting new holes. Snapping may leave a
   rank fewer units than workers in a pass; it then runs that many workers.
5. Checkpoint. Each rank knows only its own deliveries, so a checkpoint stores
   `LatentLoader.merge_states(states)` of every rank's state taken at the same step.
   The cheap way: rank 0's full `state_dict()` plus every other rank's
   `state_dict(own_only=True)` (only what that rank delivered since its loader was
   built, so the gathered bytes do not grow with the restored set); full states from
   every rank work too. The merge is one sort of all ranges. A loader at any (rank, world
   size, round size, worker count) built from the merged state recomputes the same
   order, removes the delivered positions and deals the rest: every remaining sample of
   the epoch is delivered exactly once, then the next epoch starts with the config's
   seed and shuffle_buffer (the resumed epoch keeps the ones it started with).

6. Buckets. A dataset preprocessed into several shapes (index.json "buckets", see
   `trip.data.shards`) is read bucket by bucket: each bucket has its own order (an
   `EpochOrder` over its shards, salted by the bucket) and its positions sit in one
   range of the global position space, so the state, `merge_states` and every guarantee
   above are unchanged. Each bucket is dealt by its own `Split`: its micro-batch size B_b
   (`data.bucket_batch`: the same for all, or "tokens": micro_batch_size is the largest
   bucket's and smaller clips take more so latent elements per micro-batch stay about
   equal; `data.bucket_batch_sizes` per bucket) and its round G_b = G x B_b / B; all
   buckets share `micro_batches_per_round`, so DeepSpeed's accumulation count is fixed
   and a step on bucket b trains on exactly G_b samples at any world size. A pass is a
   schedule of rounds (`plan.bucket_schedule`): a random order of every bucket's rounds,
   so buckets are drawn in proportion to what they have left (`data.bucket_weights`
   moves a bucket's rounds earlier). The schedule depends on (seed, epoch, rounds left)
   only and each rank delivers it in order (`plan.BucketPlan`), so at every step all
   ranks train on the same bucket. With data.uneven="drop" a bucket's tail of fewer than
   G_b samples waits for a later epoch's order, and a bucket smaller than one round is
   never delivered (a warning names it at start); with "pad" its last round is padded.
   A batch carries `bucket` (its name; "all" for a dataset without buckets) and
   `round_size` (G_b). Memory: a unit holds one shuffle group per bucket it is reading.

Passes and epochs: `for batch in loader` yields this rank's remaining batches of the
current epoch and stops; the epoch then advances and iterating again runs the next one.
Leaving the loop early keeps the position, so iterating again continues the same epoch.

Faults: shards are fetched whole with retries and backoff (`data.retries`); a shard
still unreachable after them stops the pass with an OSError naming it. A sample outside
the shard contract (`trip.data.shards.decode_sample`, the check `data_tools validate`
makes: a member missing or unreadable, wrong shape or dtype, NaN or inf) or cut off by a
truncated tar, or a shard that is missing or not a valid tar, is logged with shard
and key (`#<ordinal>` for a sample the tar walk never reached), counted
(`corrupt_samples`, for `trip_data_corrupt_samples_total`) and delivered as an all-zero
slot with `valid=False`. When a rank's corrupt count in a pass
exceeds `max_corrupt_fraction` of the samples dealt to it, `CorruptDataError` names the
shards. The count is per rank: a whole bad shard weighs on the one rank that reads it.

Speed: shards are read whole in one GET (on S3 a presigned GET into one buffer, see
`trip.data.shards.ShardFetcher`), decoding is zero-copy, batches are collated in the workers
straight into one shared-memory float32 buffer, so only ready batches cross the
process boundary, and each worker fetches its next shards on background threads while
it collates. A unit holds at most one shuffle group's shards plus two read ahead.
Workers persist from one epoch to the next when a pass ran to its end (`close()` stops
them). `wait_seconds` is the time the training step spent blocked on the loader.

Batch (b slots, b <= micro_batch_size; b == micro_batch_size for the default round
size, else it may differ between ranks and micro-batches): latents float32
[b, F, C, h, w]; image_latents float32 [b, C, h, w] (frame `image_frame`); text_states
float32 [b, L, D] when the shards have text and `data.text`; valid bool [b]; positions
int64 [b] (padding repeats a real sample's position); epoch int; captions list[str];
keys list[str]; bucket str; round_size int. Shapes are the batch's bucket's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trip import storage
from trip.config import DataConfig
from trip.data.plan import (
    BucketPlan,
    EpochOrder,
    Intervals,
    RankPlan,
    Split,
    bucket_schedule,
    units_per_rank,
)
from trip.data.shards import (
    BadSample,
    ShardFetcher,
    dataset_buckets,
    decode_sample,
    read_index,
    read_samples,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
_LOOKAHEAD = 2  # shards fetched ahead of the one being collated, per worker


class CorruptDataError(RuntimeError):
    """More corrupt samples than `data.max_corrupt_fraction` allows; names the shards."""


# --------------------------------------------------------------------------- worker side


@dataclass
class _Part:
    """One bucket of a pass: its shards, where its positions sit, what is left of it."""

    name: str
    shards: list[int]  # global shard numbers (index order)
    shard_sizes: list[int]
    offset: int  # the bucket's position p is offset + p in the loader state
    latent_shape: tuple[int, ...]
    salt: tuple[int, ...]  # EpochOrder salt: buckets are shuffled independently
    remaining: list[list[int]]  # the bucket's own positions not yet delivered this epoch
    split: Split


@dataclass
class _Pass:
    """Everything a worker needs to produce its batches of one pass (cheap to fork/pickle)."""

    urls: list[str]
    names: list[str]
    parts: list[_Part]
    seed: int
    epoch: int
    shuffle_buffer: int
    rank: int
    units: int  # units this rank's pass is cut into (plan.BucketPlan)
    weights: list[float] | None  # bucket draw weights (plan.bucket_schedule)
    text_shape: tuple[int, ...] | None
    image_frame: int
    retries: int

    @property
    def num_batches(self) -> int:
        return sum(p.split.num_batches for p in self.parts)

    @property
    def dealt(self) -> int:
        """Samples dealt to this rank in the pass."""
        return sum(p.split.stop(self.rank) - p.split.start(self.rank) for p in self.parts)


def _plan(job: _Pass) -> BucketPlan:
    schedule = bucket_schedule([p.split.num_rounds for p in job.parts], seed=job.seed, epoch=job.epoch,
                               weights=job.weights if len(job.parts) > 1 else None)
    return BucketPlan([Intervals(p.remaining) for p in job.parts], [p.split for p in job.parts],
                      job.rank, job.units, schedule)


@dataclass
class _Shard:
    samples: list[dict[str, Any]]
    error: str | None


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a worker so the hand-off copies nothing."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if get_worker_info() is None or nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def _fresh_epoch(job: _Pass, epochs_later: int, seed: int, shuffle_buffer: int) -> _Pass:
    """The job of a whole epoch `epochs_later` epochs after `job`'s (nothing delivered yet)."""
    parts = []
    for p in job.parts:
        n = sum(p.shard_sizes)
        parts.append(dataclasses.replace(p, remaining=[[0, n]] if n else [],
                                         split=dataclasses.replace(p.split, remaining=n)))
    return dataclasses.replace(job, epoch=job.epoch + epochs_later, seed=seed, shuffle_buffer=shuffle_buffer,
                               parts=parts)


class _PassStream(IterableDataset):
    """Yields this worker's ready-made rounds of one pass (DataLoader batch_size=None).

    Workers persist across passes: the k-th time a worker iterates this dataset it runs
    the epoch k epochs after the first job's, from its start. The main process reuses the
    workers only when that is exactly the pass it wants (see LatentLoader._open_pass).
    """

    def __init__(self, job: _Pass, seed: int, shuffle_buffer: int) -> None:
        self.job, self.seed, self.shuffle_buffer = job, seed, shuffle_buffer
        self.passes = 0

    def pass_job(self, k: int) -> _Pass:
        return self.job if k == 0 else _fresh_epoch(self.job, k, self.seed, self.shuffle_buffer)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        job = self.pass_job(self.passes)
        self.passes += 1
        return _produce(job, worker, num_workers)


_FETCHERS: dict[tuple[str, str, int, int], ShardFetcher] = {}


def _fetcher(url: str, retries: int) -> ShardFetcher:
    """One fetcher per process and protocol, kept across passes (its S3 client costs a few
    hundred ms to build); keyed by pid so a forked worker never uses its parent's."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    key = (protocol, str(storage.storage_options(url)), retries, os.getpid())
    if key not in _FETCHERS:
        _FETCHERS[key] = ShardFetcher(url, retries=retries)
    return _FETCHERS[key]


def _produce(job: _Pass, worker: int, num_workers: int) -> Iterator[list[dict[str, Any]]]:
    """This worker's rounds (each a list of `accum` micro-batches, one DataLoader item, so
    the step always gets whole rounds): one unit each when there are as many workers as
    busy units, else (a single reader) all units, taking turns round by round as
    DataLoader workers do."""
    plan = _plan(job)
    units = [u for u in range(plan.units) if plan.unit_items(u).size][worker::num_workers]
    if not units:
        return
    orders = [EpochOrder(p.shard_sizes, seed=job.seed, epoch=job.epoch, shuffle_buffer=job.shuffle_buffer,
                         salt=p.salt) for p in job.parts]
    fetcher = _fetcher(job.urls[0], job.retries)
    streams = [_unit_rounds(job, plan, u, orders, fetcher) for u in units]
    while streams:
        for stream in list(streams):
            rounds = next(stream, None)
            if rounds:
                yield rounds
            else:
                streams.remove(stream)


def _unit_rounds(job: _Pass, plan: BucketPlan, unit: int, orders: list[EpochOrder],
                 fetcher: ShardFetcher) -> Iterator[list[dict[str, Any]]]:
    """One unit's rounds (lists of `accum` micro-batches) in its order: the bucket of each
    from the schedule, its samples from the unit's own run of that bucket."""
    streams: dict[int, Iterator[dict[str, Any]]] = {}
    try:
        for b in plan.unit_items(unit).tolist():
            if b not in streams:
                streams[b] = _unit_batches(job, b, plan.plans[b], unit, orders[b], fetcher)
            yield list(itertools.islice(streams[b], plan.accum))
    finally:
        for stream in streams.values():
            stream.close()  # type: ignore[attr-defined]  # stops its fetch threads


def _unit_batches(job: _Pass, bucket: int, plan: RankPlan, unit: int, order: EpochOrder,
                  fetcher: ShardFetcher) -> Iterator[dict[str, Any]]:
    """One unit's micro-batches of one bucket in its delivery order (`plan`: the bucket's
    `RankPlan`), shards fetched ahead on threads."""
    part = job.parts[bucket]
    idx, valid = plan.slots(unit)
    local = plan.remaining.at(idx)
    shard, ordinal = order.locate(local)
    shard = np.asarray(part.shards, dtype=np.int64)[shard]  # the bucket's shard i -> the index's
    positions = local + part.offset
    sizes = plan.batch_sizes(unit)
    cuts = np.concatenate(([0], np.cumsum(sizes))).tolist()
    needed = list(dict.fromkeys(shard.tolist()))  # in order of first use
    rank_of = {s: i for i, s in enumerate(needed)}
    last_use = dict(zip(shard.tolist(), np.repeat(np.arange(sizes.size), sizes).tolist()))
    loaded: dict[int, Future[_Shard]] = {}
    submitted = 0
    expected = dict(zip(part.shards, part.shard_sizes))

    def load(s: int) -> _Shard:
        url = job.urls[s]
        try:
            buf = fetcher.fetch(url)
        except FileNotFoundError:
            return _Shard([], f"{url}: shard listed in index.json is missing")
        samples, error = read_samples(buf, url)
        if len(samples) > expected[s]:
            log.warning("%s holds %d samples, index.json says %d: the extra ones are never read",
                        url, len(samples), expected[s])
        return _Shard(samples, error)

    with ThreadPoolExecutor(max_workers=max(1, _LOOKAHEAD)) as pool:
        for j in range(sizes.size):
            rows = slice(cuts[j], cuts[j + 1])
            row_shards = list(dict.fromkeys(shard[rows].tolist()))
            upto = max((rank_of[s] for s in row_shards), default=-1) + _LOOKAHEAD
            while submitted < min(upto + 1, len(needed)):
                loaded[needed[submitted]] = pool.submit(load, needed[submitted])
                submitted += 1
            slots = [(loaded[s].result(), s, o) for s, o in zip(shard[rows].tolist(), ordinal[rows].tolist())]
            yield _collate(job, bucket, slots, positions[rows], valid[rows])
            for s in row_shards:
                if last_use[s] == j:
                    del loaded[s]


def _identity(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batches  # batches are collated in the worker already; skip DataLoader's default_convert


def _layout(job: _Pass, bucket: int, bsz: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the float32 tensors packed, in order, into one batch buffer."""
    shape = job.parts[bucket].latent_shape
    parts = [("latents", (bsz, *shape)), ("image_latents", (bsz, *shape[1:]))]
    if job.text_shape:
        parts.append(("text_states", (bsz, *job.text_shape)))
    return parts


def _views(buffer: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = buffer[offset:offset + n].view(shape)
        offset += n
    return out


def _collate(job: _Pass, bucket: int, rows: list[tuple[_Shard, int, int]], positions: np.ndarray,
             valid: np.ndarray) -> dict[str, Any]:
    """One batch of one bucket decoded straight into a single float32 buffer (shared memory
    in a worker, so crossing to the main process passes one file descriptor and copies nothing)."""
    layout = _layout(job, bucket, len(rows))
    shape = job.parts[bucket].latent_shape
    buffer = _shared_empty((sum(math.prod(shape) for _, shape in layout),), torch.float32)
    views = _views(buffer, layout)
    latents, text = views["latents"], views.get("text_states")
    ok = valid.tolist()
    keys, captions, corrupt = [], [], []
    with warnings.catch_warnings():  # views of shard bytes are read-only; they are only read
        warnings.simplefilter("ignore", UserWarning)
        for i, (sh, s, o) in enumerate(rows):
            sample = sh.samples[o] if o < len(sh.samples) else None
            key = sample["__key__"] if sample else f"#{o}"
            try:
                if sample is None:
                    raise ValueError(sh.error or "sample missing from shard")
                captions.append(_fill(job, shape, sample, latents[i], None if text is None else text[i]))
            except ValueError as e:
                latents[i].zero_()
                if text is not None:
                    text[i].zero_()
                captions.append("")
                ok[i] = False
                if valid[i]:  # padding repeats a sample already reported
                    corrupt.append((job.names[s], key, e.why if isinstance(e, BadSample) else str(e)))
            keys.append(key)
    views["image_latents"].copy_(latents[:, job.image_frame])
    return {"_buffer": buffer, "valid": ok, "captions": captions, "keys": keys, "positions": positions.copy(),
            "_positions": positions[valid].tolist(), "_corrupt": corrupt, "_bucket": bucket}


def _cast_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """dst[...] = src with the float16 -> float32 cast done in the same copy.

    In a worker (torch runs one thread there) torch's vectorised cast is ~4x numpy's; in
    the main process torch would fan small copies out to intra-op threads that compete
    with training, so numpy's single-threaded cast is used instead.
    """
    if get_worker_info() is not None:
        dst.copy_(torch.from_numpy(src))
    else:
        dst.numpy()[...] = src


def _fill(job: _Pass, latent_shape: tuple[int, ...], sample: dict[str, Any], latents: torch.Tensor,
          text: torch.Tensor | None) -> str:
    """Decode one sample into its slots; returns its caption. Raises BadSample on anything
    outside the contract (the very check `data_tools validate` makes)."""
    decoded = decode_sample(sample, sample["__url__"], latent_shape=latent_shape, text_shape=job.text_shape)
    if text is not None and decoded.text is not None:  # decode_sample requires it when text is set
        _cast_into(text, decoded.text)
    _cast_into(latents, decoded.latents)
    return decoded.caption


# --------------------------------------------------------------------------- main side


def _fingerprint(index: dict[str, Any]) -> str:
    entries = [[s["name"], int(s["samples"])] for s in index["shards"]]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


class LatentLoader:
    """Exactly-once streaming loader over a latent dataset for one rank (see module docstring).

    `for batch in loader` yields this rank's remaining micro-batches of the current epoch;
    `round_size` is the number of samples per round across all ranks (None: world_size x
    micro_batch_size); `state_dict()` describes what this rank delivered; `merge_states`
    joins all ranks'.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, state: dict[str, Any] | None = None,
                 device: torch.device | None = None, round_size: int | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if not cfg.dataset:
            raise ValueError("data.dataset is empty: set it to the dataset prefix holding index.json")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.round_size = round_size
        self._units = units_per_rank(cfg.num_workers)
        self.index = storage.retry(lambda: read_index(cfg.dataset), attempts=cfg.retries + 1,
                                   what=f"reading {storage.join(cfg.dataset, 'index.json')}",
                                   retry_on=(OSError,))
        self._names = [s["name"] for s in self.index["shards"]]
        self._sizes = [int(s["samples"]) for s in self.index["shards"]]
        self._urls = [storage.join(cfg.dataset, n) for n in self._names]
        self.num_samples = sum(self._sizes)
        self.buckets = dataset_buckets(self.index, storage.join(cfg.dataset, "index.json"))
        self._offsets = np.concatenate(([0], np.cumsum([b.samples for b in self.buckets]))).tolist()
        text_shape = self.index.get("text_shape")
        self._text_shape = tuple(int(x) for x in text_shape) if cfg.text and text_shape else None
        frames = min(b.latent_shape[0] for b in self.buckets)
        if not 0 <= cfg.image_frame < frames:
            raise ValueError(f"data.image_frame={cfg.image_frame} is outside the {frames} frames of "
                             f"{cfg.dataset}{' (its shortest bucket)' if len(self.buckets) > 1 else ''}")
        names = [b.name for b in self.buckets]
        for key in ("bucket_batch_sizes", "bucket_weights"):
            unknown = sorted(set(getattr(cfg, key)) - set(names))
            if unknown:
                raise ValueError(f"data.{key} names {unknown}, which are not buckets of {cfg.dataset} {names}")
        self._batch_sizes = self._bucket_batch_sizes()
        self._dataset_id = _fingerprint(self.index)
        # every bucket's rounds take as many micro-batches as the configured batch needs
        self.micro_batches_per_round = Split(remaining=self.num_samples, world_size=world_size,
                                             batch_size=cfg.micro_batch_size, pad=False, round_size=round_size).accum
        self._round_sizes = [self._round_size(b) for b in range(len(self.buckets))]
        whole = self._splits([b.samples for b in self.buckets])
        self.batches_per_epoch = sum(sp.num_batches for sp in whole)
        if self.batches_per_epoch == 0:
            what = "world_size x micro_batch_size" if round_size is None else "round_size"
            raise ValueError(
                f"{cfg.dataset} has {self.num_samples} samples, fewer than {what} = {whole[0].per_round}"
                f"{' in every bucket' if len(whole) > 1 else ''}: no rank would get a batch "
                f"(use data.uneven='pad' or a smaller batch)")
        for b, sp in zip(self.buckets, whole):
            if sp.num_rounds == 0 and b.samples and rank == 0:  # (an empty bucket is just empty)
                log.warning("bucket %s has %d samples, fewer than one round of %d: with data.uneven=drop it is "
                            "never delivered (use data.uneven=pad to deliver it in padded rounds)",
                            b.name, b.samples, sp.per_round)
        self.wait_seconds = 0.0  # time the consumer spent blocked on this loader
        self.corrupt_samples = 0  # corrupt samples met (all passes), for the metrics module
        self.delivered_samples = 0  # valid samples handed to the training step (all passes)
        self.bucket_samples: Counter[str] = Counter()  # valid samples delivered, by bucket (all passes)
        self.bucket_slots: Counter[str] = Counter()  # slots delivered (padding and corrupt included), by bucket
        self._exhausted = False
        self._token: object | None = None
        self._workers: dict[str, Any] | None = None  # live DataLoader, see _open_pass
        self._restore(state)

    # ------------------------------------------------------------------ state
    def _restore(self, state: dict[str, Any] | None) -> None:
        self.epoch, self._seed, self._buffer = 0, self.cfg.seed, self.cfg.shuffle_buffer
        self._consumed = Intervals()
        self._own = Intervals()  # delivered by this loader in its current epoch (own_only states)
        self._restored_epoch = 0
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("own_only"):
            raise ValueError("this loader state holds one rank's own deliveries only; resume from "
                             "LatentLoader.merge_states([a full state, own_only states...])")
        if state.get("dataset") != self._dataset_id or state.get("num_samples") != self.num_samples:
            raise ValueError(
                f"loader state belongs to another dataset (fingerprint {state.get('dataset')}, "
                f"{state.get('num_samples')} samples) than {self.cfg.dataset} ({self._dataset_id}, "
                f"{self.num_samples} samples): resuming would not be exactly-once")
        consumed = Intervals(state["consumed"])
        if consumed.num_ranges and consumed.ends[-1] > self.num_samples:
            raise ValueError("loader state has positions beyond the dataset's sample count")
        self.epoch, self._seed, self._buffer = int(state["epoch"]), int(state["seed"]), int(state["shuffle_buffer"])
        self._consumed = consumed
        self._restored_epoch = self.epoch
        self._exhausted = bool(state.get("exhausted", False))

    def state_dict(self, own_only: bool = False) -> dict[str, Any]:
        """What has been delivered to the training step (JSON-serialisable, small).

        Full (default): every position of the current epoch delivered before the restore
        or since, by this rank. own_only=True: only what this loader delivered since it was
        built (in its current epoch), marked so together with the epoch it was restored
        at; cheap to gather from every rank, and `merge_states` completes it with one full
        state.
        """
        state = {
            "version": STATE_VERSION,
            "dataset": self._dataset_id,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "seed": self._seed,
            "shuffle_buffer": self._buffer,
            "consumed": (self._own if own_only else self._consumed).to_list(),
            "exhausted": self._exhausted,
        }
        if own_only:
            state.update(own_only=True, restored_epoch=self._restored_epoch)
        return state

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One global full state from every rank's `state_dict()` taken at the same step.

        The result resumes at any (rank, world size, worker count). Ranks one epoch behind
        are accepted only if they had delivered all their batches of that epoch. The states
        may be full or own_only; the positions delivered before the restore come from the
        full ones, so at least one full state is needed unless every own_only state has
        moved past the epoch it was restored at. O(R log R) in the ranges given.
        """
        if not states:
            raise ValueError("merge_states needs at least one state")
        for key in ("version", "dataset", "num_samples"):
            if len({json.dumps(s.get(key)) for s in states}) != 1:
                raise ValueError(f"loader states disagree on {key!r}: {[s.get(key) for s in states]}")
        top = max(int(s["epoch"]) for s in states)
        current = [s for s in states if int(s["epoch"]) == top]
        for i, s in enumerate(states):
            if int(s["epoch"]) < top and (int(s["epoch"]) != top - 1 or not s.get("exhausted")):
                raise ValueError(f"loader state {i} is at epoch {s['epoch']} with undelivered batches "
                                 f"while another rank is at epoch {top}: states were not taken at the same step")
        for key in ("seed", "shuffle_buffer"):
            if len({s[key] for s in current}) != 1:
                raise ValueError(f"loader states of epoch {top} disagree on {key!r}")
        # an own_only state lacks what was delivered before its restore, unless its epoch began after it
        if not any(not s.get("own_only") or int(s["epoch"]) > int(s["restored_epoch"]) for s in current):
            raise ValueError(
                f"the {len(current)} loader states of epoch {top} are all own_only states of the epoch they "
                f"were restored at: their union misses the positions delivered before the restore; pass one "
                f"full state_dict() (e.g. rank 0's) with them")
        consumed = Intervals.union_all(Intervals(s["consumed"]) for s in current)
        merged = {k: v for k, v in current[0].items() if k not in ("own_only", "restored_epoch")}
        merged.update(consumed=consumed.to_list(), exhausted=all(bool(s.get("exhausted")) for s in current))
        return merged

    # ------------------------------------------------------------------ passes
    def _bucket_batch_sizes(self) -> list[int]:
        """Each bucket's micro-batch size (data.bucket_batch, data.bucket_batch_sizes)."""
        base = self.cfg.micro_batch_size
        elements = [math.prod(b.latent_shape) for b in self.buckets]
        if self.cfg.bucket_batch == "tokens":
            sizes = [max(1, base * max(elements) // e) for e in elements]
        else:
            sizes = [base] * len(self.buckets)
        return [self.cfg.bucket_batch_sizes.get(b.name, n) for b, n in zip(self.buckets, sizes)]

    def _round_size(self, b: int) -> int | None:
        """Bucket b's round size: the configured one scaled by its micro-batch size, so a step
        on a bucket of smaller clips trains on more of them (None: world_size x its batch)."""
        size = self._batch_sizes[b]
        if size == self.cfg.micro_batch_size:
            return self.round_size
        if self.round_size is None:
            return self.world_size * size
        scaled = round(self.round_size * size / self.cfg.micro_batch_size)
        if scaled < self.world_size:
            raise ValueError(f"bucket {self.buckets[b].name}: micro-batch size {size} makes its rounds "
                             f"{scaled} samples, fewer than the {self.world_size} ranks")
        return scaled

    def _splits(self, remaining: list[int]) -> list[Split]:
        """Each bucket's split of its `remaining` samples; buckets share the micro-batches per round."""
        forced = self.micro_batches_per_round if len(self.buckets) > 1 else None
        return [Split(remaining=n, world_size=self.world_size, batch_size=self._batch_sizes[b],
                      pad=self.cfg.uneven == "pad", round_size=self._round_sizes[b], micro_batches=forced)
                for b, n in enumerate(remaining)]

    def _bucket_remaining(self, b: int) -> Intervals:
        """Bucket b's positions (its own numbering) not delivered yet this epoch."""
        lo, hi = self._offsets[b], self._offsets[b + 1]
        return self._consumed.window(lo, hi).complement(hi - lo)

    def _advance_epoch(self) -> None:
        self.epoch += 1
        self._seed, self._buffer = self.cfg.seed, self.cfg.shuffle_buffer
        self._consumed = Intervals()
        self._own = Intervals()
        self._exhausted = False

    def _current_pass(self) -> _Pass:
        """This rank's job for what is left of the epoch; skips over an epoch with nothing left."""
        while True:
            remaining = [self._bucket_remaining(b) for b in range(len(self.buckets))]
            splits = self._splits([len(r) for r in remaining])
            if sum(sp.num_batches for sp in splits) > 0 or self._consumed.num_ranges == 0:
                break
            self._advance_epoch()
        parts = [_Part(name=b.name, shards=list(b.shards), shard_sizes=[self._sizes[i] for i in b.shards],
                       offset=self._offsets[i], latent_shape=b.latent_shape,
                       salt=() if len(self.buckets) == 1 else (i + 1,), remaining=r.to_list(), split=sp)
                 for i, (b, r, sp) in enumerate(zip(self.buckets, remaining, splits))]
        weights = [float(self.cfg.bucket_weights.get(b.name, 1.0)) for b in self.buckets]
        return _Pass(urls=self._urls, names=self._names, parts=parts, seed=self._seed, epoch=self.epoch,
                     shuffle_buffer=self._buffer, rank=self.rank, units=self._units, weights=weights,
                     text_shape=self._text_shape, image_frame=self.cfg.image_frame, retries=self.cfg.retries)

    def __len__(self) -> int:
        """Batches the next (or current) pass yields on this rank."""
        return self._current_pass().num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        job = self._current_pass()
        # a worker per unit that has batches; snapping may leave fewer units than workers
        plan = _plan(job)
        busy = sum(1 for u in range(plan.units) if plan.unit_items(u).size)
        token = self._token = object()  # a newer pass makes this one stop
        return self._run(job, min(self.cfg.num_workers, busy), token)

    def _open_pass(self, job: _Pass, workers: int) -> Iterator[dict[str, Any]]:
        """An iterator over `job`'s batches: the live workers when their next pass is exactly
        `job` (the previous pass ran to its end and this one starts the following epoch),
        else fresh workers (first pass, resumed or interrupted epoch, other worker count)."""
        live = self._workers
        if live is not None and live["complete"] and live["num_workers"] == workers:
            stream: _PassStream = live["stream"]
            if stream.pass_job(live["passes"]) == job:
                live.update(passes=live["passes"] + 1, complete=False)
                return iter(live["dataloader"])
        self.close()
        pin = self.cfg.pin_memory and torch.cuda.is_available() and (
            self.device is None or self.device.type == "cuda")
        stream = _PassStream(job, self.cfg.seed, self.cfg.shuffle_buffer)
        prefetch = -(-self.cfg.prefetch_factor // self.micro_batches_per_round)  # items are rounds: keep the memory bound
        dataloader = DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=workers,
                                pin_memory=pin, persistent_workers=workers > 0,
                                prefetch_factor=prefetch if workers else None)
        it = iter(dataloader)
        self._workers = {"dataloader": dataloader, "iterator": it, "stream": stream, "passes": 1,
                         "num_workers": workers, "complete": False}
        return it

    def close(self) -> None:
        """Stop the DataLoader workers now (they also stop when the loader is collected)."""
        if self._workers is not None:
            getattr(self._workers["iterator"], "_shutdown_workers", lambda: None)()
            self._workers = None

    def _run(self, job: _Pass, workers: int, token: object) -> Iterator[dict[str, Any]]:
        total, dealt = job.num_batches, job.dealt
        budget = self.cfg.max_corrupt_fraction * dealt
        bad_shards: Counter[str] = Counter()
        self._exhausted = False
        it = self._open_pass(job, workers)
        pending: list[dict[str, Any]] = []  # the rest of the round being handed out
        done = False
        try:
            for n in range(total):
                if self._token is not token:  # a newer pass took over
                    return
                if not pending:
                    t0 = time.perf_counter()
                    pending = next(it, None) or []
                    self.wait_seconds += time.perf_counter() - t0
                if not pending:
                    raise RuntimeError(f"loader pass ended after {n} of {total} batches")
                batch = pending.pop(0)
                for shard, key, why in batch.pop("_corrupt"):
                    log.warning("corrupt sample skipped: shard %s key %s: %s", shard, key, why)
                    bad_shards[shard] += 1
                    self.corrupt_samples += 1
                if sum(bad_shards.values()) > budget:
                    raise CorruptDataError(
                        f"{sum(bad_shards.values())} corrupt samples on rank {self.rank} exceed "
                        f"data.max_corrupt_fraction={self.cfg.max_corrupt_fraction} of the "
                        f"{dealt} samples dealt to it; "
                        f"shards: {dict(bad_shards)}")
                delivered = batch.pop("_positions")
                self._consumed.add(delivered)
                self._own.add(delivered)
                b = batch.pop("_bucket")
                part = job.parts[b]
                batch = self._unpack(batch, _layout(job, b, len(batch["valid"])))
                batch.update(epoch=job.epoch, bucket=part.name, round_size=part.split.per_round)
                valid = int(batch["valid"].sum())
                self.delivered_samples += valid
                self.bucket_samples[part.name] += valid
                self.bucket_slots[part.name] += len(batch["valid"])
                self._exhausted = n == total - 1
                yield self._to_device(batch)
            done = True
        finally:
            del it
            if self._token is token:
                if done and self._workers is not None:
                    self._workers["complete"] = True  # the workers may serve the next epoch
                else:  # left early or failed: the workers are mid-pass, stop them now
                    self.close()
        if self._token is token:
            self._advance_epoch()

    @staticmethod
    def _unpack(raw: dict[str, Any], layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
        batch: dict[str, Any] = _views(raw.pop("_buffer"), layout)
        batch["valid"] = torch.tensor(raw.pop("valid"), dtype=torch.bool)
        batch["positions"] = torch.from_numpy(raw.pop("positions"))
        batch.update(raw)
        return batch

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device is None or self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
