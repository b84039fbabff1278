"""How a command ends: one line on stderr naming what was wrong and the fix, no traceback, a non-zero exit.

`UserError` is the one error type for anything the user can fix; `Interrupted` a stop by a signal (a BaseException,
like KeyboardInterrupt, so that nothing on the way takes it for an error and goes on, e.g. to a sweep's next job).
`exit_cleanly` is the error boundary, `end` the one writer of the line. Only the standard library is imported at
module level: the console scripts enter exit_cleanly before anything else.

The signal policy, one for every command, installed by the console script's exit_cleanly before any heavy import:
SIGINT and SIGTERM alike raise Interrupted, whose line says what the command has written or left undone so far
(`when_stopped`). While the command imports torch and Lightning, a first stop waits for the import to end (`held`).
While Lightning fits or tests, SIGTERM is Lightning's (it ends the batch, then raises: `deferred`,
vaelab.runs.guards.interruptions); a joblib sweep's main process stops its workers first (`stop_with`,
vaelab.runs.sweep); the kernel ends the workers of a sweep that is gone (vaelab.runs.workers).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator

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
        from vaelab.runs.renames import RETIRED, retired

        if key in RETIRED:  # Hydra's message ends with the override as typed: "... use +<key>=<value>"
            return retired(key, str(err).rpartition(f"+{key}=")[2] if f"+{key}=" in str(err) else "")
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


# --- the signal policy (see the module's docstring) ------------------------------------------------------------
_RECEIVED: list[int] = []  # the signals this process has received
_AFTER = [" before it started"]  # how a stop's line ends: what the command has written, or left undone
_DEFERRED: set[int] = set()  # signals another handler, run before this policy's, acts on for now
_ACTION: list[Callable[[int], None]] = []  # what a stop does instead of raising (a joblib sweep's main process)
_HELD: list[bool] = []  # inside held(): a first stop is noted, raised when the block ends


def _stop(signum: int, frame) -> None:
    _RECEIVED.append(signum)
    if signum in _DEFERRED and signal.getsignal(signum) is not _stop:  # the handler installed over this one acts
        return
    if _HELD and len(_RECEIVED) == 1:
        return
    if _ACTION:
        _ACTION[0](signum)
    raise _interrupted(signum)


def _interrupted(signum: int) -> Interrupted:
    """The stop's error, its line saying what the command has written or left undone so far."""
    return Interrupted(f"stopped by {signal.Signals(signum).name}{_AFTER[0]}", signum)


def _raise_received() -> None:
    """A stop received and not raised yet (noted while held, or swallowed by a library on the way) is raised now."""
    if _RECEIVED:
        raise _interrupted(_RECEIVED[0])


def before_work(prog: str) -> str:
    return f" before {'training started' if prog in ('vaelab-train', 'vaelab-resume') else 'any result was written'}"


def when_stopped(text: str) -> None:
    """From here on a stop's line ends with `text`. A step of the command ends here, so a signal that a library
    swallowed on the way is raised now, not lost (torch's C++ import of numpy clears the exception and goes on)."""
    _raise_received()
    _AFTER[0] = text


@contextlib.contextmanager
def held() -> Iterator[None]:
    """While inside (the import of torch and Lightning), a first stop is only noted, and raised when the block ends; a
    second one raises at once. Raised inside torch's import, the exception can reach C++ code that cannot pass it on
    (pybind11), and the process aborts with a C++ traceback instead of the one line."""
    _HELD.append(True)
    try:
        yield
    finally:
        _HELD.pop()
    if not _HELD:
        _raise_received()


@contextlib.contextmanager
def deferred(signum: int) -> Iterator[None]:
    """While inside, `signum` is only noted: the handler installed over this policy's acts on it (Lightning's, which
    calls the one it replaced after its own, ends the batch and raises)."""
    _DEFERRED.add(signum)
    try:
        yield
    finally:
        _DEFERRED.discard(signum)


def stop_with(action: Callable[[int], None]) -> None:
    """A stop calls `action(signum)` instead of raising (it ends the process itself)."""
    _ACTION[:] = [action]


def _install(prog: str) -> dict[int, object]:
    """The policy, for signals nothing else handles (not again under an outer exit_cleanly, nor for a SIGINT the
    shell has the command ignore); returns what it replaced."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    replaced = {s: signal.getsignal(s) for s, default in defaults.items() if signal.getsignal(s) is default}
    if replaced:
        _AFTER[0] = before_work(prog)
    for signum in replaced:
        signal.signal(signum, _stop)
    return replaced


@contextlib.contextmanager
def exit_cleanly(prog: str) -> Iterator[None]:
    """The error boundary: what the user can act on ends the command as one line (`end`), written into the run's log
    too; anything else keeps its traceback (a bug). The outermost one installs the signal policy while it lasts.
    Hydra is told to raise its errors instead of printing them over several lines (HYDRA_FULL_ERROR)."""
    if not _USER_WANTS_TRACEBACKS:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    replaced = _install(prog)
    try:
        yield
    except (Exception, KeyboardInterrupt, Interrupted) as err:
        stop = _RECEIVED[0] if _RECEIVED else signal.SIGINT if isinstance(err, KeyboardInterrupt) else None
        if stop is not None and not isinstance(err, Interrupted):  # e.g. a Ctrl-C that broke an import on its way
            err = _interrupted(stop)
        message = message_for(err)
        if message is None:
            raise
        record(err, message)
        end(prog, "interrupted" if isinstance(err, Interrupted) else "error", message, getattr(err, "exit_code", 1))
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def record(err: BaseException, message: str) -> None:
    """The line that ends a run, in its log file too (Hydra's file handler; none yet: nothing is written), once."""
    import logging

    if getattr(err, "recorded", False):
        return
    err.recorded = True  # type: ignore[attr-defined]
    log = logging.getLogger(__name__)
    entry = log.makeRecord(log.name, logging.ERROR, __file__, 0, one_line(message), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(entry)


def end(prog: str, label: str, message: str, code: int, *, fd: int = 2, at_once: bool = False) -> None:
    """The one writer of a command's last line, `<prog>: error|interrupted|note: <message>` on stderr (a note for
    exit code 0: e.g. a resume with nothing left to do), then the exit. at_once: os._exit, writing to `fd`, for a
    process whose threads would hold the exit up (a joblib sweep stopping: vaelab.runs.sweep)."""
    line = f"{prog}: {label if code else 'note'}: {one_line(message)}\n"
    if not at_once:
        sys.stderr.write(line)
        sys.stderr.flush()
        sys.exit(code)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    os.write(fd, line.encode())
    os._exit(code)


def quiet() -> None:
    """stderr is for the last line: library warnings go to the log (and stdout), and a background thread's disk fault
    (TensorBoard's event writer on a full disk) is logged without its traceback; the main thread meets the same
    error at its next write and reports it in one line."""
    import logging
    import threading

    logging.captureWarnings(True)
    default = threading.excepthook
    if getattr(default, "quiet", False):  # already (a sweep's next job in the same process)
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_ERRNOS:
            logging.getLogger(__name__).warning(
                "%s in thread %s", disk_message(args.exc_value), args.thread.name if args.thread else "?"
            )
        else:
            default(args)

    hook.quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook
