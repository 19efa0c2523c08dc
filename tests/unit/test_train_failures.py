"""Which worker errors end a training run at once, and which ones Ray Train may retry."""

from __future__ import annotations

import json
import pickle

import pytest

from trip.config import ConfigError, PreprocessConfig
from trip.data import CorruptDataError
from trip.train.failures import FatalTrainingError, StopOnFatalError, is_fatal


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the error itself is what the test looks at
        return e
    raise AssertionError("nothing raised")


def _raise(error: BaseException):
    def fn():
        raise error
    return fn


def test_data_config_and_our_own_value_errors_are_fatal() -> None:
    assert is_fatal(_raised(_raise(CorruptDataError("3 corrupt samples on rank 1"))))
    assert is_fatal(_raised(_raise(ConfigError("unknown key"))))
    our_value_error = _raised(lambda: PreprocessConfig(samples_per_shard=0))  # raised in trip.config
    assert isinstance(our_value_error, ValueError) and is_fatal(our_value_error)


def test_transient_and_foreign_errors_are_retried() -> None:
    assert not is_fatal(_raised(_raise(OSError("shard unreachable after 5 attempts"))))
    assert not is_fatal(_raised(_raise(ConnectionResetError("peer reset"))))
    assert not is_fatal(_raised(_raise(RuntimeError("gloo: connection closed by peer"))))
    assert not is_fatal(_raised(lambda: json.loads("{")))  # a dependency's ValueError
    assert not is_fatal(_raised(_raise(TypeError("raised outside our packages"))))


def test_the_fatal_error_names_type_rank_and_text_and_crosses_processes() -> None:
    error = FatalTrainingError.wrap(CorruptDataError("2 corrupt samples on rank 1"), rank=1)
    assert str(error).startswith("CorruptDataError on rank 1: 2 corrupt samples on rank 1 (not retried")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_the_controller_callback_raises_the_first_fatal_error_only() -> None:
    stop = StopOnFatalError()
    stop.after_exception(None, {0: RuntimeError("worker died"), 1: OSError("timeout")})  # retried
    first = FatalTrainingError("CorruptDataError on rank 1: ...")
    with pytest.raises(FatalTrainingError) as info:
        stop.after_exception(None, {2: FatalTrainingError("rank 2"), 0: RuntimeError("x"), 1: first})
    assert info.value is first
