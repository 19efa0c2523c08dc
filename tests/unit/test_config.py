"""Config loading: strict keys and types, overrides, cross-field checks."""

from pathlib import Path

import pytest

from trip.cli import main as trip_main
from trip.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
TINY = str(CONFIGS / "tiny_cpu.yaml")


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_validate():
    for name in ("tiny_cpu", "base_256"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.model.num_frames == cfg.preprocess.num_frames


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    p = _write(tmp_path, "train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'train.max_stepz'"):
        load_config(p)


def test_wrong_type_names_the_key(tmp_path):
    p = _write(tmp_path, "train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"'train.max_steps' must be an integer, got 'lots'"):
        load_config(p)


def test_literal_fields_list_the_choices(tmp_path):
    p = _write(tmp_path, "model:\n  fusion:\n    mode: mean\n")
    with pytest.raises(ConfigError, match=r"'model.fusion.mode' must be one of \['tnf', 'linear', 'none'\]"):
        load_config(p)


def test_set_overrides_are_parsed_as_yaml_and_applied():
    cfg = load_config(TINY,
                      ["train.max_steps=7", "model.fusion.mode=linear", "run.name=x"])
    assert cfg.train.max_steps == 7 and cfg.model.fusion.mode == "linear" and cfg.run.name == "x"


def test_global_batch_needs_one_sample_per_rank_at_the_largest_world_size():
    with pytest.raises(ConfigError, match=r"global_batch_size=2 is smaller than the largest world size 3"):
        load_config(TINY, ["scaling.min_workers=1", "scaling.max_workers=3", "train.global_batch_size=2"])


def test_any_world_size_trains_the_exact_global_batch():
    # 8 samples per step need not divide by 3 ranks x 4 per micro-batch any more: 3+3+2 in one micro-batch
    cfg = load_config(TINY, ["scaling.min_workers=1", "scaling.max_workers=3"])
    assert [cfg.grad_accum_steps(w) for w in (1, 2, 3)] == [2, 1, 1]
    for w in (1, 2, 3):  # the largest share fits in accum micro-batches of at most micro_batch_size
        assert -(-cfg.train.global_batch_size // w) <= cfg.grad_accum_steps(w) * cfg.data.micro_batch_size


def test_paper_config_is_valid_for_an_elastic_448_to_512_gpu_run():
    cfg = load_config(CONFIGS / "base_256.yaml")
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers) == (448, 512)
    for w in (448, 480, 512):
        share = -(-cfg.train.global_batch_size // w)
        assert share <= cfg.grad_accum_steps(w) * cfg.data.micro_batch_size


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_validate_and_show(capsys, tmp_path):
    assert trip_main(["config", "validate", "-c", TINY]) == 0
    assert "OK" in capsys.readouterr().out
    assert trip_main(["config", "show", "-c", TINY, "--set", "train.seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out
    bad = _write(tmp_path, "nonsense: 1\n")
    assert trip_main(["config", "validate", "-c", str(bad)]) == 2
    assert "unknown key 'nonsense'" in capsys.readouterr().err


def test_cli_takes_the_config_file_positionally_too(capsys, tmp_path):
    assert trip_main(["config", "validate", TINY]) == 0
    assert f"{TINY}: OK" in capsys.readouterr().out
    assert trip_main(["config", "show", TINY, "--set", "train.seed=6"]) == 0
    assert "seed: 6" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        trip_main(["config", "validate"])
    assert e.value.code == 2 and "a run config is required" in capsys.readouterr().err
    other = _write(tmp_path, "train:\n  seed: 1\n")
    with pytest.raises(SystemExit):
        trip_main(["config", "validate", TINY, "-c", str(other)])
    assert "two run configs given" in capsys.readouterr().err


def test_an_int_latent_size_and_resolution_keep_the_config_hash_of_before():
    # hashes of main before non-square sizes existed: runs of these configs resume
    assert load_config(None).hash() == "984da136f59ed54a"
    assert load_config(TINY).hash() == "4a44985a788d2864"
    assert load_config(CONFIGS / "base_256.yaml").hash() == "e6be22c3f853423d"
    pair = load_config(TINY, ["model.latent_size=[4, 4]", "preprocess.resolution=[32, 32]"])
    assert pair.model.latent_size == 4 and pair.preprocess.resolution == 32 and pair.hash() == "4a44985a788d2864"


def test_latent_size_and_resolution_take_a_height_width_pair(tmp_path):
    from trip.config import dump_config

    cfg = load_config(TINY, ["model.latent_size=[4, 6]", "preprocess.resolution=[32, 48]"])
    assert cfg.model.latent_size == (4, 6) and cfg.model.latent_hw == (4, 6) and cfg.preprocess.resolution == (32, 48)
    assert cfg.hash() != load_config(TINY).hash()
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg and again.hash() == cfg.hash()


@pytest.mark.parametrize("overrides, match", [
    (["model.latent_size=[4, 6]"], r"preprocess.resolution=32 must equal model.latent_size \* codec.downscale = \[32, 48\]"),
    (["model.latent_size=[4, 6, 2]"], r"'model.latent_size' has the wrong type: \[4, 6, 2\]"),
    (["model.latent_size=[4, 0]"], r"model.latent_size must be >= 1, got \(4, 0\)"),
    (["model.latent_size=[4, 5]", "preprocess.resolution=[32, 40]"],
     r"model.latent_size=\[4, 5\]: 5 is not divisible by 2\^\(number of UNet levels - 1\) = 2"),
])
def test_bad_sizes_name_the_key_and_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, overrides)
