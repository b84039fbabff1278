"""The training budget (vaelab.training.budget), in-process on tiny Trainers: the one warning line of a run that plans
too few optimizer steps, with the count Lightning then really steps and the settings that would reach the budget;
none for a run at the budget or with the warning switched off; the setting as conf declares it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from conftest import dense_vae
from vaelab.data.image_folder import ImageFolder
from vaelab.data.tensors import TensorBatches
from vaelab.errors import UserError
from vaelab.runs.settings import check
from vaelab.training.budget import TrainingBudget, planned_steps
from vaelab.training.data import LightningData

SILENCE = "callbacks.training_budget.min_steps=null silences this"


@pytest.fixture
def warnings(caplog):
    """The budget's warning lines (and nothing it logs at another level)."""
    caplog.set_level(logging.INFO, logger="vaelab.training.budget")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "vaelab.training.budget"]


def fit(budget: TrainingBudget, images: int, batch_size: int, tmp_path, **trainer) -> pl.Trainer:
    """A dense VAE trained on `images` 4x4 images in batches of batch_size; the trainer after fit."""
    x = torch.rand(images, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    batches = TensorBatches(x, torch.zeros(images, dtype=torch.int64), batch_size=batch_size, shuffle=True)
    run = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[budget],
        default_root_dir=tmp_path,
        **trainer,
    )
    run.fit(dense_vae(), train_dataloaders=batches)
    return run


def test_a_short_run_warns_once_with_its_steps_and_the_epochs_that_reach_the_budget(tmp_path, warnings):
    trainer = fit(TrainingBudget(min_steps=20), images=40, batch_size=10, tmp_path=tmp_path, max_epochs=2)
    assert trainer.global_step == 8  # what the line says is what ran: 2 epochs of 4 batches
    assert warnings() == [
        "training budget: 8 optimizer steps planned (2 epochs x 4 steps: 40 training images in batches of 10), fewer "
        "than the 20 a VAE typically needs before its reconstructions look like its inputs "
        f"(callbacks.training_budget.min_steps): set epochs=5; {SILENCE}"
    ]


def test_a_large_batch_is_offered_a_smaller_one(tmp_path, warnings):
    """80 images in batches of 40: 2 steps an epoch; in batches of 32, 3 (the last one of 16 images)."""
    trainer = fit(TrainingBudget(min_steps=20), images=80, batch_size=40, tmp_path=tmp_path, max_epochs=3)
    assert trainer.global_step == 6
    (line,) = warnings()
    assert line.startswith("training budget: 6 optimizer steps planned (3 epochs x 2 steps: 80 training images in batches of 40)")
    assert line.endswith(f"set epochs=10, or batch_size=32 epochs=7; {SILENCE}")


def test_accumulated_batches_and_max_steps_are_counted_as_lightning_steps(tmp_path, warnings):
    """4 batches an epoch, a step every 3 and one for the remainder: 2 steps an epoch; 5 epochs, cut at max_steps=7."""
    trainer = fit(TrainingBudget(min_steps=20), 40, 10, tmp_path, max_epochs=5, max_steps=7, accumulate_grad_batches=3)
    assert trainer.global_step == 7
    (line,) = warnings()
    assert line.startswith("training budget: 7 optimizer steps planned (5 epochs x 2 steps: 40 training images")
    assert line.endswith(f"set epochs=10 trainer.max_steps=20; {SILENCE}")


def test_limited_batches_are_counted_and_no_smaller_batch_is_offered(tmp_path, warnings):
    trainer = fit(TrainingBudget(min_steps=20), 80, 40, tmp_path, max_epochs=3, limit_train_batches=1)
    assert trainer.global_step == 3
    (line,) = warnings()
    assert line.startswith("training budget: 3 optimizer steps planned (3 epochs x 1 step")
    assert line.endswith(f"set epochs=20; {SILENCE}")


@pytest.mark.parametrize("min_steps", [8, None])
def test_a_run_at_the_budget_or_with_the_warning_off_says_nothing(tmp_path, warnings, min_steps):
    trainer = fit(TrainingBudget(min_steps=min_steps), images=40, batch_size=10, tmp_path=tmp_path, max_epochs=2)
    assert trainer.global_step == 8 and warnings() == []


def test_an_image_folder_too_small_for_its_epochs_is_told_its_steps(tmp_path, warnings):
    """Through the data vaelab-train builds: 50 PNGs split 40/5/5, in batches of 16: 3 steps an epoch."""
    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 4, 4), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image, "L").save(folder / f"{i:02d}.png")
    data = ImageFolder(str(folder), data_dir=str(tmp_path), image_size=4, image_shape=(1, 4, 4), workers=1, batch_size=16)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[TrainingBudget(min_steps=100)],
        default_root_dir=tmp_path,
    )
    trainer.fit(dense_vae(), datamodule=LightningData(data))
    assert trainer.global_step == 6
    (line,) = warnings()
    assert line.startswith("training budget: 6 optimizer steps planned (2 epochs x 3 steps: 40 training images in batches of 16)")
    assert line.endswith(f"set epochs=34; {SILENCE}")


def test_the_default_run_is_within_the_budget_and_the_setting_is_checked(compose):
    cfg = compose([])
    budget = cfg.callbacks.training_budget
    assert budget._target_ == "vaelab.training.budget.TrainingBudget" and isinstance(budget.min_steps, int)
    # Fashion-MNIST: 55,000 training images in batches of 128 are 430 steps an epoch; 10 epochs
    assert planned_steps(430, 1, cfg.trainer.max_epochs, cfg.trainer.max_steps) == (4300, 430)
    assert 4300 >= budget.min_steps
    check(compose(["callbacks.training_budget.min_steps=null"]), "train")
    with pytest.raises(UserError) as err:
        check(compose(["callbacks.training_budget.min_steps=0"]), "train")
    assert str(err.value) == (
        "callbacks.training_budget.min_steps=0 is not allowed: callbacks.training_budget.min_steps must be a positive "
        "integer or null (null: no warning), e.g. callbacks.training_budget.min_steps=2000"
    )


def test_planned_steps_by_hand():
    assert planned_steps(4, 1, 15, -1) == (60, 4)  # the 560 photos: 448 in batches of 128, 15 epochs
    assert planned_steps(14, 1, 143, -1) == (2002, 14)  # in batches of 32
    assert planned_steps(10, 4, 3, -1) == (9, 3)  # 4 + 4 + a remainder of 2
    assert planned_steps(10, 1, 3, 25) == (25, 10)
    assert planned_steps(10, 1, -1, 500) == (500, 10)
    assert planned_steps(10, 1, -1, -1)[0] == float("inf")
