"""Downloading a video over HTTP(S): timeouts, retries with backoff, a size cap, a per-host cap.

Without `preprocess.video_root` a WebVid row's video is its `contentUrl`, an HTTP URL on
someone else's server. A few million downloads meet every transient failure there is (503s,
429s, connections reset mid-body, servers that stall) and a few permanent ones (404, 403,
a 2 GB file). fsspec's HTTP filesystem has one timeout and no retry policy we could state,
so this module speaks HTTP itself (the standard library's `http.client`) and says exactly
what it does:

- a connect timeout, a read timeout (the longest wait for the next bytes) and an overall
  deadline for one video, all tries and waits included (waiting for a host slot excluded);
- up to `tries` tries; retried: 5xx, 408, 429, connection resets, refused connections and
  timeouts, after an exponential backoff with jitter (`Retry-After` honoured up to the
  backoff's ceiling); never retried: other 4xx, a body over `max_bytes`, the deadline;
- at most `per_host` downloads from one host at once across the whole Ray cluster
  (`cluster_slots`: a small named actor leasing slots; a lease that its holder never gives
  back, a worker killed mid-download, expires after the overall deadline);
- `FetchError(kind, reason, tries)`: `kind` is one of `KINDS` (a bounded metrics label),
  `reason` is what goes into the errors manifest, e.g. "HTTP 404 Not Found after 1 try".

Signed URLs carry credentials in their query string (and some URLs in their userinfo):
everything this module logs or raises names the URL through `redact_url`, and so must
anything a caller writes to a manifest or a sample.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

from trip.config import PreprocessConfig

MB = 1024**2
KINDS = ("http_4xx", "http_5xx", "http_429", "reset", "timeout", "connect", "tls", "too_large",
         "redirect", "bad_url")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


def redact_url(url: str) -> str:
    """`url` without userinfo, query string and fragment (plain paths are returned as they are)."""
    if "://" not in str(url):
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@dataclass(frozen=True)
class FetchPolicy:
    """How one video is downloaded (see the module docstring)."""

    connect_timeout_s: float = 10.0  # to open the connection (TCP + TLS)
    read_timeout_s: float = 30.0  # longest wait for the next bytes of a response
    timeout_s: float = 300.0  # one video, all tries and backoffs included
    tries: int = 4  # 1: no retry
    backoff_s: float = 1.0  # wait before the first retry; doubles each retry ...
    backoff_max_s: float = 30.0  # ... up to this
    max_bytes: int = 512 * MB  # a larger body fails the video (too_large)
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.read_timeout_s, self.timeout_s) <= 0:
            raise ValueError("fetch timeouts must be > 0")
        if self.tries < 1 or self.max_bytes < 1 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError("fetch tries and max_bytes must be >= 1, backoffs >= 0")

    def backoff(self, retry: int) -> float:
        """Seconds before retry number `retry` (1, 2, ...): the exponential step, scaled by a
        random factor in [0.5, 1] so that tasks that failed together do not retry together."""
        step = min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1))
        return step * random.uniform(0.5, 1.0)

    @property
    def lease_s(self) -> float:
        """How long a host slot stays taken by a holder that never gives it back."""
        return self.timeout_s + self.connect_timeout_s + 30.0


def fetch_policy(pre: PreprocessConfig) -> FetchPolicy:
    """The policy of the `preprocess` section's fetch_* settings."""
    return FetchPolicy(connect_timeout_s=pre.fetch_connect_timeout_s, read_timeout_s=pre.fetch_read_timeout_s,
                       timeout_s=pre.fetch_timeout_s, tries=pre.fetch_tries, backoff_s=pre.fetch_backoff_s,
                       max_bytes=int(pre.fetch_max_mb * MB))


