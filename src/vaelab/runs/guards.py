"""Guards while training, as Lightning callbacks that every vaelab-train run gets (`for_run`):

- Resumable: a run resumed from an epoch-end checkpoint continues exactly as the uninterrupted one would have.
- FiniteLoss: training stops at the first non-finite logged training loss or validation loss, naming the
  last good checkpoint. It reads the logged values (one host sync per logging window, not per step).
- ProcessGroupTeardown: under DDP each rank's process group is destroyed at exit.
`interruptions()`: while a trainer fits or tests, SIGTERM is Lightning's (vaelab.errors' signal policy), and a stop by
either signal ends as an Interrupted that says where training stopped and how to continue.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vaelab.data.tensors import epoch_seed
from vaelab.errors import Interrupted, UserError, deferred

CHECKPOINT_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


class Resumable(pl.Callback):
    """- The global RNG (reparameterisation noise, noisy inputs) is reseeded from (seed, epoch, rank) at every
      epoch start, and before the test, so an epoch or the test does not depend on what ran before it in the
      process (a resume that only tests, a fresh start, the sanity check).
    - The loggers are flushed whenever a checkpoint is written, and the checkpoint records when (events newer
      than that are what a resumed run writes again) and the epoch's val/* figures (a resume that finds nothing
      left to fit reports them).
    - Loading a checkpoint of this run's own checkpoint folder, the checkpoint callback's paths are moved to
      where the folder is now (a copied or moved run keeps its own best checkpoint); a checkpoint from another
      folder starts a new run, so its best-checkpoint record is not taken over.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.checkpoint_epoch: int | None = None
        self.checkpoint_step: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(epoch_seed(self.seed, trainer.current_epoch) * 1_000 + trainer.global_rank)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(epoch_seed(self.seed, -1) * 1_000 + trainer.global_rank)  # "epoch -1": the test

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()
        checkpoint["saved_at"] = time.time()
        checkpoint["val_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.checkpoint_epoch, self.checkpoint_step = checkpoint.get("epoch"), checkpoint.get("global_step")

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_epoch, self.checkpoint_step = checkpoint.get("epoch"), checkpoint.get("global_step")
        states = checkpoint.get("callbacks") or {}
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if not isinstance(state, dict) or not callback.dirpath or state.get("dirpath") == callback.dirpath:
                continue
            if trainer.ckpt_path and Path(trainer.ckpt_path).resolve().parent == Path(callback.dirpath).resolve():
                old, new = str(state["dirpath"]), callback.dirpath
                state.update({k: _moved(state.get(k), old, new) for k in CHECKPOINT_PATHS if k in state}, dirpath=new)
                state["best_k_models"] = {_moved(k, old, new): v for k, v in (state.get("best_k_models") or {}).items()}
            else:
                del states[callback.state_key]


def _moved(path: str | None, old: str, new: str) -> str | None:
    """A path under the checkpoint folder's old place, in its new place."""
    return str(Path(new) / Path(path).name) if path and str(path).startswith(old) else path


class FiniteLoss(pl.Callback):
    """Stop at a non-finite training loss (checked on each logged window of log_every_n_steps steps, before it
    reaches the loggers) or validation loss (before the epoch's checkpoint is written)."""

    FIX = "lower the learning rate (lr=...) or clip gradients (trainer.gradient_clip_val=1.0), and start again"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        window = trainer.log_every_n_steps
        if trainer.global_step % window == 0 and "train/loss" in trainer.callback_metrics:
            value = float(trainer.callback_metrics["train/loss"])  # the window's mean, logged this step
            if not math.isfinite(value):
                first = max(trainer.global_step - window, 0)
                self.stop(
                    trainer,
                    f"training loss is {value} in steps {first}-{trainer.global_step - 1} "
                    f"(epoch {trainer.current_epoch}, the logging window ending at batch {batch_idx}); "
                    f"training stopped at step {trainer.global_step}",
                )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None and not math.isfinite(float(loss)):
            self.stop(
                trainer,
                f"validation loss is {float(loss)} at the end of epoch {trainer.current_epoch} "
                f"(step {trainer.global_step}); training stopped there",
            )

    def stop(self, trainer: pl.Trainer, what: str) -> None:
        checkpoint = describe_last_checkpoint(trainer)
        raise UserError(f"{what}. {checkpoint[0].upper()}{checkpoint[1:]}. To fix: {self.FIX}")


class ProcessGroupTeardown(pl.Callback):
    """Lightning destroys NCCL process groups only; a gloo group left to the interpreter's shutdown can abort a
    ddp_spawn worker ("terminate called without an active exception") after its work is done."""

    registered = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and not ProcessGroupTeardown.registered:
            atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
            ProcessGroupTeardown.registered = True


def for_run(seed: int) -> list[pl.Callback]:
    return [Resumable(seed), FiniteLoss(), ProcessGroupTeardown()]


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint a resumed run would continue from (checkpoints/last.ckpt, else the newest), if one was written."""
    paths = [Path(p) for c in trainer.checkpoint_callbacks for p in (c.last_model_path, c.best_model_path) if p]
    found = [p for p in paths if p.exists()]
    return str(max(found, key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))) if found else None


def describe_last_checkpoint(trainer: pl.Trainer) -> str:
    """'the last checkpoint is <path> (end of epoch E, step S)', or that there is none yet."""
    path = last_checkpoint(trainer)
    if path is None:
        return "no checkpoint was written yet (the first is written at the end of epoch 0)"
    resumable = next((c for c in trainer.callbacks if isinstance(c, Resumable)), None)
    if resumable is None or resumable.checkpoint_epoch is None:
        return f"the last checkpoint is {path}"
    return f"the last checkpoint is {path} (end of epoch {resumable.checkpoint_epoch}, step {resumable.checkpoint_step})"


@contextlib.contextmanager
def interruptions(trainer: pl.Trainer, run_dir: Path) -> Iterator[None]:
    """SIGTERM is left to Lightning, which finishes the batch, flushes and raises SIGTERMException (a SystemExit with
    status 0); SIGINT is the policy's Interrupted, or where the policy is not installed (a sweep's worker) Python's
    KeyboardInterrupt, which Lightning turns into exit status 1. Each ends here as Interrupted, saying how to go on."""
    try:
        with deferred(signal.SIGTERM):
            yield
    except (SystemExit, Interrupted) as stop:
        if isinstance(stop, SIGTERMException):
            signum = signal.SIGTERM
        elif isinstance(stop, Interrupted):
            signum = stop.exit_code - 128
        elif isinstance(stop.__context__, KeyboardInterrupt):
            signum = signal.SIGINT
        else:
            raise
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} in epoch {trainer.current_epoch} at step "
            f"{trainer.global_step}; the event files are flushed and {describe_last_checkpoint(trainer)}; "
            f"continue with: vaelab-resume {shlex.quote(str(run_dir))}",
            signum,
        ) from None
