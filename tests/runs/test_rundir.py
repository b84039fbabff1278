"""The life of a run directory: claimed, locked, never written over, resumed in place.

From the shell: a run killed at any moment (mid-epoch, before its first checkpoint, in its test stage), stopped
by Ctrl-C or SIGTERM, or moved elsewhere, resumes to the uninterrupted run's metrics.json and TensorBoard curves;
a resume refused by any check leaves the run byte for byte as it was. In-process: the pieces (claim, lock,
the resumed config, the purge step, atomic writes).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import (
    FAST,
    PAUSING_ENV,
    default_signals,
    event_accumulator,
    finished,
    logged_images,
    one_line,
    pause_at,
    read_metrics,
    run_cli,
    run_with_file_limit,
    snapshot,
    start,
    train_run,
    wait_for,
)
from vaelab.errors import UserError
from vaelab.files import atomic_write
from vaelab.runs.resume import ResumePoint, first_step_logged_after, record_resume, resumed
from vaelab.runs.rundir import claim, lock

BATCHES = 100  # per epoch; 2 epochs
RUN = [
    f"trainer.limit_train_batches={BATCHES}",
    "epochs=2",
    "latent_dim=16",
    "+logger.tensorboard.max_queue=1",
    "callbacks=[model_checkpoint,samples,progress_bar]",  # progress_bar: FAST drops it again
    "threads=1",
]  # on a CPU shared with other test runs, 2 threads each thrash


def run_args(run_dir: Path, *extra: str) -> list[str]:
    return [*FAST, *RUN, f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run is compared with."""
    run_dir = tmp_path_factory.mktemp("rundir") / "uninterrupted"
    train_run(run_dir, *RUN)
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    """metrics.json as the uninterrupted run's (every key), and TensorBoard's curves with each step once."""
    resumed_metrics, expected = read_metrics(run_dir), read_metrics(reference)
    assert resumed_metrics.keys() == expected.keys()
    for key in expected:
        assert resumed_metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    acc, ref = event_accumulator(run_dir), event_accumulator(reference)
    for tag in ["train/loss", "val/loss"]:
        assert [e.step for e in acc.Scalars(tag)] == [e.step for e in ref.Scalars(tag)], tag
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([e.value for e in ref.Scalars(tag)], rel=1e-5), tag
    assert (
        [e.step for e in logged_images(acc, "samples")]
        == [e.step for e in logged_images(ref, "samples")]
        == [2 * BATCHES]  # pictures where validation runs: every 5 epochs and in the last
    )
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(4, 2 * BATCHES, 5))


def paused(run_dir: Path, stage: str = "train", epoch: int = 1, batch: int = 5) -> subprocess.Popen:
    """A run held at a batch (tests/pausing.py), for a test to signal or kill it there."""
    marker = run_dir.parent / f"{run_dir.name}.paused"
    proc = start(*run_args(run_dir, *pause_at(marker, stage, epoch, batch)), log=run_dir.parent / run_dir.name, env=PAUSING_ENV)
    wait_for(marker, proc)
    return proc


def resume(run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(str(run_dir), "~callbacks.pause", *extra, tool="vaelab-resume", check=check)


# --- killed at any moment, resumed to the same figures -------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    run_dir = tmp_path / "killed"
    proc = paused(run_dir)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == BATCHES
    resumed = resume(run_dir)
    assert "Checkpoint directory" not in resumed.stdout + resumed.stderr  # its own checkpoints/: no warning about them
    assert_same_as_reference(run_dir, reference)
    # the run's original .hydra record is kept; the resume's own is beside it
    assert "latent_dim=16" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    [record] = list((run_dir / ".hydra").glob("resume-*"))
    assert (record / "overrides.yaml").read_text().strip() == "- ~callbacks.pause"


def test_killed_before_its_first_checkpoint_starts_again_in_place(tmp_path, reference):
    run_dir = tmp_path / "early"
    proc = paused(run_dir, epoch=0, batch=30)
    proc.kill()
    proc.wait(timeout=60)
    assert not (run_dir / "checkpoints").exists() and list((run_dir / "tensorboard").glob("events.*"))
    resume(run_dir)
    assert_same_as_reference(run_dir, reference)  # what the killed run logged is purged, each step appears once


def test_killed_in_its_test_stage_resumes_to_every_key(tmp_path, reference):
    run_dir = tmp_path / "in-test"
    proc = paused(run_dir, stage="test", batch=1)
    proc.kill()
    proc.wait(timeout=60)
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "best-epoch001.ckpt").exists()
    resume(run_dir)
    assert_same_as_reference(run_dir, reference)


