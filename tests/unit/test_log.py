"""trip.log: one rank-aware logger, quiet dependencies unless debug, nothing of ours lost."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest


def run(code: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: logging and warning filters are process-wide state."""
    import os

    base = {k: v for k, v in os.environ.items() if k != "TRIP_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)


def test_rank_zero_shows_info_other_ranks_only_warnings():
    code = """
        from trip.log import get_logger, setup
        import sys
        setup(rank=int(sys.argv[1]) if len(sys.argv) > 1 else None)
        log = get_logger("trip.train.loop")
        log.info("step 1/2")
        log.warning("shard x is short")
        log.debug("details")
    """
    both = ["[trip] step 1/2", "[trip] warning: shard x is short"]
    for argv in ((), ("0",)):  # the driver, rank 0
        p = run(code, *argv)
        assert p.returncode == 0, p.stderr
        assert p.stderr.splitlines() == both, p.stderr
    assert run(code, "3").stderr.splitlines() == ["[trip rank 3] warning: shard x is short"]
    p = run(code, "3", TRIP_LOG_LEVEL="debug")
    assert p.stderr.splitlines() == ["[trip rank 3] step 1/2", "[trip rank 3] warning: shard x is short",
                                     "[trip rank 3] details"], p.stderr


def test_dependency_deprecations_are_held_back_unless_debug_and_ours_still_show():
    code = """
        import warnings, logging, types, sys
        from trip.log import setup
        setup()
        dep = types.ModuleType("torch.distributed.fake")
        exec("import warnings\\ndef f():\\n    warnings.warn('old api', FutureWarning)", dep.__dict__)
        dep.__dict__["__name__"] = "torch.distributed.fake"
        dep.f()
        warnings.warn("ours is deprecated", FutureWarning)
        logging.getLogger("ray.train").info("Requesting resources")
        logging.getLogger("ray.train").warning("a real ray warning")
    """
    p = run(code)
    assert p.returncode == 0, p.stderr
    assert "old api" not in p.stderr and "Requesting resources" not in p.stderr, p.stderr
    assert "ours is deprecated" in p.stderr and "a real ray warning" in p.stderr, p.stderr
    p = run(code, TRIP_LOG_LEVEL="debug")
    assert "old api" in p.stderr, p.stderr


def test_prints_to_debug_turns_a_dependency_print_into_a_debug_line():
    code = """
        from trip.log import prints_to_debug, setup
        setup()
        with prints_to_debug("trip.train.loop"):
            print("DeepSpeed op built successfully")
            print("to a file is kept", file=__import__("sys").stderr)
        print("after the block")
    """
    p = run(code)
    assert p.stdout.splitlines() == ["after the block"], p.stdout
    assert p.stderr.splitlines() == ["to a file is kept"], p.stderr
    p = run(code, TRIP_LOG_LEVEL="debug")
    assert "DeepSpeed op built successfully" in p.stdout + p.stderr


def test_a_bad_level_is_named():
    from trip.log import level

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIP_LOG_LEVEL", "loud")
        with pytest.raises(ValueError, match="TRIP_LOG_LEVEL='loud'"):
            level()
        mp.setenv("TRIP_LOG_LEVEL", "WARNING")
        assert level() == logging.WARNING


def test_verbose_flag_of_the_job_commands(monkeypatch):
    import argparse

    from trip.cli import add_config_args, build_parser, parse_args

    monkeypatch.delenv("TRIP_LOG_LEVEL", raising=False)
    ap = argparse.ArgumentParser()
    add_config_args(ap)
    args = parse_args(ap, ["c.yaml"])
    assert not getattr(args, "verbose", False)
    args = parse_args(build_parser(), ["train", "c.yaml", "--verbose"])
    assert args.verbose
    import os

    assert os.environ["TRIP_LOG_LEVEL"] == "debug"  # passed on to the Ray workers
    monkeypatch.delenv("TRIP_LOG_LEVEL")
    from trip.log import setup

    setup()
