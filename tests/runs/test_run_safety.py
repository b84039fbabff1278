"""vaelab never deletes what it did not write or what is in use, and a sweep's workers end when the sweep ends.

From the shell: overwrite=true on a run or sweep another command is using stops in one line with nothing touched,
and once the directory is free moves the old run aside whole (nothing deleted); a folder vaelab did not make (no
marker) is never replaced, whatever names it holds; a joblib sweep SIGKILLed while its workers start leaves no
worker behind and no job trains. In-process: moving aside twice in one second, and the new directory's lock.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import FAST, PAUSING_ENV, one_line, pause_at, run_cli, snapshot, start, wait_for
from vaelab.runs.rundir import MARKER, lock, move_aside

TINY = [*FAST, "epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under the folder by its path inside it, with its bytes (conftest's snapshot, made relative)."""
    return {str(Path(path).relative_to(folder)): data for path, data in snapshot(folder).items()}


def made_by(folder: Path) -> str:
    return json.loads((folder / MARKER).read_text())["made_by"]


# --- nothing in use is touched; overwrite=true moves the old run aside ------------------------------------------


def test_overwrite_true_leaves_a_run_in_use_alone_then_moves_it_aside_whole(tmp_path):
    run_dir, paused = tmp_path / "run", tmp_path / "paused"
    first = start(*TINY, f"hydra.run.dir={run_dir}", *pause_at(paused, epoch=0, batch=0), log=tmp_path / "first", env=PAUSING_ENV)
    try:
        wait_for(paused, first)
        before = files(run_dir)
        busy = run_cli(*TINY, f"hydra.run.dir={run_dir}", "overwrite=true", check=False)
        assert files(run_dir) == before  # the lock is taken before anything is looked at, let alone removed
        one_line(busy, f"vaelab-train: error: {run_dir} is in use by another vaelab command right now")
    finally:
        first.kill()
        first.wait(timeout=60)
    assert made_by(run_dir) == "vaelab-train run" and {".hydra/config.yaml", "train.log"} <= before.keys()

    (run_dir / "notes.txt").write_text("mine")
    old = files(run_dir)
    run_cli(*TINY, "latent_dim=4", f"hydra.run.dir={run_dir}", "overwrite=true")
    [aside] = tmp_path.glob("run.replaced-*")
    assert re.fullmatch(r"run\.replaced-\d{8}-\d{6}", aside.name)
    assert files(aside) == old  # the old run, whole, the user's notes with it: nothing deleted
    assert "latent_dim: 4" in (run_dir / ".hydra" / "config.yaml").read_text() and (run_dir / "metrics.json").exists()
    assert made_by(run_dir) == "vaelab-train run" and not (run_dir / "notes.txt").exists()


def test_a_running_sweep_and_its_job_are_in_use(tmp_path):
    sweep_dir, job, paused = tmp_path / "sweep", tmp_path / "sweep" / "job", tmp_path / "paused"
    sweep = start(
        "-m", *TINY, "latent_dim=2", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=job", *pause_at(paused, epoch=0, batch=0),
        log=tmp_path / "sweep", env=PAUSING_ENV,
    )  # fmt: skip
    try:
        wait_for(paused, sweep)
        before = files(sweep_dir)
        again = run_cli("-m", *TINY, "latent_dim=2", f"hydra.sweep.dir={sweep_dir}", "overwrite=true", check=False)
        assert files(sweep_dir) == before
        one_line(again, f"vaelab-train: error: {sweep_dir} is in use by another vaelab command right now")
        into_the_job = run_cli(*TINY, f"hydra.run.dir={job}", "overwrite=true", check=False)
        assert files(sweep_dir) == before
        one_line(into_the_job, f"vaelab-train: error: {job} is in use by another vaelab command right now")
    finally:
        sweep.kill()
        sweep.wait(timeout=60)
    assert made_by(sweep_dir) == "vaelab-train sweep" and made_by(job) == "vaelab-train sweep job"


def test_a_folder_outside_the_run_is_never_written_over(tmp_path):
    """Outputs sent outside the run directory: a second run wrote over the first's last.ckpt (the last checkpoint
    keeps one name), metrics.csv, hparams.yaml, projector and pictures, and mixed its curves with theirs. Now it
    stops in one line for each such folder; the first run's own resume continues there, from its own last.ckpt."""
    shared = tmp_path / "shared"
    elsewhere = {
        "logger": [
            "logger=many",
            "~logger.mlflow",
            f"logger.csv.save_dir={shared}/logs",
            f"logger.tensorboard.save_dir={shared}/logs",
        ],
        "checkpoints": [f"callbacks.model_checkpoint.dirpath={shared}/ck", f"callbacks.last_checkpoint.dirpath={shared}/ck"],
        "pictures": [f"callbacks.samples.image_dir={shared}/pics"],
    }
    run_cli(*TINY, f"hydra.run.dir={tmp_path / 'first'}", *sum(elsewhere.values(), []))
    before = files(shared)
    assert {"ck/last.ckpt", "logs/csv/metrics.csv", "pics/samples_epoch000.png"} <= set(before)
    expected = {
        "logger": f"logger.tensorboard.save_dir={shared}/logs: {shared}/logs/tensorboard already holds another run's files (",
        "checkpoints": f"callbacks.model_checkpoint.dirpath={shared}/ck: {shared}/ck already holds another run's files (",
        "pictures": f"callbacks.samples.image_dir={shared}/pics: {shared}/pics already holds another run's files (",
    }
    for kind, overrides in elsewhere.items():
        second = run_cli(*TINY, f"hydra.run.dir={tmp_path / kind}", *overrides, check=False)
        line = one_line(second, "vaelab-train: error: " + expected[kind])
        assert "which this run would write over or mix with its own; give it a folder of its own, e.g. " in line
        assert files(shared) == before, kind

    run_cli(str(tmp_path / "first"), "epochs=2", tool="vaelab-resume")
    assert f"{shared}/ck/last.ckpt" in (tmp_path / "first" / "train.log").read_text()  # where the resume started
    rows = list(csv.DictReader((shared / "logs" / "csv" / "metrics.csv").read_text().splitlines()))
    assert {row["epoch"] for row in rows if row.get("val/loss")} >= {"0", "1"}  # the first epoch kept, the second added
    assert (shared / "pics" / "samples_epoch001.png").exists()


