"""Checkpoints written whole or not at all (the trainer's checkpoint IO plugin, conf/trainer/*.yaml)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from vaelab.files import atomic_write


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
