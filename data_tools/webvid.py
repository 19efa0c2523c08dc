"""WebVid-format CSV rows -> the list of videos a preprocessing job will work on.

WebVid's metadata is one CSV with `videoid, contentUrl, duration, page_dir, name`
(`name` is the caption; `duration` is ISO-8601 such as `PT00H00M21S`). Copies in object
storage usually keep the videos under a root as `{page_dir}/{videoid}.mp4` (or `.webm`, ...),
so a row's video URL is either its `contentUrl` or `video_root` + a path template, whose
`{ext}` is the extension of the row's `contentUrl`. With `{ext}` the decode stage also tries
the other usual video extensions when that file is missing (`other_extensions`): checking
existence there, in the Ray task that opens the file, costs nothing when the first guess is
right and nothing at all in the driver, which reads millions of rows.

A 10.7M-row CSV has a few bad rows (a repeated `videoid`, an empty one, a line with the wrong
number of fields); each is rejected with its line number and reason and the rest are used,
unless `strict`, where the first one fails the job as `CSVFormatError`.

The order of the rows is the CSV order after rejecting, filtering and limiting; the job
assigns rows to shards by this order, which is what makes reruns reproducible.

Reading 10.7M rows without holding them: `scan_csv` streams the CSV once (line by line,
never the whole file) and keeps per record only numbers in numpy arrays (byte offset, line,
a 64-bit hash of the videoid, a status code: ~25 bytes a record, ~270 MB for WebVid-10M
against ~18 GB for the rows as Python objects). Repeated videoids are found afterwards by
sorting the hashes; the few records whose hashes repeat are read again to compare the
actual videoids, so a hash collision never rejects a row. The result, a `CSVPlan`, gives
each shard a byte range of the CSV and the offsets of its rows in it; the task that writes
the shard reads those rows itself (`read_range`). `read_rows` (every row as a `VideoRow`)
is the same scan followed by reading the rows back, for small CSVs and tests.
"""

from __future__ import annotations

import array
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from trip import storage

REQUIRED_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")  # the order they are tried in
DEFAULT_EXTENSION = ".mp4"  # `{ext}` when contentUrl has no video extension
_ISO_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?T?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?"
                           r"(?:(\d+(?:\.\d+)?)S)?$")


class CSVFormatError(ValueError):
    """The CSV cannot be used; the message names the file and the column or line."""


@dataclass(frozen=True, slots=True)
class VideoRow:
    """One usable CSV row: where its video is and what its sample will carry."""

    videoid: str
    url: str  # resolved video location (local path or fsspec URL)
    caption: str
    duration: float | None  # seconds from the CSV (None when missing/unparsable)
    page_dir: str
    extra: str  # JSON object of the CSV's other columns, kept in the sample's json


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A CSV row the job does not use, for the errors manifest."""

    line: int  # line number in the CSV (the header is line 1; a multi-line record: its last line)
    videoid: str  # "" when the row has none
    reason: str  # what is wrong, e.g. "repeats videoid 1001 (first on line 3)"


@dataclass(frozen=True)
class CSVRows:
    """What `read_rows` found: the rows to work on and the rows rejected, both in CSV order."""

    rows: list[VideoRow]
    rejected: list[RejectedRow] = field(default_factory=list)


def parse_duration(text: str) -> float | None:
    """Seconds from WebVid's ISO-8601 durations (`PT00H00M21S`) or a plain number."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    m = _ISO_DURATION.match(text.upper())
    if not m or not any(m.groups()):
        return None
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


def video_extension(content_url: str) -> str:
    """`{ext}` of a row: contentUrl's extension (its case kept) if it is a usual video one,
    else `.mp4`."""
    path = content_url.split("?", 1)[0].split("#", 1)[0]
    dot = path.rfind(".")
    ext = path[dot:] if dot > path.rfind("/") else ""
    return ext if ext.lower() in VIDEO_EXTENSIONS else DEFAULT_EXTENSION


def other_extensions(url: str) -> list[str]:
    """`url` with its video extension replaced by each other usual one, in `VIDEO_EXTENSIONS` order.

    The decode stage tries these when a template with `{ext}` led to a missing file."""
    dot = url.rfind(".")
    ext = url[dot:] if dot > url.rfind("/") else ""
    if ext.lower() not in VIDEO_EXTENSIONS:
        return []
    return [url[:dot] + e for e in VIDEO_EXTENSIONS if e != ext]  # `.WEBM` also tries `.webm`


def resolve_url(row: dict[str, str], video_root: str | None, path_template: str) -> str:
    """The row's video location: `contentUrl`, or `video_root/path_template` when a root is set."""
    if not video_root:
        return row["contentUrl"]
    try:
        rel = path_template.format(**{**row, "ext": video_extension(row["contentUrl"])})
    except KeyError as e:
        raise CSVFormatError(f"preprocess.path_template {path_template!r} names column {e}, "
                             f"which the CSV does not have") from e
    return storage.join(video_root, rel)


