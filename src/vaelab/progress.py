"""Progress of the waits outside training's loop (vaelab-eval's phases, vaelab-generate, the data cache's first
decode), in the style of training's bar (Lightning's TQDMProgressBar, conf/callbacks/progress_bar.yaml): a tqdm bar on
stderr when stderr is a terminal. Elsewhere (CI, tests, nohup, a pipe) a bar's redraws would fill the log, so a phase
says one plain line when it starts and one with its seconds when it ends.

Log lines said while a bar is live print above it (tqdm's logging redirect), in the log file as ever.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def logs_above_bars():
    """A context in which log lines print above a live tqdm bar instead of through it (tqdm's logging redirect), and
    into the log file as ever: vaelab-eval's phases, and vaelab-train's fit and test under Lightning's TQDM bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def live() -> bool:
    """Whether progress is drawn as a live bar: stderr is a terminal."""
    return sys.stderr.isatty()


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def duration(seconds: float) -> str:
    """A wait in words: '40 s', '8 min', '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Phase:
    """One phase's progress: advance(n) as its work gets done."""

    def __init__(self, name: str, total: int | None, unit: str, bar, estimate_after: int | None):
        self.name, self.total, self.unit, self.bar = name, total, unit, bar
        self.done, self.started, self.estimate_after = 0, time.perf_counter(), estimate_after

    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        if self.estimate_after and self.total and before < self.estimate_after <= self.done < self.total:
            seconds = (time.perf_counter() - self.started) * self.total / self.done
            at = f"{self.done:,} of {self.total:,} {plural(self.unit)}"
            log.info("%s: about %s in all (timed on its first %s)", self.name, duration(seconds), at)


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "step", estimate_after: int | None = None) -> Iterator[Phase]:
    """A bar named `name` over `total` units on a terminal, else a start line and an end line with the seconds.
    estimate_after=k: once k units are done, one line with the time the whole phase will take at that pace."""
    if not live():
        log.info("%s: %s ...", name, f"{total:,} {plural(unit)}" if total is not None else "started")
        started = time.perf_counter()
        yield Phase(name, total, unit, None, estimate_after)
        log.info("%s: done in %.1f s", name, time.perf_counter() - started)
        return
    from tqdm import tqdm

    # The settings of Lightning's TQDM bar: the average rate (smoothing=0), the terminal's width, left when done.
    with tqdm(total=total, desc=name, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0, leave=True) as bar:
        with logs_above_bars():
            yield Phase(name, total, unit, bar, estimate_after)