def test_a_moved_run_resumes_from_its_own_checkpoints(tmp_path, reference):
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    proc = paused(first)
    proc.kill()
    proc.wait(timeout=60)
    moved.parent.mkdir()
    shutil.move(first, moved)  # the checkpoint remembers `first`, which is gone
    resume(moved)
    assert_same_as_reference(moved, reference)
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]
    assert not first.exists()


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_and_say_how_to_continue(tmp_path, reference, signum, code):
    run_dir = tmp_path / signal.Signals(signum).name
    proc = paused(run_dir)
    proc.send_signal(signum)
    done = finished(proc, run_dir.parent / run_dir.name)
    line = one_line(done, f"vaelab-train: interrupted: stopped by {signal.Signals(signum).name} in epoch 1 at step ", code=code)
    assert line.endswith(
        f"the event files are flushed and the last checkpoint is {run_dir}/checkpoints/last.ckpt "
        f"(end of epoch 0, step {BATCHES}); continue with: vaelab-resume {run_dir}"
    )
    assert not (run_dir / "metrics.json").exists()  # an interrupted run has no final figures
    assert "stopped by" in (run_dir / "train.log").read_text()
    if signum == signal.SIGINT:
        resume(run_dir)
        assert_same_as_reference(run_dir, reference)


# A Ctrl-C that lands inside an import can leave a module half made, and what surfaces is another error: in CI a
# SIGINT at 1.0 s broke numpy's import under scipy (via torchmetrics) and ended in a RecursionError traceback.
CTRL_C_BECOMES_ANOTHER_ERROR = """
import os, signal, sys, time
from vaelab.errors import exit_cleanly
with exit_cleanly("vaelab-train"):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except BaseException:  # the stop, caught on its way by a library that then fails
        raise RecursionError("maximum recursion depth exceeded") from None
"""


def test_a_ctrl_c_that_surfaces_as_another_error_is_still_the_ctrl_c():
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_BECOMES_ANOTHER_ERROR],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=default_signals,
    )
    one_line(proc, "vaelab-train: interrupted: stopped by SIGINT before training started", code=130)


CTRL_C_AT_AN_IMPORT = """
import os, signal, sys
module, tool, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]

class CtrlC:  # Ctrl-C pressed just as `module` is first looked for
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
import vaelab.commands.cli
getattr(vaelab.commands.cli, {"vaelab-train": "train", "vaelab-eval": "evaluate"}[tool])()
"""


@pytest.mark.parametrize(
    "module",
    [
        "numpy._utils",  # imported by torch's C++, which swallows the KeyboardInterrupt and goes on without numpy
        "numpy._core.printoptions",  # leaves numpy half imported: torch's import fails with another error
        "torch.nn.functional",
    ],
)
def test_ctrl_c_at_any_import_of_start_up_stops_the_run(tmp_path, module):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "-c", CTRL_C_AT_AN_IMPORT, module, "vaelab-train", *FAST, f"hydra.run.dir={run_dir}", tool="python", check=False
    )
    one_line(proc, "vaelab-train: interrupted: stopped by SIGINT before training started", code=130)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