def _check_header(fieldnames: list[str] | None, csv_url: str) -> None:
    if not fieldnames:
        raise CSVFormatError(f"{csv_url}: empty CSV (no header line)")
    missing = [c for c in REQUIRED_COLUMNS if c not in fieldnames]
    if missing:
        raise CSVFormatError(f"{csv_url}: missing required column(s) {', '.join(missing)} "
                             f"(header has: {', '.join(fieldnames)})")


def _keep(duration: float | None, min_duration: float | None, max_duration: float | None) -> bool:
    # rows with an unknown duration are kept: the decoder rejects them if they are too short
    if duration is None:
        return True
    if min_duration is not None and duration < min_duration:
        return False
    return not (max_duration is not None and duration > max_duration)


def _problem(fields: list[str], columns: int, required: Sequence[int], video_root: str | None) -> str:
    """`required`: the positions of REQUIRED_COLUMNS in the header, in that order."""
    """Why this record cannot be used, before the repeat check ("" when it can). A short row
    that has every required column is usable (the missing optional ones read as ""); a long
    one has shifted fields, e.g. a caption with an unquoted comma."""
    if len(fields) > columns or any(i >= len(fields) for i in required):
        return f"has {len(fields)} fields, the header has {columns}"
    if not fields[required[0]].strip():
        return "has an empty videoid"
    if not video_root and not fields[required[1]].strip():
        return "has an empty contentUrl (and preprocess.video_root is not set)"
    return ""


class _Lines:
    """Decoded lines of a binary stream for `csv.reader`, with the byte offset reached and a
    running sha256 of the bytes read. A line that is not UTF-8 is decoded with
    surrogateescape and its line number remembered, so its record is rejected, not the file."""

    def __init__(self, fh: IO[bytes], offset: int = 0, digest: Any = None) -> None:
        self.fh, self.pos, self.digest = fh, offset, digest
        self.bad_lines: set[int] = set()
        self.line = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self.fh:
            self.pos += len(raw)
            self.line += 1
            if self.digest is not None:
                self.digest.update(raw)
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                self.bad_lines.add(self.line)
                yield raw.decode("utf-8", errors="surrogateescape")


def _records(lines: _Lines, start_line: int = 0) -> Iterator[tuple[int, int, list[str] | None, str]]:
    """(start offset, last line, fields or None, problem) of each record: `csv.reader` pulls
    lines lazily, so the offset before a record is where the previous one ended. Blank lines
    are skipped; a record `csv` cannot read (e.g. a field past `csv.field_size_limit()`) comes
    with fields None and the reason."""
    reader = csv.reader(lines)
    while True:
        start, first = lines.pos, lines.line + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # the reader goes on with the next line
            yield start, start_line + first, None, f"is not a readable CSV record ({e})"
            continue
        if not fields:
            continue
        line = start_line + lines.line
        if any(n in lines.bad_lines for n in range(first, lines.line + 1)):
            yield start, line, None, "is not valid UTF-8"
            continue
        yield start, line, fields, ""


_OK, _FILTERED, _REJECTED, _REPEATED = 0, 1, 2, 3


@dataclass
class ShardRange:
    """Where one shard's rows are in the CSV: bytes [start, end) hold them, among records
    the shard does not use; `keep` are the byte offsets of its rows' records, in order;
    its rows are ordinals [first, first + len(keep))."""

    shard: int
    first: int
    start: int
    end: int
    keep: np.ndarray  # int64


@dataclass
class CSVPlan:
    """A scanned CSV: which records are rows (by byte offset), and which were rejected."""

    csv_url: str
    columns: list[str]
    offsets: np.ndarray  # int64, start of each row's record, CSV order
    ends: np.ndarray  # int64, end of each row's record
    rejected: list[RejectedRow]
    digest: str  # sha256 of the CSV bytes read (the whole file, or up to the limit)
    records: int  # records read (rows, rejected and filtered)

    def __len__(self) -> int:
        return len(self.offsets)

    def shard(self, shard: int, per_shard: int) -> ShardRange:
        """The byte range and row offsets of shard `shard` when rows go `per_shard` to a shard."""
        lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(self.offsets))
        if not 0 <= lo < hi:
            raise IndexError(f"{self.csv_url}: no shard {shard} ({len(self.offsets)} rows, {per_shard} a shard)")
        return ShardRange(shard=shard, first=lo, start=int(self.offsets[lo]), end=int(self.ends[hi - 1]),
                          keep=self.offsets[lo:hi].copy())

    def num_shards(self, per_shard: int) -> int:
        return -(-len(self.offsets) // per_shard)


def _open(csv_url: str) -> IO[bytes]:
    try:
        return storage.open_file(csv_url, "rb")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"WebVid CSV not found: {csv_url}") from e


