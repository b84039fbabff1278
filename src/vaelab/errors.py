"""How errors reach the user: one line on stderr naming what was wrong and the fix, no traceback, a non-zero exit.

`UserError` is the one error type for anything the user can fix; `Interrupted` is a stop by a signal (a
BaseException, like KeyboardInterrupt, so that a sweep stops instead of going on with its next job).
`exit_cleanly` is the one place where they, Hydra's own composition errors, Ctrl-C and a full or unwritable
disk become that line. Only the standard library and Hydra's error types are imported: it runs first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator

# OS errors that mean "this location cannot take (or give) the data": a line, not a traceback.
# EFBIG is what a file-size limit (ulimit -f) gives, a full disk in miniature.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}
IN_THE_WAY = {errno.EISDIR: "a directory is in the way", errno.ENOTDIR: "a file is in the way"}


class UserError(Exception):
    """A problem the user can fix; its message is one line that says everything."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    """Stopped by a signal; the exit status is 128 + the signal number, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def show(value: object) -> str:
    """A value as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, float):  # as typed: a typed float field turns `lr=0` into 0.0
        return repr(value).removesuffix(".0")
    return str(value)


def disk_message(err: OSError, setting: str = "hydra.run.dir=<dir>") -> str:
    """A disk fault: the path, what the system said, and the setting that moves it elsewhere."""
    verb = "cannot access" if err.errno in (errno.EACCES, errno.EPERM) else "cannot write"  # a permission error may be a read
    fix = (
        f"move it away, or choose another place with {setting}"
        if err.errno in IN_THE_WAY
        else (f"free some space or choose another place with {setting}")
    )
    what = f"{IN_THE_WAY[err.errno]} ({err.strerror})" if err.errno in IN_THE_WAY else err.strerror or err
    return f"{verb} {err.filename or 'the disk'}: {what}. Everything written before is kept; {fix}"


def out_of_memory(err: BaseException | None) -> BaseException | None:
    """The allocation failure behind `err` (torch's CPU or CUDA allocator, Python's MemoryError), if there is one."""
    seen = 0
    while err is not None and seen < 20:
        text = str(err)
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def memory_message(err: BaseException) -> str:
    """Too little memory: how much was asked for, and the largest number the user typed (the likely culprit)."""
    import re

    asked = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ \w+)", str(err))
    amount = (
        ""
        if asked is None
        else f" ({int(asked.group(1)) / 2**30:,.1f} GiB at once)"
        if asked.group(1)
        else f" ({asked.group(2)} at once)"
    )
    typed = [(a.split("=", 1)[0], a.split("=", 1)[1]) for a in sys.argv[1:] if "=" in a and a.split("=", 1)[1].isdigit()]
    largest = max(typed, key=lambda kv: int(kv[1]), default=None)
    culprit = f" (the largest number given: {largest[0]}={largest[1]})" if largest else ""
    return (
        f"out of memory{amount}: a size is too large for this machine{culprit}; make it smaller (latent_dim, batch_size, "
        f"model.encoder.channels, data.image_size, num_samples, pairs_per_pass) or use a machine with more memory"
    )


def build(node, key: str, **kwargs):
    """hydra.utils.instantiate(node), with a constructor's complaint about its settings as one line naming the
    config key (a UserError raised inside passes through as it is)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if out_of_memory(err):
            raise  # message_for says it in one line
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:  # nested targets
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        # Lightning's MisconfigurationException is known by name: vaelab-eval and -generate never import Lightning.
        misconfigured = any(kind.__name__ == "MisconfigurationException" for kind in type(cause).__mro__)
        if misconfigured or isinstance(cause, (ValueError, TypeError, InstantiationException)):
            raise UserError(
                f"{key} ({node.get('_target_')}) refuses its settings: {type(cause).__name__}: "
                f"{one_line(cause)[:300]}; fix the {key}.* settings"
            ) from None
        raise


# The line for a setting of the wrong type, from where the settings are declared (vaelab.runs.settings puts its own
# here when imported): this module stays at the bottom of the import graph.
TYPE_MESSAGE: list = []


def hydra_message(err: Exception) -> str | None:
    """Hydra's composition errors (unknown keys and choices, bad types, unparsable overrides) as one line."""
    import difflib

    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException, SearchPathException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__
    yaml_error = yaml_message(err)
    if yaml_error:
        return yaml_error
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        return f"{group}={choice} is not a choice of {group}: choose one of {', '.join(err.options)}"
    if isinstance(err, SearchPathException):  # --config-dir naming no folder
        return (
            f"{one_line(err)}: --config-dir (-cd) takes an existing folder of your own configs, e.g. --config-dir my_conf "
            "holding my_conf/model/<name>.yaml"
        )
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {one_line(err.message)}"
    if isinstance(cause, ValidationError) and cause.full_key and TYPE_MESSAGE:  # a structured config's type check
        return TYPE_MESSAGE[0](cause.full_key, cause)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        key = cause.full_key
        near = difflib.get_close_matches(key.rpartition(".")[2], list(getattr(cause.parent_node, "keys", list)()), n=1)
        hint = f"did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{near[0]}? " if near else ""
        return f"there is no setting {key}: {hint}`--cfg job` prints every setting (a new key needs a +, e.g. +{key}=...)"
    if isinstance(err, CompactHydraException):
        return one_line(err) + (f" ({one_line(cause).split(' full_key:')[0]})" if cause else "")
    return None


