"""The bad-input battery, from the shell: every bad value, damaged data and checkpoints, kills and resumes,
a forced NaN, an unwritable and a full output directory. Each must end with one clear line (no traceback)
and lose nothing already written.

The runs here keep the checkpoint callbacks and one picture callback, `samples`, to check that pictures
continue across a resume (all five pictures cost about 0.6-0.9 s more per run). They write each event to
disk at once (max_queue=1: the signals below wait for steps of epoch 1 on disk) and have epochs of 100
batches: long enough to signal a run in the middle of its second epoch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, DATA_DIR, FAST, REPO, event_accumulator, read_metrics, run_cli, train_run

BATCHES = 100  # per epoch; 2 epochs
RUN = [f"trainer.limit_train_batches={BATCHES}", "epochs=2", "latent_dim=16", "+logger.tensorboard.max_queue=1",
       "callbacks=[model_checkpoint,resumable,samples,progress_bar]",  # progress_bar: FAST drops it again
       "threads=1"]  # on a CPU shared with other test runs, 2 threads each thrash (measured ~1.5-2.5x slower)


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def assert_one_clear_line(proc: subprocess.CompletedProcess, start: str) -> str:
    """Non-zero exit, no traceback, and stderr ending in the one line that explains it."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    line = last_line(proc.stderr)
    assert line.startswith(start), proc.stderr[-3000:]
    return line


def logged_steps(run_dir: Path) -> list[int]:
    """Every step in the run's event files as they are on disk (no purging): what a killed run left."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        steps += [e.step for e in EventFileLoader(str(path)).Load() if e.summary.value and e.summary.value[0].tag == "train/loss"]
    return steps


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """vaelab-train in the background (output to files, so a full pipe never blocks it)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR), "PYTHONUNBUFFERED": "1"}
    out = open(run_dir.parent / f"{run_dir.name}.out", "w")
    err = open(run_dir.parent / f"{run_dir.name}.err", "w")
    return subprocess.Popen([str(BIN / "vaelab-train"), *FAST, *RUN, f"hydra.run.dir={run_dir}", *overrides],
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=REPO)


