"""Guards while training: checkpoints that survive a kill, runs that resume exactly, stops that say why.

- AtomicCheckpointIO writes each checkpoint beside its target and renames it into place.
- Resumable (a callback) makes a resumed run continue as the uninterrupted one would have.
- check_finite stops training at the first non-finite loss; interruptions() turns Lightning's handling of
  Ctrl-C and SIGTERM into one TrainingInterrupted error that says how to continue.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import math
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vaelab.validate import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file in its own folder, fsync it, then rename it over the target.

    A kill, a full disk or a crash at any moment leaves the previous checkpoint whole. (Lightning's own save
    goes through fsspec, whose temporary file is in the system's temp folder: moving it onto another file
    system is a copy over the target, not a rename, and it is never fsynced.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first (as Lightning does): torch.save into a file turns a failed write (disk full)
        # into an obscure RuntimeError, a plain write gives the OSError that names the problem.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            # os.open with 0o666: the file gets the usual permissions (umask applied), like a plain open()
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                temporary.unlink()
            if isinstance(err, OSError):  # name the checkpoint, not the temporary file
                raise OSError(err.errno, err.strerror, str(path)) from None
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 100_003 + epoch) * 1_000 + rank


class Resumable(pl.Callback):
    """What a run needs so that, resumed from an epoch-end checkpoint, it continues exactly as it would have.

    - The global RNG (the reparameterisation noise, the noisy inputs) is reseeded from (seed, epoch, rank) at
      every epoch start, so an epoch does not depend on what ran before it in the process (a fresh start, the
      sanity check, image callbacks). The data order is already a function of (seed, epoch) (TensorBatches).
    - The loggers are flushed whenever a checkpoint is written: a SIGKILL then loses no logged step that the
      checkpoint covers; the checkpoint records when it was written, so a resumed run can tell the events
      logged after it, which it writes again (see vaelab.resume).
    - It remembers the epoch and step of the last checkpoint written or loaded, for the error messages.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.checkpoint_epoch: int | None = None
        self.checkpoint_step: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()
        checkpoint["saved_at"] = time.time()  # events newer than this are the ones a resumed run writes again
        self.checkpoint_epoch, self.checkpoint_step = checkpoint.get("epoch"), checkpoint.get("global_step")

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_epoch, self.checkpoint_step = checkpoint.get("epoch"), checkpoint.get("global_step")


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint a resumed run would continue from (checkpoints/last.ckpt), if one was written."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path if path and Path(path).exists() else None


def describe_last_checkpoint(trainer: pl.Trainer) -> str:
    """'the last checkpoint is <path> (end of epoch E, step S)', or that there is none yet."""
    path = last_checkpoint(trainer)
    if path is None:
        return "no checkpoint was written yet (the first is written at the end of epoch 0)"
    resumable = next((c for c in trainer.callbacks if isinstance(c, Resumable)), None)
    if resumable is None or resumable.checkpoint_epoch is None:
        return f"the last checkpoint is {path}"
    return f"the last checkpoint is {path} (end of epoch {resumable.checkpoint_epoch}, step {resumable.checkpoint_step})"


def destroy_process_group_at_exit() -> None:
    """Destroy this process's torch.distributed group when it exits (once per process).

    Lightning does this for NCCL only. A gloo group left to the interpreter's shutdown can abort a ddp_spawn
    worker ("terminate called without an active exception") after its work is done, which fails the run.
    """
    global _destroy_registered
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not _destroy_registered:
        atexit.register(_destroy_process_group)
        _destroy_registered = True


_destroy_registered = False


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; training stopped at that step."""


def check_finite(loss: torch.Tensor, trainer: pl.Trainer, what: str = "training loss", batch_idx: int | None = None) -> None:
    """Raise NonFiniteLossError if `loss` is NaN or infinite. One .item() (a host sync on a GPU): about
    0.2 us on the CPU, where torch.isfinite would take 5 (benchmarks/reliability_overhead.py)."""
    value = loss.item()
    if math.isfinite(value):
        return
    where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})" if batch_idx is not None \
        else f"the end of epoch {trainer.current_epoch} (step {trainer.global_step})"
    fix = "lower the learning rate (lr=...) or clip gradients (trainer.gradient_clip_val=1.0), and start again"
    checkpoint = describe_last_checkpoint(trainer)
    raise NonFiniteLossError(f"{what} is {value} at {where}; training stopped there. "
                             f"{checkpoint[0].upper()}{checkpoint[1:]}. To fix: {fix}")


class TrainingInterrupted(UserError):
    """Training was stopped by a signal; the exit status is 128 + the signal number, as a shell reports it."""

    stops_sweep = True

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def interruptions(trainer: pl.Trainer, run_dir: Path) -> Iterator[None]:
    """Turn Lightning's end of an interrupted fit/test into TrainingInterrupted.

    Lightning handles both signals itself: on Ctrl-C it calls the on_exception hooks, closes (flushes) the
    loggers and calls sys.exit(1); on SIGTERM it finishes the current batch, then raises SIGTERMException (a
    SystemExit with status 0) and does the same. Both would hide that the run was interrupted.
    """
    try:
        yield
    except SystemExit as exit_:
        if isinstance(exit_, SIGTERMException):
            signum = signal.SIGTERM
        elif isinstance(exit_.__context__, KeyboardInterrupt):
            signum = signal.SIGINT
        else:
            raise
        how = f"continue with: vaelab-train resume_from={run_dir}" if last_checkpoint(trainer) \
            else "nothing to continue from: start the run again"
        raise TrainingInterrupted(signum, (
            f"stopped by {signal.Signals(signum).name} in epoch {trainer.current_epoch} at step {trainer.global_step}; "
            f"the event files are flushed and {describe_last_checkpoint(trainer)}; {how}")) from None
