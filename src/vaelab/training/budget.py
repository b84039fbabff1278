"""The training budget in optimizer steps: one warning line when a run plans too few for a VAE to learn
(conf/callbacks/training_budget.yaml).

A small folder of images makes few batches: 448 training images in batches of 128 are 4 optimizer steps an epoch, so
15 epochs are 60 steps. Measured on 560 32x32 crops of photos (docs/data.md), a convolutional VAE decodes every
input to the same dark square after 60 steps, to a patch of its mean colour after 500, and to its layout and colours
after 2,000 (its best validation -ELBO came at 1,652-2,156 steps, then it overfits). The default Fashion-MNIST run
plans 10 x 430 = 4,300 steps."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from vaelab.data.tensors import TensorBatches

log = logging.getLogger(__name__)
SETTING = "callbacks.training_budget.min_steps"
SMALL_BATCH = 32  # the smaller batch the warning offers (more steps per epoch; what the measured example used)


def planned_steps(batches: int, accumulate: int, max_epochs: int, max_steps: int) -> tuple[float, int]:
    """(the optimizer steps a run plans, the steps of one epoch), as Lightning counts them
    (Trainer.estimated_stepping_batches): an epoch of `batches` steps every `accumulate` batches and once more for a
    remainder; max_epochs -1 and max_steps -1 mean no limit."""
    per_epoch = math.ceil(batches / accumulate)
    total = math.inf if max_epochs == -1 else per_epoch * max_epochs
    return (total if max_steps == -1 else min(total, max_steps)), per_epoch


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


class TrainingBudget(Callback):
    """Warns once, as training starts (the batches of an epoch are known only then), when the run plans fewer than
    `min_steps` optimizer steps (None: never), with the settings that would reach it."""

    def __init__(self, min_steps: int | None = 2000):
        self.min_steps = min_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.min_steps is None or not trainer.is_global_zero or trainer.fast_dev_run:
            return
        batches = trainer.num_training_batches
        if not batches or batches == math.inf:  # no training, or an endless stream: no epoch to count
            return
        total, per_epoch = planned_steps(batches, trainer.accumulate_grad_batches, trainer.max_epochs, trainer.max_steps)
        if total < self.min_steps:
            log.warning("%s", self.warning(trainer, int(total), per_epoch))

    def warning(self, trainer: pl.Trainer, total: int, per_epoch: int) -> str:
        need, max_epochs, max_steps = self.min_steps, trainer.max_epochs, trainer.max_steps
        epochs = f"epochs={math.ceil(need / per_epoch)}" if max_epochs != -1 and per_epoch * max_epochs < need else None
        steps = f"trainer.max_steps={need}" if max_steps != -1 and max_steps < need else None
        data, smaller_batch = self.data_and_smaller_batch(trainer, need)
        fix = " ".join(filter(None, (epochs, steps)))
        if epochs and smaller_batch:
            fix += ", or " + " ".join(filter(None, (smaller_batch, steps)))
        plan = f"{count(max_epochs, 'epoch')} x {count(per_epoch, 'step')}" if max_epochs != -1 else "trainer.max_steps"
        return (
            f"training budget: {total:,} optimizer steps planned ({plan}{data}), fewer than the {need:,} a VAE typically "
            f"needs before its reconstructions look like its inputs ({SETTING}): set {fix}; {SETTING}=null silences this"
        )

    @staticmethod
    def data_and_smaller_batch(trainer: pl.Trainer, need: int) -> tuple[str, str]:
        """(`: <n> training images in batches of <b>`, `batch_size=32 epochs=<e>` when a batch of 32 makes more steps
        an epoch), from vaelab's batches; nothing for other loaders, or when trainer.limit_train_batches caps them."""
        loader = trainer.train_dataloader
        if not isinstance(loader, TensorBatches):
            return "", ""
        images = len(loader.images) // loader.world_size  # this rank's share, as TensorBatches slices it
        data = f": {images:,} training images in batches of {loader.batch_size}"
        limit = trainer.limit_train_batches  # an int is a number of batches (1: one), a float a fraction (1.0: all)
        if loader.batch_size <= SMALL_BATCH or not (limit is None or (isinstance(limit, float) and limit == 1.0)):
            return data, ""
        _, per_epoch = planned_steps(math.ceil(images / SMALL_BATCH), trainer.accumulate_grad_batches, 1, -1)
        return data, f"batch_size={SMALL_BATCH} epochs={math.ceil(need / per_epoch)}"