def signal_mid_epoch(proc: subprocess.Popen, run_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """Send `signum` once epoch 0's checkpoint exists and steps of epoch 1 have reached the event file."""
    deadline = time.monotonic() + 240
    while not ((run_dir / "checkpoints" / "last.ckpt").exists() and max(logged_steps(run_dir), default=0) >= BATCHES):
        assert proc.poll() is None, f"the run ended before it could be signalled mid-epoch ({proc.returncode})"
        assert time.monotonic() < deadline, "no checkpoint of epoch 0 within 240 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    stdout = (run_dir.parent / f"{run_dir.name}.out").read_text()
    stderr = (run_dir.parent / f"{run_dir.name}.err").read_text()
    assert not (run_dir / "checkpoints" / "best-epoch001.ckpt").exists()  # it really stopped inside epoch 1
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run is compared with."""
    run_dir = tmp_path_factory.mktemp("reliability") / "uninterrupted"
    train_run(run_dir, *RUN)
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    """metrics.json as the uninterrupted run's, and TensorBoard's curves with each step once, none missing."""
    resumed, expected = read_metrics(run_dir), read_metrics(reference)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert resumed[key] == pytest.approx(expected[key], rel=1e-5), key
    acc, ref = event_accumulator(run_dir), event_accumulator(reference)
    for tag in ["train/loss", "val/loss", "test/loss"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == [e.step for e in ref.Scalars(tag)], tag  # unique, ordered, contiguous like the reference
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([e.value for e in ref.Scalars(tag)], rel=1e-5), tag
    # the pictures of the checkpointed epoch (logged at the checkpoint's very step) are kept, none doubled
    assert [e.step for e in acc.Images("samples")] == [e.step for e in ref.Images("samples")] == [BATCHES, 2 * BATCHES]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(4, 2 * BATCHES, 5))


# --- kills and resumes ----------------------------------------------------------------------------------

def test_sigkill_mid_epoch_then_resume_from_matches_an_uninterrupted_run(tmp_path, reference):
    run_dir = tmp_path / "killed"
    killed = signal_mid_epoch(start(run_dir), run_dir, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    # what the kill left: a whole checkpoint of epoch 0, and steps after it in the event file
    from vaelab.resume import read_checkpoint

    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt", "last")["global_step"] == BATCHES
    assert max(logged_steps(run_dir)) >= BATCHES
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    run_cli(f"resume_from={run_dir}")
    assert_same_as_reference(run_dir, reference)
    # the run's original .hydra record is kept; the resume's own is beside it
    assert "latent_dim=16" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert len(list((run_dir / ".hydra").glob("resume-*/config.yaml"))) == 1


def test_sigint_stops_cleanly_then_ckpt_path_last_continues(tmp_path, reference):
    run_dir = tmp_path / "ctrl-c"
    proc = signal_mid_epoch(start(run_dir), run_dir, signal.SIGINT)
    assert proc.returncode == 130
    line = assert_one_clear_line(proc, "vaelab-train: interrupted: stopped by SIGINT in epoch 1 at step ")
    assert line.endswith(f"the event files are flushed and the last checkpoint is {run_dir}/checkpoints/last.ckpt "
                         f"(end of epoch 0, step {BATCHES}); continue with: vaelab-train resume_from={run_dir}")
    assert set(range(4, BATCHES, 5)) <= set(logged_steps(run_dir))  # every step the checkpoint covers is on disk
    assert not (run_dir / "metrics.json").exists()  # an interrupted run has no final figures
    # the other way to resume: the same settings in the same run directory, ckpt_path=last
    train_run(run_dir, *RUN, "ckpt_path=last")
    assert_same_as_reference(run_dir, reference)


@pytest.fixture(scope="module")
def terminated(tmp_path_factory, reference) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("reliability") / "sigterm"
    return run_dir, signal_mid_epoch(start(run_dir), run_dir, signal.SIGTERM)


def test_sigterm_stops_cleanly(terminated):
    run_dir, proc = terminated
    assert proc.returncode == 143  # 128 + SIGTERM, as a shell reports a terminated job (Lightning alone exits 0)
    assert_one_clear_line(proc, "vaelab-train: interrupted: stopped by SIGTERM in epoch 1 at step ")
    assert f"continue with: vaelab-train resume_from={run_dir}" in proc.stderr
    assert set(range(4, BATCHES, 5)) <= set(logged_steps(run_dir))


def test_a_full_disk_while_resuming_keeps_the_last_checkpoint(tmp_path, terminated):
    """A file-size limit (ulimit -f; Python ignores SIGXFSZ, so writes fail with EFBIG) below a checkpoint's size:
    the resumed run trains epoch 1, fails to write its checkpoint, and the epoch-0 one stays whole."""
    run_dir = tmp_path / "full"
    shutil.copytree(terminated[0], run_dir)
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    limit_kib = len(before) // 1024 // 2
    proc = subprocess.run(["bash", "-c", f'ulimit -f {limit_kib} && exec "$0" "$@"', str(BIN / "vaelab-train"), f"resume_from={run_dir}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL,
                          env={**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR)})
    line = assert_one_clear_line(proc, f"vaelab-train: error: cannot write {run_dir}/checkpoints/")
    assert "File too large. Everything written before is kept" in line and line.endswith(f"resume_from={run_dir}")
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no half-written file left behind


# --- guarded training -----------------------------------------------------------------------------------

def test_forced_nan_stops_at_that_step(tmp_path):
    run_dir = tmp_path / "nan"
    proc = train_run(run_dir, *RUN, "lr=1e6", check=False)
    line = assert_one_clear_line(proc, "vaelab-train: error: training loss is ")
    step = int(line.split(" at step ")[1].split()[0])
    assert f"at step {step} (epoch 0, batch {step}); training stopped there." in line
    assert "No checkpoint was written yet" in line and "trainer.gradient_clip_val=1.0" in line
    assert max(logged_steps(run_dir), default=-1) < step  # not a step more


def test_a_nan_in_a_later_epoch_names_the_last_good_checkpoint(tmp_path):
    """In-process, on real data: a weight turned NaN at step 7 of a 5-batch-epoch run."""
    import pytorch_lightning as pl
    import torch

    from vaelab.data import MNISTLike
    from vaelab.module import VAE
    from vaelab.reliability import NonFiniteLossError, Resumable

    class PoisonAtStep7(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                with torch.no_grad():
                    next(pl_module.decoder.parameters()).fill_(float("nan"))

    net = {"latent_dim": 4, "image_shape": [1, 28, 28]}
    model = VAE(encoder={"_target_": "vaelab.networks.DenseEncoder", **net}, decoder={"_target_": "vaelab.networks.DenseDecoder", **net},
                optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}, latent_dim=4)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoints, Resumable(seed=0), PoisonAtStep7()], default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(model, datamodule=MNISTLike(data_dir=str(DATA_DIR), system_dir="/usr/share/datasets/fashion-mnist", batch_size=64))
    assert str(err.value).startswith("training loss is nan at step 7 (epoch 1, batch 2); training stopped there. "
                                     f"The last checkpoint is {tmp_path}/last.ckpt (end of epoch 0, step 5).")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(tensor).all() for tensor in state.values())  # the named checkpoint is a good one


# --- bad input ------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("latent_dim=0", "latent_dim=0 is not allowed: latent_dim must be a positive integer, e.g. latent_dim=16"),
    ("epochs=-1", "epochs=-1 is not allowed: epochs must be a positive integer, e.g. epochs=10"),
    ("batch_size=2.5", "batch_size=2.5 is not allowed: batch_size must be a positive integer, e.g. batch_size=128"),
    ("noise_factor=1.5", "noise_factor=1.5 is not allowed: noise_factor must be a number in [0, 1], e.g. noise_factor=0.1"),
    ("lr=0", "lr=0 is not allowed: lr must be a number > 0, e.g. lr=1e-3"),
    ("beta=-1", "beta=-1 is not allowed: beta must be a number >= 0, e.g. beta=1.0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed: trainer.max_epochs must be a positive integer, e.g. trainer.max_epochs=10"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_value_stops_before_any_data_is_read(tmp_path, override, message):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    proc = run_cli(f"hydra.run.dir={run_dir}", override, check=False, env={"VAELAB_DATA_DIR": str(data_dir)})
    assert assert_one_clear_line(proc, "vaelab-train: error: ") == f"vaelab-train: error: {message}"
    assert not data_dir.exists()  # the data cache was not even created
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # only Hydra's record of the run
    assert message in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("override,says", [("latent_dimm=3", "Could not override 'latent_dimm'"),
                                           ("model=foo", "Could not find 'model/foo'"),
                                           ("data=cifar", "Could not find 'data/cifar'"),
                                           ("trainer=tpu", "Could not find 'trainer/tpu'")])
def test_unknown_keys_and_choices_are_refused_by_hydra(tmp_path, override, says):
    proc = run_cli(f"hydra.run.dir={tmp_path / 'run'}", override, check=False)
    assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where,says", [("file/run", "a file is in the way"), ("/proc/vaelab-test/run", "No such file or directory")])
def test_unwritable_output_dir(tmp_path, where, says):
    # Tests run as root, where chmod stops nothing: a file where a directory should be, and /proc (which
    # refuses new entries to everyone) stand in for a read-only location.
    (tmp_path / "file").write_text("keep me")
    run_dir = tmp_path / where if not where.startswith("/") else Path(where)
    proc = run_cli(f"hydra.run.dir={run_dir}", check=False)
    line = assert_one_clear_line(proc, f"vaelab-train: error: cannot write the output directory {run_dir}: {says}")
    assert line.endswith("choose a writable one with hydra.run.dir=<dir> or paths.log_dir=<dir>")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.fixture(scope="module")
def raw_files(reference) -> Path:
    """The real decompressed IDX files (the reference run has made sure the data cache exists)."""
    from vaelab.data import locate

    return locate(DATA_DIR, "FashionMNIST", None, download=False)


def damaged_copy(tmp_path: Path, raw: Path, name: str, damage) -> Path:
    """A data_dir whose FashionMNIST/raw holds the real files, one of them damaged."""
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for path in raw.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / name).unlink()
    (folder / name).write_bytes(damage((raw / name).read_bytes()))
    return tmp_path / "data"


@pytest.mark.parametrize("damage,says", [
    (lambda raw: raw[:-1], "file is 10007 bytes, expected 10008 (truncated or corrupted); delete it and run again"),
    (lambda raw: (2051).to_bytes(4, "big") + raw[4:], "IDX magic number is 2051, expected 2049; this is not the right IDX file"),
])
def test_damaged_idx_file_is_named(tmp_path, raw_files, damage, says):
    data_dir = damaged_copy(tmp_path, raw_files, "t10k-labels-idx1-ubyte", damage)
    damaged = (data_dir / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    proc = train_run(tmp_path / "run", *RUN, f"data.data_dir={data_dir}", check=False)
    assert_one_clear_line(proc, f"vaelab-train: error: {data_dir}/FashionMNIST/raw/t10k-labels-idx1-ubyte: {says}")
    assert (data_dir / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes() == damaged  # left for the user to see
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_directory(tmp_path):
    proc = train_run(tmp_path / "run", *RUN, f"data.data_dir={tmp_path / 'nowhere'}", "data.system_dir=null", check=False)
    line = assert_one_clear_line(proc, f"vaelab-train: error: FashionMNIST not found in {tmp_path}/nowhere/FashionMNIST/raw. ")
    assert "(1)" in line and "data.download=true" in line


def test_corrupted_checkpoint_is_refused_before_any_data_is_read(tmp_path, reference):
    bad = tmp_path / "last.ckpt"
    raw = (reference / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1:])
    proc = train_run(tmp_path / "run", *RUN, f"ckpt_path={bad}", check=False)
    line = assert_one_clear_line(proc, f"vaelab-train: error: ckpt_path={bad}: {bad} ({len(raw)} bytes) is truncated or damaged")
    assert "fails its CRC check" in line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_resume_from_a_run_killed_in_its_first_epoch(tmp_path):
    run_dir = tmp_path / "early"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("latent_dim: 16\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- latent_dim=16\n")
    proc = run_cli(f"resume_from={run_dir}", check=False)
    assert_one_clear_line(proc, f"vaelab-train: error: resume_from={run_dir}: nothing to continue from")
    assert last_line(proc.stderr).endswith("start it again: vaelab-train latent_dim=16")
