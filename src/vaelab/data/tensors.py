"""Image data held as in-memory tensors, batched by slicing (no per-sample Python): the base of every data source
(Fashion-MNIST and MNIST: mnist.py; other torchvision datasets: torchvision.py; a folder of images: image_folder.py).

data.binarize: `none` keeps the 256 grey levels in [0, 1]; `dynamic` makes each training image a fresh Bernoulli
sample of its grey levels every epoch, while the validation and test images are binarized once with a fixed
seed (stable figures across epochs and runs); `static` binarizes every split once.

Plain Python and torch: vaelab.training.data gives a source to Lightning (devices, DDP ranks, epochs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from vaelab.choices import BINARIZE
from vaelab.errors import UserError

log = logging.getLogger(__name__)


def seeded_order(n: int, seed: int) -> torch.Tensor:
    """A permutation of range(n) that depends on the seed alone: the same in every run and on every machine."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order (and, per rank, of its noise: vaelab.runs.guards.Resumable)."""
    return seed * 100_003 + epoch


class TensorBatches:
    """Batches sliced from tensors already on their device: one gather per batch, nothing per sample.

    Shuffling draws a permutation from (seed, epoch), so it is repeatable and resumes identically.
    Under DDP each rank takes every world_size-th index of the same permutation. binarize=True draws each
    batch's pixels as Bernoulli samples of their grey levels (dynamic binarization), from a generator seeded
    by (seed, epoch, rank): a fresh binary image every epoch, the same ones on a resume.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        epoch_fn: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        binarize: bool = False,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.epoch_fn = batch_size, shuffle, seed, epoch_fn
        self.rank, self.world_size, self.binarize = rank, world_size, binarize

    def _indices(self) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            order = seeded_order(n, epoch_seed(self.seed, self.epoch_fn()))
        else:
            order = torch.arange(n)
        per_rank = n // self.world_size  # equal shares, so DDP ranks step in lockstep
        return order[self.rank :: self.world_size][:per_rank].to(self.images.device)

    def __len__(self) -> int:
        return -(-(len(self.images) // self.world_size) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()
        if not self.shuffle and self.world_size == 1 and not self.binarize:  # contiguous slices need no gather
            for start in range(0, len(indices), self.batch_size):
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            return
        generator = None
        if self.binarize:
            seed = epoch_seed(self.seed, self.epoch_fn()) * 1_000 + 500 + self.rank  # apart from the noise's seeds
            generator = torch.Generator(device=self.images.device).manual_seed(seed)
        for batch in indices.split(self.batch_size):
            # index_select: the same gather as images[batch], in 40% of its time on the CPU (13.5 against 34 us at
            # batch 32, 52 against 118 us at batch 128, Fashion-MNIST's training split, one thread)
            images = self.images.index_select(0, batch)
            labels = self.labels.index_select(0, batch)
            yield (torch.bernoulli(images, generator=generator) if generator else images), labels


class TensorData:
    """A data source whose three splits are held as tensors (images in [0, 1], [N, C, H, W]; int64 labels) on one
    device, batched by TensorBatches. Subclasses implement `load` (and may download in `prepare_data`);
    binarization and batches are here."""

    classes: list[str] | None = None  # class names by label, when the data has them

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        seed: int = 0,
        binarize: str = "none",
        image_shape: tuple[int, int, int] = (1, 28, 28),
        split_seed: int = 0,
    ):
        if binarize not in BINARIZE:
            raise ValueError(f"data.binarize={binarize!r} is not one of {BINARIZE}")
        self.batch_size, self.eval_batch_size, self.seed, self.binarize = batch_size, eval_batch_size, seed, binarize
        self.split_seed = split_seed  # fixes the split and the binarization of the evaluation images
        self.image_shape = tuple(image_shape)
        self.train_set = self.val_set = self.test_set = None

    def load(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(train, val, test), each (images float [0, 1], labels int64), on the CPU."""
        raise NotImplementedError

    def class_names(self) -> list[str] | None:
        """The class names by label, before the data is set up (a conditional VAE is built with them), or None."""
        return self.classes

    def prepare_data(self) -> None:
        """Anything to fetch or convert once before `setup` (on one process under DDP)."""

    def setup(self, stage: str | None = None, device: torch.device | str = "cpu") -> None:
        """Load the splits onto `device` (where training runs: batches then need no copy), binarized as asked."""
        if self.train_set is not None:
            return
        splits = [(x.to(device), y.to(device)) for x, y in self.load()]
        self.check_shape(splits[0][0])
        self.train_set, self.val_set, self.test_set = splits
        if self.binarize != "none":  # fixed binary images: the same figures every epoch, every run, and both modes
            for offset, split in enumerate(("train", "val", "test")):
                if split != "train" or self.binarize == "static":
                    x, y = getattr(self, f"{split}_set")
                    generator = torch.Generator(device=x.device).manual_seed(self.split_seed * 1_000 + 7 + offset)
                    setattr(self, f"{split}_set", (torch.bernoulli(x, generator=generator), y))
            log.info(
                "data.binarize=%s: %s; validation and test images binarized once (seeded), and so are the pictures' images",
                self.binarize,
                "each training image a fresh Bernoulli draw every epoch"
                if self.binarize == "dynamic"
                else "every split binarized once",
            )

    def check_shape(self, images: torch.Tensor) -> None:
        """The images are what data.image_shape says (the networks are built for that shape), or one line."""
        shape, name = tuple(images.shape[1:]), getattr(self, "dataset", type(self).__name__)
        if shape != self.image_shape:
            text = lambda dims: "[" + ",".join(map(str, dims)) + "]"  # noqa: E731
            raise UserError(
                f"data.image_shape={text(self.image_shape)} does not match {name}'s images, which are {text(shape)} "
                f"(channels, height, width): set data.image_shape={text(shape)}, or leave it as the data config sets it"
            )

    def batches(self, split: str, rank: int = 0, world_size: int = 1, epoch_fn: Callable[[], int] = lambda: 0) -> TensorBatches:
        """One split's batches: training shuffled by (seed, epoch) and dynamically binarized when asked; validation and
        test in order, in batches of eval_batch_size. Under DDP, rank `rank`'s share of `world_size`."""
        train = split == "train"
        return TensorBatches(
            *getattr(self, f"{split}_set"),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            epoch_fn=epoch_fn,
            rank=rank,
            world_size=world_size,
            binarize=train and self.binarize == "dynamic",
        )
