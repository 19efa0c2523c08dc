"""WebVid-format CSV rows -> the list of videos a preprocessing job will work on.

WebVid's metadata is one CSV with `videoid, contentUrl, duration, page_dir, name`
(`name` is the caption; `duration` is ISO-8601 such as `PT00H00M21S`). Copies in object
storage usually keep the videos under a root as `{page_dir}/{videoid}.mp4`, so a row's
video URL is either its `contentUrl` or `video_root` + a path template.

The order of the returned rows is the CSV order after filtering and limiting; the job
assigns rows to shards by this order, which is what makes reruns reproducible.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass

from trip import storage

REQUIRED_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
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


def resolve_url(row: dict[str, str], video_root: str | None, path_template: str) -> str:
    """The row's video location: `contentUrl`, or `video_root/path_template` when a root is set."""
    if not video_root:
        return row["contentUrl"]
    try:
        rel = path_template.format(**row)
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


def read_rows(csv_url: str, *, video_root: str | None = None,
              path_template: str = "{page_dir}/{videoid}.mp4", min_duration: float | None = None,
              max_duration: float | None = None, limit: int | None = None) -> list[VideoRow]:
    """Read, validate, filter and limit a WebVid CSV (local path or fsspec URL).

    Raises `CSVFormatError` naming the file and the column when a required column is
    missing, and `FileNotFoundError` naming the file when there is no CSV.
    """
    try:
        raw = storage.read_bytes(csv_url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"WebVid CSV not found: {csv_url}") from e
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    _check_header(reader.fieldnames, csv_url)
    extra_cols = [c for c in reader.fieldnames or [] if c not in REQUIRED_COLUMNS]
    rows: list[VideoRow] = []
    seen: set[str] = set()
    for line, rec in enumerate(reader, start=2):
        videoid = (rec.get("videoid") or "").strip()
        if not videoid:
            raise CSVFormatError(f"{csv_url}: line {line} has an empty videoid")
        if videoid in seen:
            raise CSVFormatError(f"{csv_url}: line {line} repeats videoid {videoid}")
        seen.add(videoid)
        duration = parse_duration(rec.get("duration") or "")
        if not _keep(duration, min_duration, max_duration):
            continue
        rec = {k: (v if v is not None else "") for k, v in rec.items() if k is not None}
        rows.append(VideoRow(
            videoid=videoid, url=resolve_url(rec, video_root, path_template),
            caption=rec["name"], duration=duration, page_dir=rec["page_dir"],
            extra=json.dumps({c: rec.get(c, "") for c in extra_cols}, sort_keys=True),
        ))
        if limit is not None and len(rows) >= limit:
            break
    return rows
