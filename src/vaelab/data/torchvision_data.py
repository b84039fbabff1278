"""Other torchvision image datasets by name (CIFAR10, SVHN, KMNIST, ...), converted once into a tensor cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vaelab import caches
from vaelab.data.tensors import TensorData, seeded_order
from vaelab.errors import UserError, one_line

log = logging.getLogger(__name__)

# version 2: keyed by torchvision's files (version 1: not keyed)
CACHE = caches.Cache("torchvision", 2, log, "data: the cache", "converting torchvision's files again")
SCHEMA = {  # images [N, C, H, W] and labels [N] of each split, one image shape for both; the class names
    "train": (caches.Tensor(torch.uint8, ("n", "c", "h", "w")), caches.Tensor(torch.int64, ("n",), low=0)),
    "test": (caches.Tensor(torch.uint8, ("m", "c", "h", "w")), caches.Tensor(torch.int64, ("m",), low=0)),
    "classes": caches.NAMES,
}
# torchvision datasets known to hold their images as one array (the others read image files: data=image_folder)
ARRAY_DATASETS = ("CIFAR10", "CIFAR100", "FashionMNIST", "KMNIST", "MNIST", "QMNIST", "STL10", "SVHN")


class TorchvisionData(TensorData):
    """Another torchvision image dataset by name (CIFAR10, SVHN, KMNIST, ...): downloaded by torchvision on first use
    (download=true), converted once into uint8 tensors, `<data_dir>/<dataset>/vaelab-<dataset>.pt` (a vaelab.caches
    cache, keyed by the bytes of every file in that folder: replaced files are converted anew), which later runs load
    in a second (weights-only: no pickle); the train split is split into train/val with a fixed generator.

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
            self._tensors = CACHE.read(self.cache_path(), self.source_key(), SCHEMA) or self.convert(download)
        return self._tensors

    def source_key(self) -> str | None:
        """The key of torchvision's files for this dataset (every file in <data_dir>/<dataset> but vaelab's cache and
        hidden files), None when there are none (then the cache is all there is, and is used as it is)."""
        folder, cache = self.cache_path().parent, self.cache_path().name
        names = []
        for parent, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            base = os.path.relpath(parent, folder)
            names += [os.path.normpath(os.path.join(base, f)) for f in sorted(files) if not f.startswith(".") and f != cache]
        return caches.files_key(folder, names, CACHE.name, self.dataset) if names else None

    def convert(self, download: bool) -> dict:
        root = self.root()
        data = {"classes": None}
        for split in ("train", "test"):
            dataset = open_torchvision(self.source, self.dataset, root, split, download)
            data[split] = as_tensors(dataset, self.dataset)
            data["classes"] = data["classes"] or (list(dataset.classes) if hasattr(dataset, "classes") else None)
        path = self.cache_path()
        try:
            CACHE.write(path, CACHE.pack(self.source_key(), data))
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
