"""A joblib sweep's worker processes: they end when the sweep ends, whatever ends it, and the sweep can list them.

The kernel does the watching: each worker asks, first thing, for SIGTERM when the sweep's main process ends
(prctl PR_SET_PDEATHSIG), then checks the sweep is still its parent (a sweep that died before the request left
its workers to another parent: they end at once). SIGTERM then stops a training job at the next batch (Lightning's
handler; vaelab.runs.sweep.run_job records the job as interrupted and ends the worker) and ends a worker
anywhere else. Each job's start checks again, so no job starts once the sweep has ended.

Linux only (like the /proc listing the sweep stops its workers with). Only the standard library is imported here at
module level: a worker imports this first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_sweep_pid: int | None = None  # in a worker: the sweep's main process, once the worker has joined it


def start_with_initializer(sweep_pid: int) -> None:
    """In the sweep's main process, before joblib starts its workers: each runs `join_sweep` before anything else.
    Hydra's joblib launcher asks joblib for the backend named "loky" and passes no initializer: that name gets one,
    in this process only."""
    from joblib.parallel import BACKENDS, register_parallel_backend

    register_parallel_backend("loky", functools.partial(BACKENDS["loky"], initializer=join_sweep, initargs=(sweep_pid,)))


def join_sweep(sweep_pid: int) -> None:
    """In a worker (loky's initializer, then each job's start): SIGTERM when the sweep's main process ends, and an
    end now if it already has. (The kernel's signal follows the thread that started the worker: loky starts them
    from the sweep's main thread or its executor's manager thread, both there as long as the workers.)"""
    global _sweep_pid
    if os.getpid() == sweep_pid:  # joblib runs a one-worker sweep in its own process
        return
    _sweep_pid = sweep_pid
    if sys.platform.startswith("linux"):
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM)) != 0:
            log.warning("this worker may outlive its sweep: prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    if os.getppid() != sweep_pid:
        os._exit(128 + signal.SIGTERM)


def sweep_ended() -> bool:
    """In a worker that has joined its sweep: the sweep's main process is gone."""
    return _sweep_pid is not None and os.getppid() != _sweep_pid


def children() -> list[int]:
    """This process's child processes (its workers, and joblib's helpers)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def helper(pid: int) -> bool:
    """Whether this process's child `pid` is one of loky's helpers, not a worker: its process-tree kill's `pgrep`, or
    a fork of this process that has not yet become the program it runs (its command line still this process's: a
    pgrep or any other command a moment before its exec). Ended, loky's kill fails and prints a traceback."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "pgrep":
            return True
        return Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] not in "ZX"
    except OSError:
        return False
