"""A test-only Lightning callback: what a run's process sees while it trains and tests, written to a JSON file.

vaelab-train ... +callbacks.probe._target_=probes.Environment +callbacks.probe.out=<file>   (tests/ on PYTHONPATH)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl


class Environment(pl.Callback):
    """CUDA_VISIBLE_DEVICES (null when unset) at the first training batch and at the first test batch."""

    def __init__(self, out: str):
        self.out, self.seen = Path(out), {}

    def record(self, stage: str) -> None:
        if stage not in self.seen:
            self.seen[stage] = os.environ.get("CUDA_VISIBLE_DEVICES")
            self.out.write_text(json.dumps(self.seen))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record("train")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.record("test")
