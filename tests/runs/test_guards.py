"""The guards every run gets: a non-finite loss stops training naming the last good checkpoint, from the logged
window (no host sync per step) or the validation loss; the RNG is reseeded per epoch and before the test."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from conftest import DATA_DIR, dense_vae, one_line, train_run
from vaelab.data.mnist import MNISTLike
from vaelab.errors import UserError
from vaelab.runs.guards import for_run
from vaelab.training.data import LightningData
from vaelab.training.module import VAEModule


class PoisonAtStep(pl.Callback):
    """Turns a decoder weight NaN before the given step: the loss is NaN from that step on."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.vae.decoder.parameters()).fill_(float("nan"))


def small_vae() -> VAEModule:
    return dense_vae(4, (1, 28, 28), lr=1e-3)


def fit_poisoned(tmp_path, log_every_n_steps: int):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=5,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        default_root_dir=tmp_path,
        callbacks=[checkpoints, *for_run(seed=0), PoisonAtStep(7)],
    )
    with pytest.raises(UserError) as err:
        trainer.fit(
            small_vae(),
            datamodule=LightningData(
                MNISTLike(data_dir=str(DATA_DIR), system_dir="/usr/share/datasets/fashion-mnist", batch_size=64)
            ),
        )
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(tensor).all() for tensor in state.values())  # the named checkpoint is a good one
    return str(err.value)


def test_a_nan_in_a_logging_window_stops_training_there(tmp_path):
    message = fit_poisoned(tmp_path, log_every_n_steps=2)
    assert message.startswith(
        "training loss is nan in steps 6-7 (epoch 1, the logging window ending at batch 2); "
        f"training stopped at step 8. The last checkpoint is {tmp_path}/last.ckpt (end of epoch 0, step 5)."
    )
    assert "lower the learning rate (lr=...) or clip gradients (trainer.gradient_clip_val=1.0)" in message


def test_a_nan_between_windows_is_caught_before_the_epochs_checkpoint(tmp_path):
    message = fit_poisoned(tmp_path, log_every_n_steps=50)  # no window closes in these 5-batch epochs
    assert message.startswith(
        "validation loss is nan at the end of epoch 1 (step 10); training stopped there. "
        f"The last checkpoint is {tmp_path}/last.ckpt (end of epoch 0, step 5)."
    )


def test_a_forced_nan_from_the_shell(tmp_path):
    run_dir = tmp_path / "nan"
    proc = train_run(run_dir, "lr=1e6", "epochs=1", check=False)
    line = one_line(proc, "vaelab-train: error: training loss is nan in steps 0-4 (epoch 0")
    assert "No checkpoint was written yet" in line and "trainer.gradient_clip_val=1.0" in line
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logged = [
        e.step
        for path in (run_dir / "tensorboard").glob("events.*")
        for e in EventFileLoader(str(path)).Load()
        if e.summary.value and e.summary.value[0].tag == "train/loss"
    ]
    assert logged == []  # the NaN window never reached TensorBoard
    assert "training loss is nan" in (run_dir / "train.log").read_text()


def test_last_ckpt_is_the_last_epoch_even_past_the_best_one(tmp_path):
    """Lightning's save_last writes last.ckpt only in an epoch that saves a best file; vaelab's last_checkpoint
    callback writes it every epoch, so a resume continues from the epoch a run stopped at, not from its best.
    mode=max makes epoch 0 the best (val/loss falls in early epochs), so epoch 1 saves no best file."""
    run_dir = tmp_path / "run"
    train_run(
        run_dir, "epochs=2", "callbacks.model_checkpoint.mode=max", "test_after_fit=false", "trainer.check_val_every_n_epoch=1"
    )
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert torch.load(checkpoints / "best-epoch000.ckpt", weights_only=True)["epoch"] == 0
    # last.ckpt records the best checkpoint of its own epoch, for the resumed run's test
    best_state = next(v for k, v in last["callbacks"].items() if "val/loss" in k)
    assert best_state["best_model_path"] == str(checkpoints / "best-epoch000.ckpt")