@pytest.mark.parametrize("setting", ["hydra.run.dir", "hydra.sweep.dir"])
def test_overwrite_true_never_replaces_a_folder_vaelab_did_not_make(tmp_path, setting):
    """A user's folder that holds names vaelab also writes (images/, csv/), but not vaelab's marker."""
    folder = tmp_path / "mine"
    holder = folder if setting == "hydra.run.dir" else folder / "photos"  # a sweep: a sub-folder that looks like a run
    (holder / "images").mkdir(parents=True)
    (holder / "images" / "cat.png").write_bytes(b"\x89PNG not really")
    (holder / "csv").mkdir()
    (holder / "csv" / "prices.csv").write_text("a,b\n1,2\n")
    before = files(folder)
    proc = run_cli(*(["-m"] if setting == "hydra.sweep.dir" else []), *TINY, f"{setting}={folder}", "overwrite=true", check=False)
    names = "images, csv" if setting == "hydra.run.dir" else "photos"
    line = one_line(proc, f"vaelab-train: error: {setting}={folder} holds {names} but no {MARKER} marker: vaelab did not make it")
    assert line.endswith("so it will not replace it; choose another directory, or move this one aside yourself")
    assert files(folder) == before and [p.name for p in tmp_path.iterdir()] == ["mine"]


# --- a joblib sweep's workers end with it ------------------------------------------------------------------------


def children(pid: int) -> dict[int, str]:
    """The child processes of `pid`, with their command lines."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                found[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


def live(pids) -> list[int]:
    def state(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][:1]
        except OSError:
            return "X"

    return [pid for pid in pids if state(pid) not in "ZX"]


def test_a_joblib_sweep_killed_while_its_workers_start_leaves_no_worker_and_no_job(tmp_path):
    """The sweep is SIGKILLed as soon as its two loky workers exist, long before either could start a job: each
    ends within seconds (they used to live on, and train, under another parent), and no job ever starts."""
    sweep_dir, markers = tmp_path / "sweep", tmp_path / "markers"
    markers.mkdir()
    sweep = start(
        "-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "latent_dim=2,4,8", f"hydra.sweep.dir={sweep_dir}",
        *pause_at(markers / "${latent_dim}", epoch=0, batch=0), log=tmp_path / "sweep", env=PAUSING_ENV,
    )  # fmt: skip
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while sum("popen_loky_posix" in line for line in children(sweep.pid).values()) < 2:
            assert sweep.poll() is None and time.monotonic() < deadline, "the sweep's two workers did not start"
            time.sleep(0.01)
        started = list(children(sweep.pid))  # the workers and joblib's resource trackers
        os.kill(sweep.pid, signal.SIGKILL)
        assert sweep.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while live(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live(started) == []
    finally:  # nothing left running on the test machine, whatever failed
        sweep.kill()
        for pid in live(started):
            os.kill(pid, signal.SIGKILL)
    assert list(markers.iterdir()) == [] and not list(sweep_dir.rglob("job_status.json"))  # no job ever started


# --- the pieces, in-process ------------------------------------------------------------------------------------


def free(path: Path) -> bool:
    """No process holds the directory's lock (a second open file takes its own flock, even in this process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_moving_aside_twice_in_a_second_keeps_both_and_the_new_directory_is_locked(tmp_path):
    run = tmp_path / "run"
    moved = []
    for n in range(2):
        run.mkdir()
        (run / "n").write_text(str(n))
        lock(run)
        moved.append(move_aside(run, "hydra.run.dir=<dir>"))
    assert not run.exists() and [(m / "n").read_text() for m in moved] == ["0", "1"] and moved[0] != moved[1]
    assert all(re.fullmatch(r"run\.replaced-\d{8}-\d{6}(-2)?", m.name) for m in moved)
    assert all(free(m) for m in moved)  # the lock went with the old directory, and was let go
    run.mkdir()
    lock(run)  # a real lock on the new directory, not the no-op of one this process held on the old one
    assert not free(run)
