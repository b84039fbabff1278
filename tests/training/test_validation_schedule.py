"""Validation every few epochs (trainer.check_val_every_n_epoch, 5 in conf/trainer/cpu.yaml): the epoch a run ends in
validates too (VAEModule), the best checkpoint ranks only epochs that validated and holds a finished epoch
(vaelab.runs.checkpoint_io.ValidatedCheckpoint), last.ckpt is written every epoch, and the training is the same."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from conftest import dense_vae
from vaelab.data.tensors import TensorBatches
from vaelab.runs.checkpoint_io import ValidatedCheckpoint
from vaelab.runs.guards import Resumable

IMAGES = torch.bernoulli(torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
STEPS_AN_EPOCH = 6  # 48 training images in batches of 8


class Validations(pl.Callback):
    """The epochs that validated (sanity check aside), and each checkpoint file written: (name, epoch, batches done)."""

    def __init__(self, stop_in_epoch: int | None = None):
        self.epochs, self.saved, self.stop_in_epoch = [], [], stop_in_epoch

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.stop_in_epoch and batch_idx >= 2:  # the call of batches 2 and 3
            trainer.should_stop = True  # as early stopping or max_time would ask


def fit(tmp_path, every: int | None, max_epochs: int = 7, stop_in_epoch=None, **settings):
    torch.manual_seed(0)
    module = dense_vae()
    module.steps_per_call = 2
    train = TensorBatches(IMAGES[:48], torch.zeros(48), batch_size=8, shuffle=True)
    val = TensorBatches(IMAGES[48:], torch.zeros(16), batch_size=8, shuffle=False)
    seen = Validations(stop_in_epoch)
    best = ValidatedCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        save_top_k=-1,
    )
    last = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        check_val_every_n_epoch=every,
        num_sanity_val_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[seen, best, last, Resumable(seed=0)],  # as vaelab-train: each epoch's draws seeded at its start
        **settings,
    )
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return module, trainer, seen


def finished_epochs(path) -> tuple[int, int, int]:
    """A checkpoint's epoch, the batches its loop state says were completed in it, and the epochs it says were
    processed (the epoch counts once its training end has run: after its validation, not at it)."""
    checkpoint = torch.load(path, weights_only=True)
    loop = checkpoint["loops"]["fit_loop"]
    batches = loop["epoch_loop.batch_progress"]["current"]["completed"]
    return checkpoint["epoch"], batches, loop["epoch_progress"]["current"]["processed"]


def test_every_third_epoch_validates_and_so_does_the_last_with_the_same_training(tmp_path):
    module, trainer, seen = fit(tmp_path / "every3", every=3)
    assert seen.epochs == [2, 5, 6]  # epochs 3 and 6 counted from 1, and the last
    assert trainer.check_val_every_n_epoch == 3  # the last epoch's exception is undone
    files = sorted(p.name for p in (tmp_path / "every3" / "checkpoints").iterdir())
    assert files == ["best-epoch002.ckpt", "best-epoch005.ckpt", "best-epoch006.ckpt", "last.ckpt"]
    for name, epoch in [("best-epoch002.ckpt", 2), ("best-epoch005.ckpt", 5), ("last.ckpt", 6)]:
        # written at the training epoch's end: every batch of the epoch completed, not inside it
        assert finished_epochs(tmp_path / "every3" / "checkpoints" / name) == (epoch, STEPS_AN_EPOCH, epoch + 1)
    every_epoch, _, seen_every = fit(tmp_path / "every1", every=1)
    assert seen_every.epochs == list(range(7))
    for mine, theirs in zip(module.parameters(), every_epoch.parameters(), strict=True):
        # validating less changes nothing of the training (validation's draws come from the global RNG, which
        # Resumable reseeds at every epoch's start)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_stop_asked_for_in_an_epoch_without_validation_validates_it(tmp_path):
    _, trainer, seen = fit(tmp_path, every=3, stop_in_epoch=1)
    assert seen.epochs == [1] and trainer.current_epoch == 2 and trainer.global_step == STEPS_AN_EPOCH + 4
    assert (tmp_path / "checkpoints" / "best-epoch001.ckpt").exists()


def test_max_steps_at_an_epochs_end_validates_it(tmp_path):
    _, trainer, seen = fit(tmp_path, every=3, max_epochs=10, max_steps=2 * STEPS_AN_EPOCH)
    assert seen.epochs == [1] and trainer.global_step == 2 * STEPS_AN_EPOCH


@pytest.mark.parametrize(
    ("overrides", "every"),
    [
        ([], 5),
        (["trainer=gpu"], 5),
        (["experiment=notebook"], 1),  # its pinned figures were measured validating every epoch
        (["experiment=fmnist_density"], 1),  # the reference's early stopping counts epochs
        (["experiment=fmnist_density_vamp"], 1),
        (["hparams_search=optuna"], 1),  # the pruner's steps are epochs
    ],
)
def test_the_configs_validation_intervals(compose, overrides, every):
    cfg = compose(overrides)
    assert cfg.trainer.check_val_every_n_epoch == every
    assert cfg.callbacks.model_checkpoint._target_ == "vaelab.runs.checkpoint_io.ValidatedCheckpoint"
    assert cfg.callbacks.last_checkpoint.save_on_train_epoch_end is True
