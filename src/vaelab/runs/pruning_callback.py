"""The Lightning side of Optuna pruning (vaelab.runs.pruning says how a sweep prunes): `callbacks.optuna_pruning`."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl

from vaelab.runs import pruning

log = logging.getLogger(__name__)


class OptunaPruning(pl.Callback):
    """Reports each epoch's val/nelbo (val/recon + val/kl) to this sweep job's Optuna trial, step = the epoch (from 0),
    and stops training at that epoch's end when `pruner` says the trial is hopeless (never at the last epoch: it ends
    there anyway). Outside a sweep that prunes (a single run, a resume, another sweeper) it does nothing. Under DDP
    rank 0 reports and decides for every rank."""

    def __init__(self, pruner) -> None:
        self.pruner = pruner  # an optuna.pruners.BasePruner (checked by vaelab.runs.pruning.check before the sweep)
        self.trial: pruning.JobTrial | None = None
        self.active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.trial = pruning.this_job(self.pruner) if trainer.is_global_zero else None
        self.active = bool(trainer.strategy.broadcast(self.trial is not None))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active or trainer.sanity_checking:
            return
        prune, epoch = False, trainer.current_epoch
        if self.trial is not None:
            value = pruning.epoch_figure(trainer.callback_metrics)
            if math.isfinite(value) and epoch not in self.trial.reports:  # NaN: FiniteLoss stops a diverged run
                prune = self.trial.report(value, epoch)
                prune = prune and not (trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs)
        if not trainer.strategy.broadcast(prune):
            return
        trainer.should_stop = True  # the epoch ends as usual: its checkpoint and events are written whole
        trainer.limit_test_batches = 0  # a hopeless trial's test figures are not worth a pass over the test set
        if self.trial is not None:
            self.trial.pruned(epoch + 1)
            log.info("Optuna pruned this trial after %d epoch(s): val/nelbo %.4f", epoch + 1, value)
