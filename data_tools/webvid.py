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

The order of the returned rows is the CSV order after rejecting, filtering and limiting; the
job assigns rows to shards by this order, which is what makes reruns reproducible.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

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


def _problem(rec: dict[Any, Any], columns: int, video_root: str | None,
             first_line: dict[str, int]) -> str:
    """Why this record cannot be used ("" when it can). A short row that has every required
    column is usable (the missing optional ones read as ""); a long one has shifted fields,
    e.g. a caption with an unquoted comma."""
    if None in rec or any(rec[c] is None for c in REQUIRED_COLUMNS):
        fields = sum(v is not None for k, v in rec.items() if k is not None) + len(rec.get(None) or [])
        return f"has {fields} fields, the header has {columns}"
    videoid = rec["videoid"].strip()
    if not videoid:
        return "has an empty videoid"
    if videoid in first_line:
        return f"repeats videoid {videoid} (first on line {first_line[videoid]})"
    if not video_root and not rec["contentUrl"].strip():
        return "has an empty contentUrl (and preprocess.video_root is not set)"
    return ""


def read_rows(csv_url: str, *, video_root: str | None = None,
              path_template: str = "{page_dir}/{videoid}{ext}", min_duration: float | None = None,
              max_duration: float | None = None, limit: int | None = None,
              strict: bool = False) -> CSVRows:
    """Read, validate, filter and limit a WebVid CSV (local path or fsspec URL).

    A row with the wrong number of fields, an empty or repeated `videoid` (the first
    occurrence is kept) or, without `video_root`, an empty `contentUrl` is rejected with its
    line number; `strict` raises `CSVFormatError` on the first one instead. Raises
    `CSVFormatError` naming the file and the column when a required column is missing, and
    `FileNotFoundError` naming the file when there is no CSV.
    """
    try:
        raw = storage.read_bytes(csv_url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"WebVid CSV not found: {csv_url}") from e
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    _check_header(reader.fieldnames, csv_url)
    columns = list(reader.fieldnames or [])
    extra_cols = [c for c in columns if c not in REQUIRED_COLUMNS]
    rows: list[VideoRow] = []
    rejected: list[RejectedRow] = []
    first_line: dict[str, int] = {}
    while limit is None or len(rows) < limit:
        after = reader.line_num
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field past csv.field_size_limit(); the reader goes on
            line, rec, why = after + 1, {}, f"is not a readable CSV record ({e})"
        else:
            line, why = reader.line_num, _problem(rec, len(columns), video_root, first_line)
        if why:
            if strict:
                raise CSVFormatError(f"{csv_url}: line {line} {why}")
            rejected.append(RejectedRow(line=line, videoid=(rec.get("videoid") or "").strip(), reason=why))
            continue
        rec = {k: v or "" for k, v in rec.items()}  # optional columns a short row lacks read as ""
        videoid = rec["videoid"].strip()
        first_line[videoid] = line
        duration = parse_duration(rec["duration"])
        if not _keep(duration, min_duration, max_duration):
            continue
        rows.append(VideoRow(
            videoid=videoid, url=resolve_url(rec, video_root, path_template),
            caption=rec["name"], duration=duration, page_dir=rec["page_dir"],
            extra=json.dumps({c: rec[c] for c in extra_cols}, sort_keys=True),
        ))
    return CSVRows(rows=rows, rejected=rejected)