def yaml_message(err: Exception) -> str | None:
    """A config file that is not valid YAML (a user's own, read while Hydra composes): the file, where, and what."""
    import yaml

    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return None
    mark = err.problem_mark
    context = f" ({err.context})" if err.context else ""
    return (
        f"{mark.name} is not valid YAML: {err.problem}{context} at line {mark.line + 1}, column {mark.column + 1}; fix that file"
    )


@contextlib.contextmanager
def recorded() -> Iterator[None]:
    """Write an error that ends a run into the run's log file (Hydra's file handler) too, then let it go on to
    exit_cleanly. Only around a run's work: a run refused before it starts leaves its directory as it was."""
    import logging

    log = logging.getLogger(__name__)
    try:
        yield
    except (Exception, Interrupted) as err:
        message = message_for(err) or f"{type(err).__name__}: {err}"
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, one_line(message), None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        err.recorded = True  # type: ignore[attr-defined]  (job_reporting then does not log it again)
        raise


# Set by the user (for a full traceback), or by exit_cleanly itself so that Hydra raises instead of printing.
_USER_WANTS_TRACEBACKS = "HYDRA_FULL_ERROR" in os.environ


def message_for(err: BaseException) -> str | None:
    """The one line for an error the user can act on; None for anything else (a bug keeps its traceback)."""
    if isinstance(err, (UserError, Interrupted)):
        return str(err)
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return disk_message(err)
    if out_of_memory(err) is not None:
        return memory_message(out_of_memory(err))
    if isinstance(err, Exception) and not _USER_WANTS_TRACEBACKS:
        return hydra_message(err)
    return None


_SIGINTS: list[int] = []  # Ctrl-C received by this process


def _interrupt(signum, frame) -> None:
    """Python's own Ctrl-C (KeyboardInterrupt), remembered: raised in the middle of an import, it can leave a module
    half made and surface as another error (a RecursionError inside numpy), which must still read as the Ctrl-C."""
    _SIGINTS.append(signum)
    raise KeyboardInterrupt


def _terminate(signum, frame) -> None:
    """SIGTERM during start-up: a stop like Ctrl-C's, in one line (its default ended the command without a word)."""
    raise Interrupted(f"stopped by SIGTERM before {_STARTING[-1] if _STARTING else 'it started'}", signum)


_STARTING: list[str] = []  # what start-up comes before, for _terminate's line


def raise_if_interrupted() -> None:
    """Where start-up ends: a Ctrl-C that a library swallowed on the way is raised again, not lost (torch's C++
    import of numpy clears the KeyboardInterrupt and goes on without numpy; the run then trained to its end).
    SIGTERM goes back to its default here: training (Lightning) and vaelab-eval/-generate (stopped_by_signals)
    handle it from now on."""
    import signal

    if _SIGINTS:
        raise KeyboardInterrupt
    if signal.getsignal(signal.SIGTERM) is _terminate:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def exit_cleanly(prog: str) -> Iterator[None]:
    """Report what the user can act on as `<prog>: error: <one line>` on stderr and exit non-zero.

    Anything else keeps its traceback: a bug. Hydra is told to raise its errors instead of printing them
    over several lines (HYDRA_FULL_ERROR), unless the user asked for that themselves.
    """
    import signal
    import threading

    if not _USER_WANTS_TRACEBACKS:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    before = "training started" if prog == "vaelab-train" else "any result was written"
    main = threading.current_thread() is threading.main_thread()
    remember = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    terminate = main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if remember:
        signal.signal(signal.SIGINT, _interrupt)
    if terminate:
        _STARTING[:] = [before]
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C outside training (Lightning turns it into Interrupted during fit and test)
        _exit(prog, "interrupted", f"stopped by SIGINT before {before}", 130)
    except (Exception, Interrupted) as err:
        if _SIGINTS and not isinstance(err, Interrupted):  # a Ctrl-C that surfaced as another error (e.g. a broken import)
            _exit(prog, "interrupted", f"stopped by SIGINT before {before}", 130)
        message = message_for(err)
        if message is None:
            raise
        code = getattr(err, "exit_code", 1)
        _exit(prog, "interrupted" if isinstance(err, Interrupted) else "error", message, code)
    finally:
        if remember:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if terminate and signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def stopped_by_signals(unfinished: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM while a command without a trainer works (vaelab-eval, vaelab-generate) becomes
    Interrupted, saying what was left unwritten (SIGTERM ended such a command without a word). Training has
    Lightning's handling (vaelab.runs.guards.interruptions); a handler someone else installed (a sweep's) is kept."""
    import signal

    def stop(signum, frame) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; {unfinished}", signum)

    raise_if_interrupted()  # start-up ends here (and SIGTERM's start-up handler with it)
    defaults = {signal.SIGINT: (signal.default_int_handler, _interrupt), signal.SIGTERM: (signal.SIG_DFL,)}
    previous = {s: signal.getsignal(s) for s, default in defaults.items() if signal.getsignal(s) in default}
    for signum in previous:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def quiet_threads() -> None:
    """A background thread's disk fault (TensorBoard's event writer on a full disk) is logged, not printed with
    its traceback: the main thread meets the same error at its next write and reports it in one line."""
    import logging
    import threading

    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_ERRNOS:
            logging.getLogger(__name__).warning(
                "%s in thread %s", disk_message(args.exc_value), args.thread.name if args.thread else "?"
            )
        else:
            default(args)

    threading.excepthook = hook


def _exit(prog: str, label: str, message: str, code: int) -> None:
    label = label if code else "note"  # e.g. a resume with nothing left to do
    print(f"{prog}: {label}: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)