def _header(lines: _Lines, csv_url: str) -> list[str]:
    reader = csv.reader(lines)
    try:
        columns = next(reader)
    except StopIteration:
        columns = []
    if columns:
        columns[0] = columns[0].removeprefix("\ufeff")  # a UTF-8 byte-order mark
    _check_header(columns, csv_url)
    return columns


def scan_csv(csv_url: str, *, video_root: str | None = None, min_duration: float | None = None,
             max_duration: float | None = None, limit: int | None = None, strict: bool = False) -> CSVPlan:
    """Stream a WebVid CSV (local path or fsspec URL) once and plan its rows (see the module
    docstring). A row with the wrong number of fields, an empty or repeated `videoid` (the
    first occurrence is kept) or, without `video_root`, an empty `contentUrl` is rejected with
    its line number; `strict` raises `CSVFormatError` on the first one instead. Raises
    `CSVFormatError` naming the file and the column when a required column is missing, and
    `FileNotFoundError` naming the file when there is no CSV. With `limit`, reading stops
    once that many rows are found (rows after it are neither read nor reported)."""
    digest = hashlib.sha256()
    starts, lines_of, hashes = array.array("q"), array.array("q"), array.array("q")
    status = bytearray()
    reasons: dict[int, str] = {}  # record number -> why rejected
    durations_ok = min_duration is not None or max_duration is not None
    seen: set[int] | None = set() if limit is not None else None  # only to stop early
    found = 0
    with _open(csv_url) as fh:
        lines = _Lines(fh, digest=digest)
        columns = _header(lines, csv_url)
        required = [columns.index(c) for c in REQUIRED_COLUMNS]
        for start, line, fields, why in _records(lines):
            if fields is not None and not why:
                why = _problem(fields, len(columns), required, video_root)
            n = len(status)
            starts.append(start)
            lines_of.append(line)
            if why:
                if strict:
                    raise CSVFormatError(f"{csv_url}: line {line} {why}")
                vid = fields[required[0]].strip() if fields and len(fields) > required[0] else ""
                reasons[n] = f"{vid}\0{why}"
                status.append(_REJECTED)
                hashes.append(0)
                continue
            assert fields is not None
            h = hash(fields[required[0]].strip())
            hashes.append(h)
            keep = not durations_ok or _keep(parse_duration(fields[required[2]]), min_duration, max_duration)
            status.append(_OK if keep else _FILTERED)
            if seen is not None:
                if keep and h not in seen:
                    found += 1
                seen.add(h)
                if found >= limit:  # type: ignore[operator]
                    break
        end_of_read = lines.pos
    st = np.frombuffer(bytes(status), dtype=np.uint8).copy()
    off = np.frombuffer(starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
    line_no = np.frombuffer(lines_of, dtype=np.int64) if len(lines_of) else np.zeros(0, np.int64)
    ends = np.append(off[1:], end_of_read)
    _mark_repeats(csv_url, columns, st, off, ends, line_no,
                  np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, np.int64), reasons, strict)
    rows = np.flatnonzero(st == _OK)
    last = len(st) - 1
    if limit is not None and len(rows) >= limit:  # what comes after the limit is not reported
        rows = rows[:limit]
        last = rows[-1] if len(rows) else -1
    rejected = sorted((int(line_no[i]), i) for i in reasons if i <= last)
    return CSVPlan(csv_url=csv_url, columns=columns, offsets=off[rows].copy(), ends=ends[rows].copy(),
                   rejected=[RejectedRow(line=ln, videoid=_videoid_of(reasons[i]), reason=_reason_of(reasons[i]))
                             for ln, i in rejected],
                   digest=digest.hexdigest(), records=len(st))


def _videoid_of(reason: str) -> str:
    return reason.split("\0", 1)[0]


def _reason_of(reason: str) -> str:
    return reason.split("\0", 1)[1]


