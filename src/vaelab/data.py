"""Fashion-MNIST / MNIST (and KMNIST) from their IDX files, and other torchvision image datasets by name, as
in-memory tensors, batched by slicing (no per-sample Python). (A folder of the user's own images: image_folder.py.)

data.binarize: `none` keeps the 256 grey levels in [0, 1]; `dynamic` makes each training image a fresh Bernoulli
sample of its grey levels every epoch, while the validation and test images are binarized once with a fixed
seed (stable figures across epochs and runs); `static` binarizes every split once.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch

from vaelab.errors import UserError, one_line
from vaelab.files import atomic_write

log = logging.getLogger(__name__)

# (file stem, IDX magic number, shape after the header) for each split and kind.
IDX_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte", 2051, (60000, 28, 28)),
    ("train", "labels"): ("train-labels-idx1-ubyte", 2049, (60000,)),
    ("test", "images"): ("t10k-images-idx3-ubyte", 2051, (10000, 28, 28)),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", 2049, (10000,)),
}
BINARIZE = ("none", "dynamic", "static")  # none: grey levels; dynamic: training images re-drawn each epoch
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
            images = self.images[batch]
            yield (torch.bernoulli(images, generator=generator) if generator else images), self.labels[batch]


class TensorData(pl.LightningDataModule):
    """A data module whose three splits are held as tensors (images in [0, 1], [N, C, H, W]; int64 labels) on the
    device training runs on, batched by TensorBatches. Subclasses implement `load` (and may download in
    `prepare_data`); binarization, devices, batches and DDP shares are here."""

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
        super().__init__()
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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        device = self._device()
        splits = [(x.to(device), y.to(device)) for x, y in self.load()]
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

    def _device(self) -> torch.device:
        # Hold the data where training runs (the GPU when there is one): batches then need no copy.
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _batches(self, tensors, shuffle: bool, batch_size: int, binarize: bool = False) -> TensorBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
        return TensorBatches(
            *tensors,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.seed,
            epoch_fn=epoch_fn,
            rank=rank,
            world_size=world,
            binarize=binarize,
        )

    def train_dataloader(self) -> TensorBatches:
        return self._batches(self.train_set, shuffle=True, batch_size=self.batch_size, binarize=self.binarize == "dynamic")

    def val_dataloader(self) -> TensorBatches:
        return self._batches(self.val_set, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches(self.test_set, shuffle=False, batch_size=self.eval_batch_size)


class MNISTLike(TensorData):
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
        binarize: str = "none",
    ):
        super().__init__(batch_size, eval_batch_size, seed, binarize, image_shape, split_seed)
        self.dataset, self.data_dir, self.system_dir, self.download = dataset, data_dir, system_dir, download
        self.val_size = val_size

    @property
    def classes(self) -> list[str] | None:
        """torchvision's names for the classes of this dataset (e.g. FashionMNIST.classes), or None."""
        import torchvision.datasets  # imported here: slow to import, and only the pictures need the names

        dataset = getattr(torchvision.datasets, self.dataset, None)
        return list(dataset.classes) if dataset is not None and hasattr(dataset, "classes") else None

    def prepare_data(self) -> None:
        locate(self.data_dir, self.dataset, self.system_dir, self.download)

    def load(self):
        raw_dir = locate(self.data_dir, self.dataset, self.system_dir, download=False)
        images, labels = load_split(raw_dir, "train")
        order = seeded_order(len(images), self.split_seed)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx]), load_split(raw_dir, "test")


TORCHVISION_CACHE_VERSION = 1
# torchvision datasets known to hold their images as one array (the others read image files: data=image_folder)
ARRAY_DATASETS = ("CIFAR10", "CIFAR100", "FashionMNIST", "KMNIST", "MNIST", "QMNIST", "STL10", "SVHN")


