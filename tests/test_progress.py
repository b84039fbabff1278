"""Progress of the waits outside training (vaelab.progress): a tqdm bar when stderr is a terminal, else a line when a
phase starts and one with its seconds when it ends; the data cache's first decode says so. (vaelab-eval's phases and
vaelab-generate's from the shell: tests/commands/test_evaluate.py, test_generate.py.)"""

import gzip
import io
import logging
import re
import sys

import pytest

from vaelab import progress
from vaelab.data.mnist import IDX_FILES, locate


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vaelab.progress"]


def test_in_a_log_a_phase_says_when_it_starts_and_how_long_it_took(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # CI, a pipe, nohup
    caplog.set_level(logging.INFO)
    with progress.phase("IWAE bound (K = 100)", 10_000, "image") as done:
        for _ in range(4):
            done.advance(2500)
    assert sys.stderr.getvalue() == ""  # no bar
    start, end = said(caplog)
    assert start == "IWAE bound (K = 100): 10,000 images ..."
    assert re.fullmatch(r"IWAE bound \(K = 100\): done in \d+\.\d s", end)


def test_a_phase_that_fails_says_no_end(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO)
    with pytest.raises(ValueError), progress.phase("linear probe", 3) as done:
        done.advance()
        raise ValueError("stopped")
    assert said(caplog) == ["linear probe: 3 steps ..."]


def test_the_estimate_is_said_once_after_the_first_units(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO)
    with progress.phase("Fréchet feature classifier", 100, "batch", estimate_after=10) as done:
        for _ in range(100):
            done.advance()
    start, estimate, end = said(caplog)
    assert start == "Fréchet feature classifier: 100 batches ..."
    assert re.fullmatch(r"Fréchet feature classifier: about \d+ s in all \(timed on its first 10 of 100 batches\)", estimate)


def test_on_a_terminal_a_phase_is_a_bar_and_lines_print_above_it(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    console = logging.StreamHandler(sys.stderr)  # the console's log handler, as Hydra's (on stdout) would be
    logging.getLogger().addHandler(console)
    caplog.set_level(logging.INFO)
    try:
        with progress.phase("Fréchet distance", 6) as done:
            for step in range(6):
                done.advance()
                if step == 2:
                    logging.getLogger("vaelab.evaluation").info("a line said meanwhile")
    finally:
        logging.getLogger().removeHandler(console)
    screen = sys.stderr.getvalue()
    assert re.match(r"Fréchet distance: 100%\|[█#]+\| 6/6 \[", screen.split("\r")[-1]), screen
    before, after = screen.split("a line said meanwhile\n")
    assert re.search(r"/6 \[.*\r +\r$", before) and "6/6" in after  # the bar cleared first, then drawn again below
    assert said(caplog) == []  # no start and end lines: the bar says it all


@pytest.mark.parametrize("n,text", [(40, "40 s"), (500, "8 min"), (9000, "2.5 h")])
def test_durations_read_as_words(n, text):
    assert progress.duration(n) == text


def test_the_data_caches_first_decode_says_so(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO)
    system = tmp_path / "debian"
    system.mkdir()
    for stem, _, _ in IDX_FILES.values():  # locate only decompresses; read_idx checks the contents later
        (system / f"{stem}.gz").write_bytes(gzip.compress(stem.encode()))
    raw = locate(tmp_path / "cache", "FashionMNIST", str(system), download=False)
    start, end = said(caplog)
    assert start == f"FashionMNIST: decompressing {system} into the data cache {raw} (once): 4 files ..."
    assert end.startswith(f"FashionMNIST: decompressing {system} into the data cache {raw} (once): done in ")
    caplog.clear()
    locate(tmp_path / "cache", "FashionMNIST", str(system), download=False)
    assert said(caplog) == []  # decoded once: nothing to wait for
