"""WebVid CSV reading: required columns, durations, filters, limits, URL resolution."""

from __future__ import annotations

import json

import pytest

from data_tools.synth import write_csv
from data_tools.webvid import CSVFormatError, parse_duration, read_rows

COLUMNS = ["videoid", "contentUrl", "duration", "page_dir", "name", "license"]


def _rows(n: int) -> list[dict[str, str]]:
    return [{"videoid": str(100 + i), "contentUrl": f"https://videos.example/{100 + i}.mp4",
             "duration": f"PT00H00M{5 * (i + 1):02d}S", "page_dir": f"dir{i % 2}",
             "name": f"caption {i}", "license": "cc"} for i in range(n)]


def test_parse_duration_iso_and_plain() -> None:
    assert parse_duration("PT00H00M21S") == 21.0
    assert parse_duration("PT1H2M3.5S") == 3723.5
    assert parse_duration("12.5") == 12.5
    assert parse_duration("") is None
    assert parse_duration("soon") is None


def test_missing_column_is_named_with_the_file(tmp_path) -> None:
    path = write_csv(str(tmp_path / "results.csv"), _rows(2),
                     columns=["videoid", "contentUrl", "duration", "name"])
    with pytest.raises(CSVFormatError, match="page_dir") as info:
        read_rows(path)
    assert path in str(info.value)


def test_missing_csv_names_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_rows(str(tmp_path / "nope.csv"))


def test_filters_limit_and_order(tmp_path) -> None:
    path = write_csv(str(tmp_path / "r.csv"), _rows(6), columns=COLUMNS)  # 5, 10, ..., 30 s
    rows = read_rows(path, min_duration=10, max_duration=25)
    assert [r.videoid for r in rows] == ["101", "102", "103", "104"]
    rows = read_rows(path, min_duration=10, limit=2)
    assert [r.videoid for r in rows] == ["101", "102"]
    assert rows[0].duration == 10.0


def test_url_from_content_url_or_root_template(tmp_path) -> None:
    path = write_csv(str(tmp_path / "r.csv"), _rows(2), columns=COLUMNS)
    assert read_rows(path)[1].url == "https://videos.example/101.mp4"
    rows = read_rows(path, video_root="s3://bucket/webvid/")
    assert rows[1].url == "s3://bucket/webvid/dir1/101.mp4"
    rows = read_rows(path, video_root="/data", path_template="{videoid}-{license}.mp4")
    assert rows[0].url == "/data/100-cc.mp4"
    with pytest.raises(CSVFormatError, match="nosuch"):
        read_rows(path, video_root="/data", path_template="{nosuch}.mp4")


def test_extra_columns_and_caption_kept(tmp_path) -> None:
    path = write_csv(str(tmp_path / "r.csv"), _rows(1), columns=COLUMNS)
    row = read_rows(path)[0]
    assert row.caption == "caption 0"
    assert json.loads(row.extra) == {"license": "cc"}


def test_duplicate_videoid_is_an_error(tmp_path) -> None:
    rows = _rows(2)
    rows[1]["videoid"] = rows[0]["videoid"]
    path = write_csv(str(tmp_path / "r.csv"), rows, columns=COLUMNS)
    with pytest.raises(CSVFormatError, match="line 3 repeats videoid 100"):
        read_rows(path)
