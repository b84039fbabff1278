"""Fashion-MNIST / MNIST as in-memory tensors, batched by slicing (no per-sample Python)."""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch

from vaelab.errors import UserError, one_line
from vaelab.files import atomic_write

# (file stem, IDX magic number, shape after the header) for each split and kind.
IDX_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte", 2051, (60000, 28, 28)),
    ("train", "labels"): ("train-labels-idx1-ubyte", 2049, (60000,)),
    ("test", "images"): ("t10k-images-idx3-ubyte", 2051, (10000, 28, 28)),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", 2049, (10000,)),
}
CACHE_SETTING = "data.data_dir=<dir> (or the environment variable VAELAB_DATA_DIR)"


def read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Read an uncompressed IDX file of unsigned bytes, checking its header and size."""
    fix = "delete it and run again (it is decompressed anew)"
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}); {fix}, or point {CACHE_SETTING} elsewhere") from None
    ndim = len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: file is {len(raw)} bytes, too short for an IDX header; {fix}")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise UserError(f"{path}: IDX magic number is {found_magic}, expected {magic}; this is not the right IDX file, {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != shape:
        raise UserError(f"{path}: IDX header says shape {dims}, expected {shape}; {fix}")
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise UserError(f"{path}: file is {len(raw)} bytes, expected {expected} (truncated or corrupted); {fix}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(shape)


def seeded_order(n: int, seed: int) -> torch.Tensor:
    """A permutation of range(n) that depends on the seed alone: the same in every run and on every machine."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order (and, per rank, of its noise: vaelab.guards.Resumable)."""
    return seed * 100_003 + epoch


def _raw_dir(data_dir: Path, dataset: str) -> Path:
    return Path(data_dir) / dataset / "raw"  # torchvision's layout


def _have_raw(raw_dir: Path) -> bool:
    return all((raw_dir / stem).exists() for stem, _, _ in IDX_FILES.values())


def _decompress(source: Path, target: Path) -> None:
    """One Debian .gz into the cache, whole or not at all, each fault named with its fix."""
    try:
        with gzip.open(source, "rb") as src:
            data = src.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a truncated file an EOFError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {one_line(err)}"
        raise UserError(
            f"{source}: cannot be decompressed ({reason}); reinstall it with "
            f"`apt-get install --reinstall dataset-fashion-mnist`, or put the IDX files in {CACHE_SETTING}"
        ) from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
    except OSError as err:
        raise UserError(
            f"cannot write the data cache {err.filename or target}: {err.strerror}; choose a writable place with {CACHE_SETTING}"
        ) from None


def locate(data_dir: str | Path, dataset: str, system_dir: str | None, download: bool) -> Path:
    """Return the folder holding the four uncompressed IDX files, fetching them once if needed.

    Order: data_dir (torchvision layout), the Debian package's copies in system_dir (decompressed
    here, since torchvision's md5 check rejects Debian's recompressed archives), torchvision's
    download when `download` is true.
    """
    raw_dir = _raw_dir(Path(data_dir), dataset)
    if _have_raw(raw_dir):
        return raw_dir
    if system_dir and all((Path(system_dir) / f"{stem}.gz").exists() for stem, _, _ in IDX_FILES.values()):
        for stem, _, _ in IDX_FILES.values():
            if not (raw_dir / stem).exists():
                _decompress(Path(system_dir) / f"{stem}.gz", raw_dir / stem)
        return raw_dir
    if download:
        import torchvision.datasets as tvd  # imported here: torchvision is slow to import and only needed to download

        try:
            for train in (True, False):
                getattr(tvd, dataset)(root=str(data_dir), train=train, download=True)
        except Exception as err:  # URLError, RuntimeError (checksum), OSError: all "the download failed"
            raise UserError(
                f"downloading {dataset} with torchvision failed ({type(err).__name__}: {one_line(err)[:200]}); "
                f"check the connection, or put the four IDX files in {raw_dir} (torchvision's layout)"
            ) from None
        if _have_raw(raw_dir):
            return raw_dir
    system_hint = (
        f"install Debian's package holding it (`apt-get install dataset-fashion-mnist` puts it in {system_dir})"
        if system_dir
        else "there is no system package for it"
    )
    raise UserError(
        f"{dataset} not found in {raw_dir}. Get it one of three ways: "
        f"(1) put the four IDX files there (torchvision's layout, data.data_dir=<dir>); "
        f"(2) {system_hint}; "
        f"(3) download it with torchvision: data.download=true"
    )


def load_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1] with a channel axis, labels as int64."""
    stem, magic, shape = IDX_FILES[(split, "images")]
    images = read_idx(raw_dir / stem, magic, shape)
    stem, magic, shape = IDX_FILES[(split, "labels")]
    labels = read_idx(raw_dir / stem, magic, shape)
    return images.unsqueeze(1).float().div_(255.0), labels.long()


class TensorBatches:
    """Batches sliced from tensors already on their device: one gather per batch, nothing per sample.

    Shuffling draws a permutation from (seed, epoch), so it is repeatable and resumes identically.
    Under DDP each rank takes every world_size-th index of the same permutation.
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
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.epoch_fn = batch_size, shuffle, seed, epoch_fn
        self.rank, self.world_size = rank, world_size

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
        if not self.shuffle and self.world_size == 1:  # contiguous slices need no gather
            for start in range(0, len(indices), self.batch_size):
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            return
        for batch in indices.split(self.batch_size):
            yield self.images[batch], self.labels[batch]


class MNISTLike(pl.LightningDataModule):
    """Fashion-MNIST or MNIST: 28x28 grey images in [0, 1], train split into train/val with a fixed generator."""

    def __init__(
        self,
        dataset: str = "FashionMNIST",
        data_dir: str = "data",
        system_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        image_shape: tuple[int, int, int] = (1, 28, 28),
    ):
        super().__init__()
        self.dataset, self.data_dir, self.system_dir, self.download = dataset, data_dir, system_dir, download
        self.batch_size, self.val_size, self.split_seed, self.seed = batch_size, val_size, split_seed, seed
        self.eval_batch_size = eval_batch_size
        self.image_shape = tuple(image_shape)
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        locate(self.data_dir, self.dataset, self.system_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        raw_dir = locate(self.data_dir, self.dataset, self.system_dir, download=False)
        images, labels = load_split(raw_dir, "train")
        order = seeded_order(len(images), self.split_seed)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        device = self._device()
        self.train_set = (images[train_idx].to(device), labels[train_idx].to(device))
        self.val_set = (images[val_idx].to(device), labels[val_idx].to(device))
        test_images, test_labels = load_split(raw_dir, "test")
        self.test_set = (test_images.to(device), test_labels.to(device))

    def _device(self) -> torch.device:
        # Hold the data where training runs (the GPU when there is one): batches then need no copy.
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _batches(self, tensors, shuffle: bool, batch_size: int) -> TensorBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
        return TensorBatches(
            *tensors, batch_size=batch_size, shuffle=shuffle, seed=self.seed, epoch_fn=epoch_fn, rank=rank, world_size=world
        )

    def train_dataloader(self) -> TensorBatches:
        return self._batches(self.train_set, shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> TensorBatches:
        return self._batches(self.val_set, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches(self.test_set, shuffle=False, batch_size=self.eval_batch_size)