class TorchvisionData(TensorData):
    """Another torchvision image dataset by name (CIFAR10, SVHN, KMNIST, ...): downloaded by torchvision on first use
    (download=true), converted once into uint8 tensors, `<data_dir>/<dataset>/vaelab-<dataset>.pt`, which later runs
    load in a second (weights-only: no pickle); the train split is split into train/val with a fixed generator.

    torchvision reads its own files: CIFAR's are pickles, which torchvision opens only after each file's MD5 matches
    the published checksum, so only the genuine files are unpickled, once; the MNIST family are IDX files, SVHN
    MATLAB files. Datasets whose images are files on disk (CelebA, Flowers102, ...) are for data=image_folder.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        binarize: str = "none",
    ):
        super().__init__(batch_size, eval_batch_size, seed, binarize, image_shape, split_seed)
        self.dataset, self.data_dir, self.download, self.val_size = dataset, data_dir, download, val_size
        self.source = torchvision_class(dataset)  # an unknown name is refused here, before any work
        self._tensors: dict | None = None

    def cache_path(self) -> Path:
        return Path(self.data_dir) / self.dataset / f"vaelab-{self.dataset}.pt"

    def root(self) -> Path:
        """torchvision's root for this dataset: the MNIST family put themselves in <root>/<name>/raw, the others are
        given their own <data_dir>/<name> folder."""
        import torchvision.datasets as tvd

        return Path(self.data_dir) if issubclass(self.source, tvd.MNIST) else Path(self.data_dir) / self.dataset

    def prepare_data(self) -> None:
        """Download (download=true) and convert once, on one process; under DDP the other ranks then load the cache."""
        if self.train_set is None:
            self.tensors(self.download)

    def tensors(self, download: bool) -> dict:
        """{"train": (uint8 images [N, C, H, W], int64 labels), "test": (...), "classes": names or None}: the cache,
        or torchvision's files converted (and cached)."""
        if self._tensors is None:
            self._tensors = self.read_cache() or self.convert(download)
        return self._tensors

    def read_cache(self) -> dict | None:
        path = self.cache_path()
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            ok = data.get("version") == TORCHVISION_CACHE_VERSION and all(
                isinstance(data[s][0], torch.Tensor)
                and data[s][0].dtype == torch.uint8
                and data[s][0].dim() == 4
                and isinstance(data[s][1], torch.Tensor)
                and data[s][1].shape == data[s][0].shape[:1]
                for s in ("train", "test")
            )
        except Exception as err:  # a truncated or foreign file: converted again
            ok, data = False, f"{type(err).__name__}: {one_line(err)[:200]}"
        if not ok:
            log.warning(
                "data: the cache %s is damaged (%s); converting torchvision's files again",
                path,
                data if isinstance(data, str) else "unexpected content",
            )
            return None
        return data

    def convert(self, download: bool) -> dict:
        root = self.root()
        data = {"version": TORCHVISION_CACHE_VERSION, "classes": None}
        for split in ("train", "test"):
            dataset = open_torchvision(self.source, self.dataset, root, split, download)
            data[split] = as_tensors(dataset, self.dataset)
            data["classes"] = data["classes"] or (list(dataset.classes) if hasattr(dataset, "classes") else None)
        buffer = io.BytesIO()
        torch.save(data, buffer)
        path = self.cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, buffer.getvalue())
            log.info("data: %s converted into the cache %s", self.dataset, path)
        except OSError as err:  # a read-only copy still trains: it is converted again next time
            log.warning(
                "data: cannot write the cache %s (%s); %s is converted again in every run", path, err.strerror, self.dataset
            )
        return data

    def class_names(self) -> list[str] | None:
        if self.train_set is not None:
            return self.classes
        return self.tensors(self.download)["classes"]  # read (or converted) once: load() then takes the same tensors

    def load(self):
        data = self.tensors(download=False)
        self.classes = data["classes"]
        (images, labels), (test_images, test_labels) = data["train"], data["test"]
        shape = tuple(images.shape[1:])
        if shape != self.image_shape:
            raise UserError(
                f"{self.dataset}'s images are [{','.join(map(str, shape))}] (channels, height, width) but "
                f"data.image_shape=[{','.join(map(str, self.image_shape))}]: set data.image_shape=[{','.join(map(str, shape))}]"
            )
        if not 0 < self.val_size < len(images):
            raise UserError(
                f"data.val_size={self.val_size} is not allowed for {self.dataset}: it has {len(images)} training images; "
                f"e.g. data.val_size={min(5000, len(images) // 10)}"
            )
        order = seeded_order(len(images), self.split_seed)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        as_float = lambda x: x.to(torch.float32).div_(255.0)
        self._tensors = None  # the float tensors are kept by TensorData; the uint8 copy can go
        return (
            (as_float(images[train_idx]), labels[train_idx]),
            (as_float(images[val_idx]), labels[val_idx]),
            (as_float(test_images), test_labels),
        )


def torchvision_class(name: str) -> type:
    """torchvision.datasets.<name>, when it is an image dataset class vaelab can hold as tensors; else one line."""
    import torchvision.datasets as tvd

    source = getattr(tvd, str(name), None)
    if not (isinstance(source, type) and issubclass(source, tvd.VisionDataset)):
        raise UserError(
            f"data.dataset={name!r} is not a torchvision dataset: choose one of {', '.join(ARRAY_DATASETS)} "
            "(e.g. data=cifar10), or data=image_folder data.path=<dir> for a folder of images"
        )
    return source


def open_torchvision(source: type, name: str, root: Path, split: str, download: bool):
    """torchvision's dataset object for one split, every failure as one line naming the folder and the fix."""
    import inspect

    parameters = inspect.signature(source.__init__).parameters
    if "train" in parameters:
        kwargs = {"train": split == "train"}
    elif "split" in parameters:
        kwargs = {"split": split}
    else:
        raise UserError(
            f"data.dataset={name}: torchvision's {name} has no train and test split that vaelab knows how to ask for; "
            f"choose one of {', '.join(ARRAY_DATASETS)}, or export its images and use data=image_folder"
        )
    try:
        return source(root=str(root), download=download, **kwargs)
    except ImportError as err:
        raise UserError(f"torchvision needs the package {err.name} to read {name}: pip install {err.name}") from None
    except Exception as err:  # URLError, RuntimeError (not found, checksum), OSError: one line either way
        reason = f"{type(err).__name__}: {one_line(err)[:200]}"
        if download:
            raise UserError(
                f"downloading {name} with torchvision into {root} failed ({reason}); check the connection, or put "
                f"torchvision's files for {name} in {root}"
            ) from None
        raise UserError(
            f"{name} not found in {root} (torchvision: {reason}); download it once with data.download=true "
            f"(needs the internet), or put torchvision's files for {name} there"
        ) from None


def as_tensors(dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's whole array of images as uint8 [N, C, H, W] and its labels as int64 [N]."""
    import numpy as np

    images, labels = getattr(dataset, "data", None), getattr(dataset, "targets", getattr(dataset, "labels", None))
    images = torch.as_tensor(np.asarray(images)) if images is not None else None
    if images is None or images.dtype != torch.uint8 or images.dim() not in (3, 4) or labels is None:
        raise UserError(
            f"torchvision's {name} does not hold its images as one uint8 array: use one of {', '.join(ARRAY_DATASETS)}, "
            "or export its images into a folder and use data=image_folder data.path=<dir>"
        )
    if images.dim() == 3:  # [N, H, W]: grey
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # [N, H, W, C] (CIFAR)
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(labels)).long()
    if labels.dim() == 2:  # QMNIST: the class and extra columns
        labels = labels[:, 0]
    return images.contiguous(), labels
