"""Fashion-MNIST / MNIST (and KMNIST) from their IDX files: Debian's dataset-fashion-mnist, a folder in torchvision's
layout, or torchvision's download, decompressed once into the data cache.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import torch

from vaelab import progress
from vaelab.data.tensors import TensorData, seeded_order
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
    return torch.frombuffer(bytearray(memoryview(raw)[header:]), dtype=torch.uint8).view(shape)  # one copy, writable


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
        missing = [stem for stem, _, _ in IDX_FILES.values() if not (raw_dir / stem).exists()]
        with progress.phase(
            f"{dataset}: decompressing {system_dir} into the data cache {raw_dir} (once)", len(missing), "file"
        ) as done:
            for stem in missing:
                _decompress(Path(system_dir) / f"{stem}.gz", raw_dir / stem)
                done.advance()
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


def read_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The IDX files' bytes: images uint8 [N, 28, 28], labels uint8 [N]."""
    stem, magic, shape = IDX_FILES[(split, "images")]
    images = read_idx(raw_dir / stem, magic, shape)
    stem, magic, shape = IDX_FILES[(split, "labels")]
    return images, read_idx(raw_dir / stem, magic, shape)


def as_tensors(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1] with a channel axis, labels as int64."""
    return images.unsqueeze(1).float().div_(255.0), labels.long()


def load_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's images as float32 in [0, 1] with a channel axis, labels as int64."""
    return as_tensors(*read_split(raw_dir, split))


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
        self.check_shape(torch.empty(0, 1, 28, 28))  # every IDX dataset here is 28x28 grey: refused before any work
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
        images, labels = read_split(raw_dir, "train")
        order = seeded_order(len(images), self.split_seed)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        # split as bytes, then converted: a quarter of the memory to gather (0.25 s a load, against 0.39-0.47 s)
        train, val = (as_tensors(images[idx], labels[idx]) for idx in (train_idx, val_idx))
        return train, val, load_split(raw_dir, "test")
