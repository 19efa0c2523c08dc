"""`trip preprocess` fails fast, naming the problem, before any Ray resource is used."""

from __future__ import annotations

import pytest
import yaml

from data_tools.synth import write_csv
from trip.cli import main as trip_main


def _config(tmp_path, csv_path: str, **pre) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"num_frames": 4, "latent_channels": 12, "latent_size": 8},
        "preprocess": {"csv": csv_path, "output": str(tmp_path / "out"), "num_frames": 4,
                       "resolution": 16, **pre},
    }))
    return str(path)


def test_csv_missing_a_column_names_it_and_starts_nothing(tmp_path, capsys: pytest.CaptureFixture) -> None:
    import ray

    csv_path = write_csv(str(tmp_path / "results.csv"),
                         [{"videoid": "1", "contentUrl": "a.mp4", "duration": "PT5S", "page_dir": "d"}],
                         columns=["videoid", "contentUrl", "duration", "page_dir"])
    assert trip_main(["preprocess", "--config", _config(tmp_path, csv_path)]) == 2
    err = capsys.readouterr().err
    assert "missing required column(s) name" in err and csv_path in err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_bad_config_and_missing_csv_are_clear(tmp_path, capsys: pytest.CaptureFixture) -> None:
    missing = str(tmp_path / "nowhere.csv")
    assert trip_main(["preprocess", "--config", _config(tmp_path, missing)]) == 2
    assert "WebVid CSV not found" in capsys.readouterr().err
    assert trip_main(["preprocess", "--config", _config(tmp_path, missing),
                      "--set", "preprocess.resolution=20"]) == 2
    assert "preprocess.resolution=20" in capsys.readouterr().err


def test_strict_csv_fails_on_a_repeated_videoid_and_starts_nothing(tmp_path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    import ray

    row = {"videoid": "1", "contentUrl": "a.mp4", "duration": "PT5S", "page_dir": "d", "name": "a"}
    csv_path = write_csv(str(tmp_path / "results.csv"), [row, {**row, "name": "b"}],
                         columns=list(row))
    assert trip_main(["preprocess", "--config", _config(tmp_path, csv_path, strict_csv=True)]) == 2
    err = capsys.readouterr().err
    assert f"{csv_path}: line 3 repeats videoid 1" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()
