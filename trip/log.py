"""The console: one logger for the library, the pipelines and the CLIs, quiet dependencies.

    from trip.log import get_logger
    log = get_logger(__name__)      # a child of the "trip" logger
    log.info("step %d/%d ...", ...)

Lines read `[trip] ...` on the driver and on rank 0, `[trip rank 3] ...` elsewhere. The
level comes from `TRIP_LOG_LEVEL` (debug, info, warning, error; default info) or the CLIs'
`--verbose` (= debug). Ranks other than 0 show warnings and errors only, unless debug: at
512 ranks one progress line per step is enough.

Unless the level is debug, what dependencies print without telling anything to a user of
this platform is held back where it is raised, in the driver and in every Ray process:
`FutureWarning`/`DeprecationWarning` from torch, DeepSpeed, Ray and diffusers, Ray's INFO
logs (they stay in Ray's session directory, `/tmp/ray/session_latest/logs`), DeepSpeed's
INFO, and three notices listed in `_NOTICES`. Every warning or error of ours and every
warning of Ray's that is not listed there still shows.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

ENV = "TRIP_LOG_LEVEL"
ROOT = "trip"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Loggers of dependencies whose INFO is their internal progress, shown only at debug.
_CHATTY = ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed", "matplotlib", "torch.distributed")
# Warnings that say nothing actionable here, by logger, silenced below debug:
_NOTICES = {
    # "Token authentication is enabled": a notice that a security feature is on
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # Ray Train's placement-group cleaner asks the dashboard's state API about the
    # controller once a second; without a dashboard (our local runs) every ask warns
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # "Progress bars disabled": the preprocessing job shows its own, per video
    "ray.data._internal.progress": logging.ERROR,
}
# Packages whose deprecation notices are for their own developers (e.g. DeepSpeed calling
# torch.distributed.all_gather_into_tensor: 156 lines in a demo), matched as module prefixes.
_QUIET_WARNINGS_FROM = r"(torch|deepspeed|ray|diffusers|transformers|huggingface_hub|accelerate|timm)(\.|$)"


def level() -> int:
    """The level asked for by TRIP_LOG_LEVEL (info when unset)."""
    name = os.environ.get(ENV, "info").strip().lower()
    if name not in _LEVELS:
        raise ValueError(f"{ENV}={name!r}: expected one of {', '.join(_LEVELS)}")
    return _LEVELS[name]


def verbose() -> bool:
    return level() <= logging.DEBUG


def set_verbose(on: bool) -> None:
    """What `--verbose` does: debug here, and in every process started after this one
    (Ray workers get TRIP_LOG_LEVEL through `ray_init_kwargs` and the trainer's env)."""
    if on:
        os.environ[ENV] = "debug"
        setup(rank=_state["rank"])


def get_logger(name: str = ROOT) -> logging.Logger:
    """A logger under "trip" (module names outside the package are nested under it)."""
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{ROOT}.{name}"
    return logging.getLogger(name)


class _Format(logging.Formatter):
    def __init__(self, rank: int | str | None) -> None:
        super().__init__()
        self.prefix = "[trip]" if not rank else f"[trip {rank}]" if isinstance(rank, str) else f"[trip rank {rank}]"

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and not text.lower().startswith(("warning", "error")):
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{self.prefix} {text}"


_state: dict[str, Any] = {"rank": None, "handler": None}


def setup(rank: int | str | None = None) -> logging.Logger:
    """Configure the "trip" logger for this process (idempotent; call again to change the
    rank) and quiet the dependencies; `rank` None is the driver or a CLI, a name (e.g.
    "validation") a helper process that, like ranks > 0, shows warnings only."""
    _state["rank"] = rank
    lvl = level()
    root = logging.getLogger(ROOT)
    if _state["handler"] is None:
        _state["handler"] = logging.StreamHandler(sys.stderr)
        root.addHandler(_state["handler"])
    _state["handler"].setFormatter(_Format(rank))
    # our own handler only: Ray configures the root logger in its processes
    root.propagate = False
    root.setLevel(lvl if not rank or lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    quiet_dependencies(lvl)
    return root


def quiet_dependencies(lvl: int | None = None) -> None:
    """Hold back dependencies' deprecation warnings and INFO logs in this process, unless debug."""
    if (level() if lvl is None else lvl) <= logging.DEBUG:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_QUIET_WARNINGS_FROM)
    for name in _CHATTY:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    for name, lv in _NOTICES.items():
        logging.getLogger(name).setLevel(lv)


@contextlib.contextmanager
def prints_to_debug(name: str) -> Iterator[None]:
    """What a dependency `print`s to stdout inside the block becomes debug lines of logger
    `name` (DeepSpeed prints "... built successfully" whenever it loads its CPU comm op).
    Replaces `print` itself for the block: Ray Train's workers patch `print` into a logger
    call, which a redirected `sys.stdout` would not catch."""
    if verbose():
        yield
        return
    logger, shown = get_logger(name), builtins.print

    def to_debug(*objects: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
                 flush: bool = False) -> None:
        if file not in (None, sys.stdout):
            shown(*objects, sep=sep, end=end, file=file, flush=flush)
            return
        text = (" " if sep is None else sep).join(map(str, objects)).strip()
        if text:
            logger.debug(text)

    builtins.print = to_debug
    try:
        yield
    finally:
        builtins.print = shown


def setup_ray_worker() -> None:
    """Ray's `worker_process_setup_hook`: runs first in every Ray worker process and actor
    (training workers, Ray Train's controller, Ray Data's actors) of a job we start."""
    setup(rank=None)
    # Ray Train's placement-group cleaner asks the state API about "the" cluster; with no
    # address it looks for clusters on this machine and, when there are two (a second job
    # or a test next to ours), its thread dies with a traceback. Name ours.
    if "RAY_ADDRESS" not in os.environ:
        import ray

        with contextlib.suppress(Exception):
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def setup_validation_worker() -> None:
    """The setup hook of the validation actor's process: like a training rank > 0 it shows
    warnings only (its results reach the console through the driver)."""
    setup_ray_worker()
    setup(rank="validation")


def ray_init_kwargs() -> dict[str, Any]:
    """What `ray.init` gets from us: the setup hook in every worker process, TRIP_LOG_LEVEL
    passed on, and Ray's own Python logs at WARNING unless debug."""
    import ray

    env = {ENV: os.environ[ENV]} if ENV in os.environ else {}
    out: dict[str, Any] = {"runtime_env": {"worker_process_setup_hook": "trip.log.setup_ray_worker",
                                           "env_vars": env}}
    if not verbose():
        out["logging_config"] = ray.LoggingConfig(encoding="TEXT", log_level="WARNING")
    return out


def init_ray(**kwargs: Any) -> None:
    """`ray.init(**kwargs)` with `ray_init_kwargs()`, and the driver's notices quieted."""
    import ray

    setup(rank=_state["rank"])  # after `import ray`, which configures its loggers
    ray.init(**{**ray_init_kwargs(), **kwargs})