CTRL_C_INSIDE_TORCHS_IMPORT = """
import os, signal, sys
marker, sys.argv = sys.argv[1], sys.argv[1:]

class CtrlC:  # Ctrl-C pressed as torch imports torch.distributed (whose C++ set-up a raised stop would abort)
    def find_spec(self, name, path=None, target=None):
        if name == "torch.distributed":
            os.kill(os.getpid(), signal.SIGINT)
        if name == "vaelab.model.priors":  # imported after torch, near the end of the command's import: it went on
            open(marker, "w").close()

sys.meta_path.insert(0, CtrlC())
import vaelab.commands.cli
vaelab.commands.cli.train()
"""


def test_a_ctrl_c_inside_torchs_import_is_held_until_the_import_ends(tmp_path):
    """A stop raised inside torch's import can cross C++ that cannot pass it on: the process aborted with a C++
    traceback once (SIGINT 1 s after start). The first stop is held while the command's module is imported
    (vaelab.errors.held), then ends the run in one line."""
    run_dir, marker = tmp_path / "run", tmp_path / "imported-on"
    proc = run_cli("-c", CTRL_C_INSIDE_TORCHS_IMPORT, str(marker), *FAST, f"hydra.run.dir={run_dir}", tool="python", check=False)
    one_line(proc, "vaelab-train: interrupted: stopped by SIGINT before training started", code=130)
    assert marker.exists() and not (run_dir / "checkpoints").exists()


def test_a_swallowed_ctrl_c_stops_vaelab_eval_before_it_writes(tmp_path, reference):
    out = tmp_path / "eval"
    proc = run_cli(
        "-c", CTRL_C_AT_AN_IMPORT, "numpy._utils", "vaelab-eval", f"ckpt_path={reference / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={out}", tool="python", check=False,
    )  # fmt: skip
    one_line(proc, "vaelab-eval: interrupted: stopped by SIGINT before any result was written", code=130)
    assert not (out / "eval.json").exists()


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6, 1.0])
def test_ctrl_c_in_the_first_second(tmp_path, delay):
    proc = start(*FAST, f"hydra.run.dir={tmp_path / 'run'}", log=tmp_path / "run", env={})
    import time

    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    done = finished(proc, tmp_path / "run")
    one_line(done, "vaelab-train: interrupted: stopped by SIGINT", code=130)


def test_a_full_disk_while_resuming_keeps_the_last_checkpoint(tmp_path, reference):
    """A file-size limit (ulimit -f) below a checkpoint's size: the resumed run trains epoch 1, fails to write its
    checkpoint, and the epoch-0 one stays whole."""
    run_dir = tmp_path / "full"
    proc = paused(run_dir)
    proc.kill()
    proc.wait(timeout=60)
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    limit_kib = len(before) // 1024 // 2
    done = run_with_file_limit(limit_kib, str(run_dir), "~callbacks.pause", tool="vaelab-resume")
    line = one_line(done, f"vaelab-resume: error: cannot write {run_dir}/")
    assert "File too large. Everything written before is kept" in line and line.endswith(f"vaelab-resume {run_dir}")
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no half-written file left behind


# --- a refused resume changes nothing ------------------------------------------------------------------------

