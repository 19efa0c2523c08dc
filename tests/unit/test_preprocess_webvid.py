"""WebVid CSV reading: required columns, durations, filters, limits, URL resolution, bad rows."""

from __future__ import annotations

import json

import pytest

from data_tools.synth import write_csv
from data_tools.webvid import (
    CSVFormatError,
    other_extensions,
    parse_duration,
    read_rows,
    video_extension,
)

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
    rows = read_rows(path, min_duration=10, max_duration=25).rows
    assert [r.videoid for r in rows] == ["101", "102", "103", "104"]
    rows = read_rows(path, min_duration=10, limit=2).rows
    assert [r.videoid for r in rows] == ["101", "102"]
    assert rows[0].duration == 10.0


def test_url_from_content_url_or_root_template(tmp_path) -> None:
    path = write_csv(str(tmp_path / "r.csv"), _rows(2), columns=COLUMNS)
    assert read_rows(path).rows[1].url == "https://videos.example/101.mp4"
    rows = read_rows(path, video_root="s3://bucket/webvid/").rows
    assert rows[1].url == "s3://bucket/webvid/dir1/101.mp4"
    rows = read_rows(path, video_root="/data", path_template="{videoid}-{license}.mp4").rows
    assert rows[0].url == "/data/100-cc.mp4"
    with pytest.raises(CSVFormatError, match="nosuch"):
        read_rows(path, video_root="/data", path_template="{nosuch}.mp4")


def test_extra_columns_and_caption_kept(tmp_path) -> None:
    path = write_csv(str(tmp_path / "r.csv"), _rows(1), columns=COLUMNS)
    row = read_rows(path).rows[0]
    assert row.caption == "caption 0"
    assert json.loads(row.extra) == {"license": "cc"}


def test_bad_rows_are_reported_with_line_and_reason_and_the_rest_kept(tmp_path) -> None:
    rows = _rows(6)
    rows[2]["videoid"] = rows[0]["videoid"]  # line 4 repeats line 2's id
    rows[3]["videoid"] = " "  # line 5: no id
    path = tmp_path / "r.csv"
    write_csv(str(path), rows, columns=COLUMNS)
    lines = path.read_text().splitlines()
    lines[6] = lines[6].replace("caption 5", "caption, with a comma")  # line 7: one field too many
    lines.append("107,https://videos.example/107.mp4,PT00H00M05S")  # line 8: no page_dir, name, license
    path.write_text("\n".join(lines) + "\n")

    found = read_rows(str(path))
    assert [r.videoid for r in found.rows] == ["100", "101", "104"]
    assert [(r.line, r.videoid, r.reason) for r in found.rejected] == [
        (4, "100", "repeats videoid 100 (first on line 2)"),
        (5, "", "has an empty videoid"),
        (7, "105", "has 7 fields, the header has 6"),
        (8, "107", "has 3 fields, the header has 6"),
    ]
    assert [r.videoid for r in read_rows(str(path), limit=3).rows] == ["100", "101", "104"]


def test_strict_mode_fails_on_the_first_bad_row(tmp_path) -> None:
    rows = _rows(3)
    rows[2]["videoid"] = rows[0]["videoid"]
    path = write_csv(str(tmp_path / "r.csv"), rows, columns=COLUMNS)
    with pytest.raises(CSVFormatError, match="line 4 repeats videoid 100") as info:
        read_rows(path, strict=True)
    assert path in str(info.value)


def test_a_short_row_with_every_required_column_is_kept(tmp_path) -> None:
    path = tmp_path / "r.csv"
    write_csv(str(path), _rows(1), columns=COLUMNS)
    path.write_text(path.read_text() + "101,https://videos.example/101.mp4,PT00H00M05S,dir1,a caption\n")
    found = read_rows(str(path))
    assert [r.videoid for r in found.rows] == ["100", "101"] and found.rejected == []
    assert json.loads(found.rows[1].extra) == {"license": ""}


def test_empty_content_url_is_rejected_only_without_a_video_root(tmp_path) -> None:
    rows = _rows(2)
    rows[1]["contentUrl"] = ""
    path = write_csv(str(tmp_path / "r.csv"), rows, columns=COLUMNS)
    assert [(r.line, r.reason) for r in read_rows(path).rejected] == [
        (3, "has an empty contentUrl (and preprocess.video_root is not set)")]
    assert read_rows(path, video_root="/data").rows[1].url == "/data/dir1/101.mp4"


def test_ext_in_the_template_is_the_content_urls_video_extension(tmp_path) -> None:
    rows = _rows(4)
    rows[1]["contentUrl"] = "https://videos.example/101.WebM?sig=abc"
    rows[2]["contentUrl"] = "https://videos.example/watch?v=102"
    rows[3]["contentUrl"] = "https://videos.example/v1.2/103"
    path = write_csv(str(tmp_path / "r.csv"), rows, columns=COLUMNS)
    urls = [r.url for r in read_rows(path, video_root="/data").rows]  # the default template
    assert urls == ["/data/dir0/100.mp4", "/data/dir1/101.WebM", "/data/dir0/102.mp4", "/data/dir1/103.mp4"]
    assert video_extension("s3://b/x.mkv") == ".mkv" and video_extension("") == ".mp4"


def test_other_extensions_swap_only_a_video_extension() -> None:
    assert other_extensions("s3://b/d/1.webm") == ["s3://b/d/1.mp4", "s3://b/d/1.mkv", "s3://b/d/1.mov",
                                                   "s3://b/d/1.avi", "s3://b/d/1.m4v"]
    assert other_extensions("/v/1.WEBM")[:2] == ["/v/1.mp4", "/v/1.webm"]
    assert other_extensions("/v.1/clip") == [] and other_extensions("/v/clip.txt") == []


_PLAN_IN_A_CHILD = """
import json, sys
from data_tools import webvid

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports do not count
before = status("VmRSS")
if sys.argv[2] == "plan":
    plan = webvid.scan_csv(sys.argv[1])
    found = {"rows": len(plan), "rejected": [r.line for r in plan.rejected], "shards": plan.num_shards(64)}
else:
    rows = webvid.read_rows(sys.argv[1]).rows
    found = {"rows": len(rows)}
print(json.dumps({**found, "kb": status("VmHWM") - before}))
"""


def test_a_100k_row_csv_is_planned_in_a_few_mb(tmp_path) -> None:
    """The driver holds ~25 bytes a record (offsets, line, hash, status), not the rows: 100k
    rows (12 MB of CSV) must plan within 25 MB of peak memory above what the process held
    before, well under what the same rows take as Python objects. Every 1000th record
    repeats an earlier videoid."""
    import subprocess
    import sys

    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for i in range(100_000):
            vid = 10_000_000 + (i - 500 if i % 1000 == 999 else i)
            f.write(f"{vid},https://videos.example/{vid}.mp4,PT00H00M{i % 50 + 5:02d}S,"
                    f"{i // 1000:06d}_dir,\"a caption of about sixty characters, number {i}\",cc\n")
    def child(how: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _PLAN_IN_A_CHILD, str(path), how], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)

    plan, objects = child("plan"), child("rows")
    assert plan["rows"] == objects["rows"] == 99_900
    assert len(plan["rejected"]) == 100 and plan["shards"] == 1561
    assert plan["rejected"][0] == 1001  # record 999 is on line 1001 (after the header)
    assert plan["kb"] < 25 * 1024, plan
    assert objects["kb"] > 2 * plan["kb"], (plan, objects)  # the bound is one the rows would break
