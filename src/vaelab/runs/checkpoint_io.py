"""How checkpoints are written: whole or not at all (the trainer's checkpoint IO plugin, conf/trainer/*.yaml), and
the best one ranked only at the end of an epoch that validated (conf/callbacks/model_checkpoint.yaml)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO

from vaelab.files import atomic_write

SPAWN_WEIGHTS = ".temp.ckpt"  # pytorch_lightning.strategies.launchers.multiprocessing's file of the workers' weights


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but a kill, a full disk or a crash at any moment leaves the previous checkpoint
    whole. (Lightning's own save goes through fsspec, whose temporary file is in the system's temp folder: moving
    it onto another file system is a copy over the target, not a rename, and it is never fsynced.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first: torch.save into a file turns a failed write (disk full) into an obscure
        # RuntimeError, a plain write gives the OSError that names the problem.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(Path(path), buffer.getbuffer())

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        # Lightning's spawn launcher (trainer=ddp) hands the weights back from its workers through
        # tempfile.mkdtemp()/.temp.ckpt and removes only the file: its folder goes too, if nothing else is in it.
        path = Path(path)
        if path.name == SPAWN_WEIGHTS and path.parent.parent == Path(tempfile.gettempdir()):
            with contextlib.suppress(OSError):  # not empty, or gone
                path.parent.rmdir()


class ValidatedCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, for validation every few epochs (trainer.check_val_every_n_epoch): where every
    validation falls at an epoch's end, the file is written at that training epoch's end, as with validation every
    epoch, so it holds a finished epoch (a run started from it begins the next one; Lightning would write it at the
    validation's end, inside the epoch); and only an epoch that validated is ranked: the figure an unvalidated epoch
    ends with is the last validation's, of other weights, which ranked again would be kept as a file of its own
    wherever save_top_k is above 1. Validation inside epochs (val_check_interval) is ranked at its end, as Lightning
    does, so the file holds the weights its figure is of."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._validated_epoch: int | None = None

    def _should_save_on_train_epoch_end(self, trainer) -> bool:
        if self._save_on_train_epoch_end is not None or trainer.check_val_every_n_epoch in (None, 1):
            return super()._should_save_on_train_epoch_end(trainer)
        return getattr(trainer, "_val_check_time_interval", None) is None and trainer.val_check_interval == 1.0

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._validated_epoch == trainer.current_epoch:
            super().on_train_epoch_end(trainer, pl_module)