class FetchError(Exception):
    """A video that could not be downloaded. `kind`: one of KINDS; `reason`: human readable,
    with the (redacted) URL; `tries`: how many were made; `status`: the last HTTP status."""

    def __init__(self, kind: str, reason: str, tries: int, status: int | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.tries, self.status = kind, reason, tries, status


class _TryFailed(Exception):
    """One try's failure: its kind, what happened in words, and whether another try may help."""

    def __init__(self, kind: str, what: str, retry: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(what)
        self.kind, self.what, self.retry, self.status, self.retry_after = kind, what, retry, status, retry_after


# --------------------------------------------------------------------------- host slots


class HostSlots(Protocol):
    """At most N downloads at once per host: `acquire(host)` blocks until a slot is free and
    returns its token, `release(token)` gives it back."""

    def acquire(self, host: str, lease_s: float) -> str | None: ...

    def release(self, token: str | None) -> None: ...


class NoSlots:
    """No cap (fetch_max_per_host: 0, or code that downloads one video at a time)."""

    def acquire(self, host: str, lease_s: float) -> str | None:
        return None

    def release(self, token: str | None) -> None:
        pass


class _Leases:
    """The bookkeeping of host slots: host -> {token: expiry}; expired leases are free."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError(f"per_host must be >= 1, got {per_host}")
        self.per_host = per_host
        self.held: dict[str, dict[str, float]] = {}
        self.peak: dict[str, int] = {}  # most slots of a host held at once (for tests and logs)

    def try_take(self, host: str, lease_s: float, now: float) -> str | None:
        mine = self.held.setdefault(host, {})
        for token in [t for t, until in mine.items() if until <= now]:
            del mine[token]
        if len(mine) >= self.per_host:
            return None
        token = f"{host} {uuid.uuid4().hex}"
        mine[token] = now + lease_s
        self.peak[host] = max(self.peak.get(host, 0), len(mine))
        return token

    def give_back(self, token: str) -> None:
        self.held.get(token.rpartition(" ")[0], {}).pop(token, None)

    def next_expiry(self, host: str) -> float | None:
        return min(self.held.get(host, {}).values(), default=None)


class LocalSlots:
    """Host slots shared by the threads of one process."""

    def __init__(self, per_host: int) -> None:
        self._leases = _Leases(per_host)
        self._cond = threading.Condition()

    def acquire(self, host: str, lease_s: float) -> str | None:
        with self._cond:
            while (token := self._leases.try_take(host, lease_s, time.monotonic())) is None:
                expiry = self._leases.next_expiry(host)
                self._cond.wait(None if expiry is None else max(0.01, expiry - time.monotonic()))
            return token

    def release(self, token: str | None) -> None:
        if token is not None:
            with self._cond:
                self._leases.give_back(token)
                self._cond.notify_all()

    def peak(self, host: str) -> int:
        return self._leases.peak.get(host, 0)


class SlotsActor:
    """The cluster's host slots, in one async Ray actor: a waiting `acquire` costs a coroutine."""

    def __init__(self, per_host: int) -> None:
        self._leases = _Leases(per_host)
        self._cond = asyncio.Condition()

    async def acquire(self, host: str, lease_s: float) -> str:
        async with self._cond:
            while (token := self._leases.try_take(host, lease_s, time.monotonic())) is None:
                expiry = self._leases.next_expiry(host)
                wait = None if expiry is None else max(0.01, expiry - time.monotonic())
                try:
                    await asyncio.wait_for(self._cond.wait(), wait)
                except TimeoutError:
                    pass
            return token

    async def release(self, token: str) -> None:
        async with self._cond:
            self._leases.give_back(token)
            self._cond.notify_all()

    async def peak(self, host: str) -> int:
        return self._leases.peak.get(host, 0)


@dataclass
class RaySlots:
    """`HostSlots` through the cluster's `SlotsActor` (picklable: it is sent with shard tasks)."""

    actor: Any

    def acquire(self, host: str, lease_s: float) -> str | None:
        import ray

        return ray.get(self.actor.acquire.remote(host, lease_s))

    def release(self, token: str | None) -> None:
        if token is not None:
            import ray

            ray.get(self.actor.release.remote(token))


def cluster_slots(per_host: int) -> HostSlots:
    """The Ray cluster's host slots for a cap of `per_host` (0: no cap): the named actor of this
    namespace for that cap, created by the first caller (it lives as long as that driver)."""
    if per_host <= 0:
        return NoSlots()
    import ray

    actor = ray.remote(SlotsActor).options(name=f"trip-fetch-host-slots-{per_host}", get_if_exists=True,
                                           num_cpus=0, max_concurrency=4096).remote(per_host)
    return RaySlots(actor)


# --------------------------------------------------------------------------- fetching


def _plural(n: int) -> str:
    return f"{n} {'try' if n == 1 else 'tries'}"


def _status_failure(resp: http.client.HTTPResponse) -> _TryFailed:
    status = resp.status
    what = f"HTTP {status} {resp.reason}".rstrip()
    retry_after = None
    header = resp.getheader("Retry-After")
    if header and header.strip().isdigit():
        retry_after = float(header.strip())
    if status == 429:
        return _TryFailed("http_429", what, True, status, retry_after)
    if status >= 500:
        return _TryFailed("http_5xx", what, True, status, retry_after)
    return _TryFailed("http_4xx", what, status == 408, status, retry_after)


def _remaining(deadline: float, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _TryFailed("timeout", f"timed out (over {policy.timeout_s:g} s for the video)", False)
    return left


def _read_body(resp: http.client.HTTPResponse, sock: Any, policy: FetchPolicy, deadline: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise _TryFailed("too_large", f"{int(length) / MB:.1f} MB is over the {policy.max_bytes / MB:g} MB limit",
                         False)
    chunks, size = [], 0
    while True:
        sock.settimeout(min(policy.read_timeout_s, _remaining(deadline, policy)))
        chunk = resp.read1(_CHUNK)  # one socket read: the deadline is checked between reads
        if not chunk:
            if length and length.isdigit() and size < int(length):
                # read1 reports a peer that closed early as the end of the body, not IncompleteRead
                raise _TryFailed("reset", f"connection closed after {size} of {length} bytes", True)
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise _TryFailed("too_large", f"over the {policy.max_bytes / MB:g} MB limit", False)
        chunks.append(chunk)


def _try_once(url: str, policy: FetchPolicy, deadline: float) -> bytes:
    """One try: GET `url` (following redirects) -> the body, or `_TryFailed`."""
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port,
                   timeout=min(policy.connect_timeout_s, _remaining(deadline, policy)))
        try:
            try:
                conn.connect()
            except TimeoutError as e:
                raise _TryFailed("timeout", f"connect timed out ({policy.connect_timeout_s:g} s)", True) from e
            except ssl.SSLCertVerificationError as e:
                raise _TryFailed("tls", f"TLS certificate not accepted ({e.verify_message})", False) from e
            except OSError as e:
                raise _TryFailed("connect", f"cannot connect ({e.strerror or e})", True) from e
            sock = conn.sock  # the response takes it from the connection when the server will close
            sock.settimeout(min(policy.read_timeout_s, _remaining(deadline, policy)))
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "trip-preprocess", "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status >= 300:
                raise _status_failure(resp)
            return _read_body(resp, sock, policy, deadline)
        except _TryFailed:
            raise
        except TimeoutError as e:
            _remaining(deadline, policy)  # the socket waited out the video's deadline, not the read timeout
            raise _TryFailed("timeout", f"read timed out ({policy.read_timeout_s:g} s without data)", True) from e
        except (ConnectionError, http.client.IncompleteRead) as e:
            # a reset, a peer that closed mid-body, a broken pipe while sending the request
            raise _TryFailed("reset", "connection reset", True) from e
        except (http.client.HTTPException, OSError) as e:
            raise _TryFailed("reset", f"connection failed ({type(e).__name__}: {e})", True) from e
        finally:
            conn.close()
    raise _TryFailed("redirect", f"more than {policy.max_redirects} redirects", False)


@dataclass
class Fetcher:
    """Downloads videos under one policy and host slots, counting what it did in `stats`
    (tries, retries, bytes, failures by kind) for the job driver's metrics."""

    policy: FetchPolicy = field(default_factory=FetchPolicy)
    slots: HostSlots = field(default_factory=NoSlots)
    stats: dict[str, Any] = field(default_factory=lambda: {"tries": 0, "retries": 0, "bytes": 0,
                                                            "failures": {}})

    def __call__(self, url: str) -> bytes:
        """The body at `url`; raises `FetchError` once it has given up."""
        try:
            data = self._fetch(url)
        except FetchError as e:
            self.stats["failures"][e.kind] = self.stats["failures"].get(e.kind, 0) + 1
            raise
        self.stats["bytes"] += len(data)
        return data

    def _fetch(self, url: str) -> bytes:
        shown, policy = redact_url(url), self.policy
        host = urlsplit(url).hostname if is_http(url) else None
        if not host:
            raise FetchError("bad_url", f"not an http(s) URL: {shown}", 0)
        deadline = time.monotonic() + policy.timeout_s
        tries = 0
        while True:
            waited = time.monotonic()
            token = self.slots.acquire(host, policy.lease_s)
            deadline += time.monotonic() - waited  # queueing for a slot is not the server's time
            tries += 1
            self.stats["tries"] += 1
            try:
                return _try_once(url, policy, deadline)
            except _TryFailed as e:
                failed = e
            finally:
                self.slots.release(token)
            if not failed.retry or tries >= policy.tries:
                break
            wait = policy.backoff(tries)
            if failed.retry_after is not None:
                wait = max(wait, min(failed.retry_after, policy.backoff_max_s))
            if time.monotonic() + wait >= deadline:
                failed.what += f", then out of time ({policy.timeout_s:g} s for the video)"
                break
            self.stats["retries"] += 1
            time.sleep(wait)
        raise FetchError(failed.kind, f"{failed.what} after {_plural(tries)}: {shown}", tries, failed.status)
