"""Start-up checks and how errors reach the user: one clear line, no traceback, a non-zero exit.

The config's schema is checked before any data is read or anything heavy is imported.

Values are read from where they finally live (model.latent_dim, trainer.max_epochs, ...), so a nested
override such as `trainer.max_epochs=0` is caught too, and the error names the key the user typed: the
headline key (`epochs`) while the nested value still points at it, the nested key once it was set itself.
Unknown keys (`latent_dimm=3`) and unknown choices (`model=foo`) are refused by Hydra before this runs.
Only hydra and omegaconf are imported here, so a bad value fails in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user can fix, whose message says everything: shown as one line, without a traceback."""

    exit_code = 1
    stops_sweep = False   # True: end a whole multirun (an interrupt), not just this job


class ConfigError(UserError, ValueError):
    """A setting that cannot be used; the message is one line naming the key, the value and what is allowed."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Rule:
    headline: str                    # the key in conf/train.yaml the groups read through interpolation
    path: str                        # where the value finally lives
    check: Callable[[Any], bool]
    allowed: str                     # what is allowed, in words
    example: str                     # a good value


RULES = (
    Rule("latent_dim", "model.latent_dim", _is_positive_int, "a positive integer", "16"),
    Rule("epochs", "trainer.max_epochs", _is_positive_int, "a positive integer", "10"),
    Rule("batch_size", "data.batch_size", _is_positive_int, "a positive integer", "128"),
    Rule("noise_factor", "model.noise_factor", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]", "0.1"),
    Rule("lr", "model.optimizer.lr", lambda v: _is_number(v) and v > 0, "a number > 0", "1e-3"),
    Rule("beta", "model.beta", lambda v: _is_number(v) and v >= 0, "a number >= 0", "1.0"),
)


def user_key(cfg: DictConfig, rule: Rule) -> str:
    """The key the user would type for this value: the headline key while the nested value is `${headline}`."""
    parent_path, _, leaf = rule.path.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path)
    if isinstance(parent, DictConfig) and OmegaConf.to_container(parent, resolve=False).get(leaf) == "${" + rule.headline + "}":
        return rule.headline
    return rule.path


def _show(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first setting outside its allowed range (checked in the order of RULES)."""
    for rule in RULES:
        key = user_key(cfg, rule)
        try:
            value = OmegaConf.select(cfg, rule.path, throw_on_missing=True)
        except OmegaConfBaseException as err:  # e.g. an interpolation to a key that does not exist
            first_line = str(err).strip().splitlines()[0]
            raise ConfigError(f"{key} cannot be read ({first_line}); it must be {rule.allowed}, e.g. {key}={rule.example}") from None
        if not rule.check(value):
            raise ConfigError(f"{key}={_show(value)} is not allowed: {key} must be {rule.allowed}, e.g. {key}={rule.example}")


class OutputDirError(UserError, OSError):
    """The run directory cannot be created or written."""


def check_output_dir(directory: str | Path, hint: str = "choose a writable one with hydra.run.dir=<dir>") -> Path:
    """Create `directory` if needed and prove it writable with a probe file; OutputDirError otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or str(err)
        raise OutputDirError(f"cannot write the output directory {directory}: {reason} ({err.filename}); {hint}") from None
    return directory


class CheckOutputDir(HydraCallback):
    """Hydra callback: check the run (or sweep) directory before Hydra creates it, so an unwritable location
    gives one line instead of a traceback from Hydra's mkdir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_cleanly(config.hydra.help.app_name):
            check_output_dir(config.hydra.run.dir, "choose a writable one with hydra.run.dir=<dir> or paths.log_dir=<dir>")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_cleanly(config.hydra.help.app_name):
            check_output_dir(config.hydra.sweep.dir, "choose a writable one with hydra.sweep.dir=<dir> or paths.log_dir=<dir>")


# OS errors that mean "this location cannot take more data": reported as one line, not a traceback.
# EFBIG is what a file-size limit (ulimit -f) gives, a full disk in miniature.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class JobFailed(CompactHydraException):
    """A multirun job's UserError: Hydra runs the other jobs and then prints this message, not a traceback."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def _log_to_files(message: str) -> None:
    """The message into the run's log file (Hydra's file handler) only: the terminal gets it once, on stderr."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def disk_message(err: OSError) -> str:
    run_dir = _run_dir()
    if run_dir and (Path(run_dir) / "checkpoints" / "last.ckpt").exists():
        then = f"; then continue with: vaelab-train resume_from={run_dir}"
    else:
        then = "; then start the run again"
    verb = "cannot access" if err.errno in (errno.EACCES, errno.EPERM) else "cannot write"  # a permission error may be a read
    return (f"{verb} {err.filename or 'the disk'}: {err.strerror or err}. Everything written before is kept "
            f"(checkpoints are replaced only once the new one is whole). Free some space or choose a writable "
            f"directory (hydra.run.dir=<dir>){then}")


@contextlib.contextmanager
def exit_cleanly(prog: str) -> Iterator[None]:
    """Report a UserError (or a disk-full/unwritable OSError) as one line on stderr and exit non-zero.

    In a multirun job the error is raised as JobFailed instead, so Hydra goes on with the other jobs and
    reports it at the end; an interrupt ends the whole sweep. Anything else keeps its traceback: a bug.
    """
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C outside training (Lightning handles it during fit and test)
        _exit(prog, "stopped by SIGINT before training started or after it ended", 130)
    except UserError as err:
        _exit_or_raise(prog, str(err), err.exit_code, err.stops_sweep)
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        _exit_or_raise(prog, disk_message(err), 1, False)


def _exit_or_raise(prog: str, message: str, code: int, stops_sweep: bool) -> None:
    if _in_multirun() and not stops_sweep:
        log.error(message)
        raise JobFailed(message) from None
    _exit(prog, message, code)


def _exit(prog: str, message: str, code: int) -> None:
    label = "interrupted" if code > 128 else "error"
    print(f"{prog}: {label}: {message}", file=sys.stderr, flush=True)
    _log_to_files(message)
    sys.exit(code)
