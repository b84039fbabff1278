"""Lightning's view of a vaelab.data source: its splits on the device training runs on, this rank's share of the
batches, each epoch's order from the trainer's epoch counter."""

from __future__ import annotations

import pytorch_lightning as pl

from vaelab.data.tensors import TensorBatches, TensorData


class LightningData(pl.LightningDataModule):
    """`data`: the plain source (vaelab.data.*); the pictures read its splits as `trainer.datamodule.data`."""

    def __init__(self, data: TensorData):
        super().__init__()
        self.data = data

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage, self.trainer.strategy.root_device if self.trainer is not None else "cpu")

    def _batches(self, split: str) -> TensorBatches:
        trainer = self.trainer
        if trainer is None:
            return self.data.batches(split)
        return self.data.batches(split, trainer.global_rank, trainer.world_size, lambda: trainer.current_epoch)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train")

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test")