def _mark_repeats(csv_url: str, columns: list[str], st: np.ndarray, off: np.ndarray, ends: np.ndarray,
                  line_no: np.ndarray, hashes: np.ndarray, reasons: dict[int, str], strict: bool) -> None:
    """Reject every record whose videoid an earlier usable record has (in place).

    Sorting the 64-bit hashes finds the candidates; their videoids are read back from the
    CSV (a few records) and compared, so only real repeats are rejected."""
    usable = np.flatnonzero(st != _REJECTED)
    if len(usable) < 2:
        return
    h = hashes[usable]
    order = np.argsort(h, kind="stable")  # equal hashes keep CSV order
    hs = h[order]
    dup = np.flatnonzero(hs[1:] == hs[:-1])
    if not len(dup):
        return
    candidates = np.unique(np.concatenate([usable[order[dup]], usable[order[dup + 1]]]))
    ids = dict(zip(candidates.tolist(), _read_videoids(csv_url, columns, off[candidates], ends[candidates]),
                   strict=True))
    first: dict[str, int] = {}
    for i in sorted(ids):
        vid = ids[i]
        if vid not in first:
            first[vid] = i
            continue
        why = f"repeats videoid {vid} (first on line {int(line_no[first[vid]])})"
        if strict:
            raise CSVFormatError(f"{csv_url}: line {int(line_no[i])} {why}")
        st[i] = _REPEATED
        reasons[i] = f"{vid}\0{why}"


def _read_videoids(csv_url: str, columns: list[str], starts: np.ndarray, ends: np.ndarray) -> list[str]:
    """The videoids of the records at [starts, ends): ranged reads, 16 at a time (few records:
    only those whose videoid hash another record shares)."""
    col = columns.index("videoid")
    fs, path = storage.filesystem(csv_url)

    def one(span: tuple[int, int]) -> str:
        data = storage.retry(lambda: fs.cat_file(path, start=span[0], end=span[1]), what=f"read of {csv_url}")
        return next(csv.reader(_Lines(io.BytesIO(data))))[col].strip()

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, zip(starts.tolist(), ends.tolist(), strict=True)))


def check_template(csv_url: str, columns: Sequence[str], video_root: str | None, path_template: str) -> None:
    """Raise `CSVFormatError` when `path_template` names a column the CSV does not have (only
    used with a `video_root`); checked once, before any row is read."""
    if not video_root:
        return
    import string

    for _, name, _, _ in string.Formatter().parse(path_template):
        if name is not None and name not in columns and name != "ext":
            raise CSVFormatError(f"preprocess.path_template {path_template!r} names column '{name}', "
                                 f"which the CSV {csv_url} does not have")


def read_range(csv_url: str, columns: list[str], rng: ShardRange, *, video_root: str | None = None,
               path_template: str = "{page_dir}/{videoid}{ext}") -> list[VideoRow]:
    """The rows of one shard, read from its byte range of the CSV (in the task that writes it)."""
    fs, path = storage.filesystem(csv_url)
    data = storage.retry(lambda: fs.cat_file(path, start=rng.start, end=rng.end), what=f"read of {csv_url}")
    want = set(rng.keep.tolist())
    rows: list[VideoRow] = []
    lines = _Lines(io.BytesIO(data), offset=rng.start)
    for start, _line, fields, _why in _records(lines):
        if start in want:
            if fields is None:
                raise CSVFormatError(f"{csv_url}: the record at byte {start} no longer reads as it did "
                                     f"when the job planned it; was the CSV changed during the job?")
            rows.append(_row(dict(zip(columns, fields, strict=False)), columns, video_root, path_template))
    if len(rows) != len(want):
        raise CSVFormatError(f"{csv_url}: bytes {rng.start}-{rng.end} hold {len(rows)} of shard {rng.shard}'s "
                             f"{len(want)} rows; was the CSV changed during the job?")
    return rows


def _row(rec: dict[str, str], columns: list[str], video_root: str | None, path_template: str) -> VideoRow:
    rec = {c: rec.get(c) or "" for c in columns}  # optional columns a short row lacks read as ""
    return VideoRow(videoid=rec["videoid"].strip(), url=resolve_url(rec, video_root, path_template),
                    caption=rec["name"], duration=parse_duration(rec["duration"]), page_dir=rec["page_dir"],
                    extra=json.dumps({c: rec[c] for c in columns if c not in REQUIRED_COLUMNS}, sort_keys=True))


def read_rows(csv_url: str, *, video_root: str | None = None,
              path_template: str = "{page_dir}/{videoid}{ext}", min_duration: float | None = None,
              max_duration: float | None = None, limit: int | None = None,
              strict: bool = False) -> CSVRows:
    """Every usable row of a WebVid CSV as a `VideoRow`, and the rejected ones (`scan_csv`'s
    rules); for CSVs that fit in memory: the job itself never holds all rows."""
    plan = scan_csv(csv_url, video_root=video_root, min_duration=min_duration, max_duration=max_duration,
                    limit=limit, strict=strict)
    check_template(csv_url, plan.columns, video_root, path_template)
    rows: list[VideoRow] = []
    if len(plan):
        rows = read_range(csv_url, plan.columns, plan.shard(0, len(plan)), video_root=video_root,
                          path_template=path_template)
    return CSVRows(rows=rows, rejected=plan.rejected)
