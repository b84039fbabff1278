"""A test-only Lightning callback: hold a run at a chosen moment, so a test can signal or kill it exactly there.

    vaelab-train ... +callbacks.pause._target_=pausing.Pause +callbacks.pause.stage=train +callbacks.pause.epoch=1
        +callbacks.pause.batch=5 +callbacks.pause.marker=<file>        (with tests/ on PYTHONPATH)

At that batch (in training: at its backward pass) it flushes the loggers, writes `marker` and waits (up to `seconds`) until a signal arrives.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl


class Pause(pl.Callback):
    def __init__(self, marker: str, stage: str = "train", epoch: int = 0, batch: int = 0, seconds: float = 120):
        self.marker, self.stage, self.epoch, self.batch, self.seconds = Path(marker), stage, epoch, batch, seconds

    def hold(self, trainer: pl.Trainer, batch_idx: int) -> None:
        if batch_idx != self.batch or (self.stage == "train" and trainer.current_epoch != self.epoch):
            return
        for logger in trainer.loggers:
            logger.save()
        self.marker.write_text("paused")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not trainer.received_sigterm:
            time.sleep(0.02)  # SIGINT raises KeyboardInterrupt here, as it would inside a batch

    def on_before_backward(self, trainer, pl_module, loss):
        # Per optimizer step: a call of VAEModule.training_step makes several steps (steps_per_call), and between the
        # calls' hooks Lightning's batch count (kept per batch by VAEModule) says which batch is being trained.
        if self.stage == "train":
            self.hold(trainer, trainer.fit_loop.epoch_loop.batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.stage == "test":
            self.hold(trainer, batch_idx)