REFUSED = [
    (["epochs=0"], "epochs=0 is not allowed"),
    (["latent_dim=8"], "holds a different network: encoder.heads.weight is [32, 784] in the checkpoint but [16, 784]"),
    (["model=conv"], "model=conv: the run was built from its own model config, which a resume cannot swap"),
    (["hydra.run.dir=/tmp/elsewhere"], "cannot be combined with hydra.run.dir"),
    (["ckpt_path=/tmp/x.ckpt"], "cannot be combined with ckpt_path"),
    (["+model.latent_dim=3"], "the run's saved config has model.latent_dim already; drop the +"),
    (["-m"], "cannot be combined with -m"),
]


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path, reference):
    """Every refusal in turn on one copy of a run: each leaves it byte for byte as it was, so a later resume is
    not affected by any of them."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.json").unlink()  # so that it has something left to do
    before = snapshot(run_dir)
    for extra, says in REFUSED:
        proc = run_cli(str(run_dir), *extra, tool="vaelab-resume", check=False)
        assert says in one_line(proc, "vaelab-resume: error: "), extra
        assert snapshot(run_dir) == before, extra
    run_cli(str(run_dir), "trainer.limit_test_batches=1", tool="vaelab-resume")
    assert read_metrics(run_dir).keys() == read_metrics(reference).keys()


def test_a_reference_has_nothing_left_to_do(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    proc = run_cli(str(run_dir), tool="vaelab-resume", check=False)
    line = one_line(proc, f"vaelab-resume: note: {run_dir} has nothing left to do: it trained 2 epochs", code=0)
    assert line.endswith(f"to train it further: vaelab-resume {run_dir} epochs=<more>")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "damage,says",
    [
        (lambda p: p.write_text("{{{ not yaml"), "its saved config"),
        (lambda p: p.write_text("- a list\n"), "is not a vaelab-train config"),
        (
            lambda p: p.write_text(p.read_text().replace("latent_dim: 16", "latent_dim: sixteen")),
            "latent_dim='sixteen' is not allowed",
        ),
    ],
)
def test_a_damaged_saved_config_is_named(tmp_path, reference, damage, says):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    damage(run_dir / ".hydra" / "config.yaml")
    before = snapshot(run_dir)
    proc = run_cli(str(run_dir), tool="vaelab-resume", check=False)
    assert says in one_line(proc, "vaelab-resume: error: ")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("target,says", [("missing", "no such directory"), ("empty", "is not a vaelab-train run directory")])
def test_resuming_something_that_is_not_a_run(tmp_path, target, says):
    (tmp_path / "empty").mkdir()
    proc = run_cli(str(tmp_path / target), tool="vaelab-resume", check=False)
    assert says in one_line(proc, f"vaelab-resume: error: {tmp_path / target}")


def test_a_resume_cannot_be_swept(tmp_path, reference):
    proc = run_cli("-m", f"{reference},{reference}", f"hydra.sweep.dir={tmp_path / 'sweep'}", tool="vaelab-resume", check=False)
    assert "cannot be combined with -m" in one_line(proc, f"vaelab-resume: error: {reference},{reference}")
    assert not (tmp_path / "sweep").exists()


def test_vaelab_train_sends_a_resume_to_vaelab_resume(tmp_path):
    """resume_from= is no longer a setting: one line naming the command that continues the run, nothing written."""
    run_dir = tmp_path / "a run"
    proc = run_cli(f"resume_from={run_dir}", "epochs=3", check=False, cwd=tmp_path)
    line = one_line(proc, f"vaelab-train: error: resume_from={run_dir} is no longer a setting: ")
    assert line.endswith(f"run vaelab-resume '{run_dir}'") and list(tmp_path.iterdir()) == []
    proc = run_cli("", tool="vaelab-resume", check=False, cwd=tmp_path)
    one_line(proc, "vaelab-resume: error: RUN_DIR='' is empty; name the run directory to continue, e.g. vaelab-resume ")
    usage = run_cli("--help", tool="vaelab-resume", cwd=tmp_path).stdout
    assert "usage: vaelab-resume [-h] RUN_DIR [key=value ...]" in usage and "vaelab-resume outputs/" in usage


def test_two_resumes_of_one_run_at_once(tmp_path, reference):
    run_dir = tmp_path / "busy"
    proc = paused(run_dir)
    proc.kill()
    proc.wait(timeout=60)
    marker = tmp_path / "again.paused"
    first = start(
        str(run_dir),
        f"callbacks.pause.marker={marker}",
        "callbacks.pause.batch=20",
        tool="vaelab-resume",
        log=tmp_path / "first",
        env=PAUSING_ENV,
    )
    wait_for(marker, first)
    second = run_cli(str(run_dir), "~callbacks.pause", tool="vaelab-resume", check=False)
    one_line(second, f"vaelab-resume: error: {run_dir} is in use by another vaelab command right now")
    first.kill()
    first.wait(timeout=60)


def test_a_checkpoint_of_another_run_starts_a_new_run_from_it(tmp_path, reference):
    run_dir = tmp_path / "new"
    train_run(run_dir, *RUN, f"ckpt_path={reference / 'checkpoints' / 'best-epoch001.ckpt'}", "epochs=3")
    metrics = read_metrics(run_dir)
    assert metrics["val/loss"] < read_metrics(reference)["val/loss"] + 5  # it went on from the reference's weights
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-epoch002.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]


# --- the pieces, in-process ------------------------------------------------------------------------------------


def _claim(base: str) -> str:
    return str(claim(Path(base), unique=True, setting="hydra.run.dir"))


def test_concurrent_claims_of_one_name_get_distinct_directories(tmp_path):
    base = tmp_path / "outputs" / "2026-12-01" / "12-00-00"
    with multiprocessing.get_context("fork").Pool(8) as pool:
        claimed = pool.map(_claim, [str(base)] * 16)
    assert len(set(claimed)) == 16
    assert sorted(p.name for p in base.parent.iterdir()) == sorted(["12-00-00", *(f"12-00-00-{n}" for n in range(2, 17))])


def _hold(path: str, ready, release) -> None:
    lock(Path(path))
    ready.set()
    release.wait(30)


def test_a_locked_directory_is_refused_to_a_second_process(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(UserError, match="is in use by another vaelab command right now"):
        lock(tmp_path)
    release.set()
    holder.join(30)
    lock(tmp_path)
    lock(tmp_path)  # again from the same process: no-op
    assert list(tmp_path.iterdir()) == []  # the lock is on the directory itself: no file added


def saved_run(root: Path) -> Path:
    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(
            {
                "epochs": 2,
                "latent_dim": 16,
                "paths": {"output_dir": "${hydra:runtime.output_dir}"},
                "model": {"latent_dim": "${latent_dim}", "encoder": {"x": 1}},
                "trainer": {"max_epochs": "${epochs}"},
                "callbacks": {"pause": {"a": 1}, "samples": {"b": 2}},
                "resume_from": None,
            }
        ),
        root / ".hydra" / "config.yaml",
    )
    return root


def test_the_resumed_config_is_the_saved_one_with_the_overrides(tmp_path):
    run = saved_run(tmp_path / "run")
    cfg = resumed(run, ["epochs=5", "~callbacks.pause", "+trainer.gradient_clip_val=1.0"])
    assert cfg.trainer.max_epochs == 5 and "pause" not in cfg.callbacks and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.paths.output_dir == str(run) and cfg.model.latent_dim == 16
    assert "resume_from" not in cfg  # a retired setting, in configs saved before vaelab-resume
    for overrides, says in [
        (["model=conv"], "which a resume cannot swap"),
        (["nosuch=1"], "has no setting nosuch"),
        (["epochs=1,2"], "cannot sweep"),
    ]:
        with pytest.raises(UserError, match=says):
            resumed(run, overrides)
    # the next resume starts from the last one's record
    record_resume(run, cfg, ["epochs=5"])
    assert resumed(run, []).trainer.max_epochs == 5
    record_resume(run, resumed(run, ["epochs=7"]), ["epochs=7"])  # a second record in the same second gets its own name
    assert resumed(run, []).trainer.max_epochs == 7 and len(list((run / ".hydra").glob("resume-*"))) == 2


def test_the_purge_step_forgets_what_was_logged_after_the_checkpoint(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        for step in range(10):
            writer.add_scalar("x", step, step)
    assert first_step_logged_after(tmp_path, ResumePoint(path=None)) == 0  # no checkpoint: everything goes
    assert first_step_logged_after(tmp_path, ResumePoint(path=tmp_path / "c", step=4, saved_at=0.0)) == 4
    assert first_step_logged_after(tmp_path, ResumePoint(path=tmp_path / "c", step=4, saved_at=2e9)) is None
    assert first_step_logged_after(tmp_path / "none", ResumePoint(path=None)) is None


def test_atomic_write_is_whole_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write(target, "old\n")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError) as err:
        atomic_write(target, "new\n")
    assert err.value.filename == str(target) and target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
