"""A small CNN classifier of the data's images, trained once and cached beside the data: the feature space of
vaelab-eval's Fréchet distance and the judge of which class a generated image shows.

Inception v3 (the usual FID features) cannot be downloaded here and does not suit 28x28 grey images, so vaelab
trains its own: two 3x3 convolutions with max-pooling, a 128-unit hidden layer (the features) and a linear head,
a few epochs of Adam on the whole training split (train + val of the data module; the test split is only scored).
Seeded: the same data and settings give the same weights. Any channel count and image size work (the layers take
theirs from the data); the images are in [0, 1], as the data modules hold them.

The cache, `<data_dir>/classifier/<dataset>-<C>x<H>x<W>-<hash>.pt`, is a vaelab.caches cache: plain data only (a
state_dict, numbers, strings), loaded with torch.load(weights_only=True); the hash covers the settings and the training
and test images and labels themselves, so other data (another folder of images, binarized images) gets its own
classifier. A cache that cannot be read or does not fit (a weight missing, of another shape, not finite) is retrained
and replaced, with one line in the log saying why: a classifier with NaN weights made vaelab-eval die in the
Fréchet distance's matrix square root.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vaelab import caches, progress
from vaelab.errors import UserError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the architecture or the training changes: old caches are then not found
CACHE = caches.Cache("classifier", CACHE_VERSION, log, "classifier: the cache", "training it again")
NUM_FEATURES = 128  # the penultimate layer, the Fréchet distance's feature space
EPOCHS = 3
BATCH_SIZE = 128
LR = 2e-3


class Classifier(nn.Module):
    """conv 3x3 (16) - ReLU - maxpool 2 - conv 3x3 (32) - ReLU - maxpool 2 - linear (128) - ReLU | linear (classes)."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int = 16, num_features: int = NUM_FEATURES):
        super().__init__()
        channels, height, width_px = image_shape
        self.image_shape, self.num_classes = tuple(image_shape), int(num_classes)
        self.num_features = int(num_features)  # torchmetrics' FID reads this instead of probing with a dummy image
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (height // 4) * (width_px // 4), num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.body(x))


class Features(nn.Module):
    """The classifier's penultimate layer as a module of its own: torchmetrics' FID takes a feature extractor that
    maps images (N, C, H, W) in [0, 1] to (N, num_features)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.body(x.float())


@torch.no_grad()
def features(model: Classifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The penultimate-layer features of images in [0, 1], (N, num_features)."""
    model.eval()
    return torch.cat([model.body(x.float()) for x in images.split(batch_size)])


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The most likely class of each image, int64 (N,)."""
    model.eval()
    return torch.cat([model(x.float()).argmax(dim=1) for x in images.split(batch_size)])


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images) == labels.to(images.device)).double().mean().item()


def training_data(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training split of a vaelab data module: its train and val parts together (the classifier has no
    use for a validation set, and the VAE's validation images are training images of the dataset)."""
    datamodule.setup("fit")
    (train_x, train_y), (val_x, val_y) = datamodule.train_set, datamodule.val_set
    return torch.cat([train_x, val_x]), torch.cat([train_y, val_y])


def levels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as their 8-bit levels: what the cache's key covers."""
    return images.mul(255).round().to(torch.uint8)


def train(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = EPOCHS,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    advance: Callable[[int], object] = lambda batches: None,
) -> Classifier:
    """Adam on the cross-entropy; the initial weights and each epoch's order come from `seed` alone. advance(1) after
    each batch."""
    from vaelab.data.tensors import seeded_order

    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's random state untouched
        torch.manual_seed(seed)
        model = Classifier(tuple(images.shape[1:]), num_classes).to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for batch in seeded_order(len(images), seed * 1_000 + epoch).to(images.device).split(batch_size):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            advance(1)
    return model.eval()


def cache_dir_of(datamodule) -> Path:
    return Path(getattr(datamodule, "data_dir", "data")) / "classifier"


def cache_schema(image_shape: tuple[int, int, int], num_classes: int) -> dict:
    """What a cached classifier of this shape holds: every weight of the architecture (float32, finite), its record."""
    with torch.device("meta"):  # the shapes alone: no memory, no draw from the random generator
        weights = Classifier(image_shape, num_classes).state_dict()
    return {  # checked in this order: the shapes first, which say best why a foreign cache does not fit
        "image_shape": caches.equal(list(image_shape)),
        "num_classes": caches.equal(num_classes),
        "state_dict": {name: caches.Tensor(w.dtype, tuple(w.shape)) for name, w in weights.items()},
        "classes": caches.NAMES,
        "dataset": caches.TEXT,
        "test_accuracy": caches.Value(lambda v: isinstance(v, float) and 0 <= v <= 1, "a fraction"),
        **{k: caches.NUMBER for k in ("train_images", "train_seconds", "epochs", "seed", "batch_size", "lr")},
    }


def read_cache(path: Path, key: str, image_shape: tuple[int, int, int], num_classes: int) -> tuple[Classifier, dict] | None:
    """The cached classifier (on the CPU) and its record, or None: none there, or (one line in the log) damaged,
    foreign, of another version or made from other data."""
    record = CACHE.read(path, key, cache_schema(image_shape, num_classes))
    if record is None:
        return None
    with torch.device("meta"):
        model = Classifier(image_shape, num_classes)
    model.load_state_dict(record["state_dict"], assign=True)  # the checked tensors themselves
    return model.eval(), record


def classifier_data(datamodule, train_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(training images, labels, test images, labels, number of classes) of a data module, at least two classes."""
    images, labels = training_data(datamodule)
    datamodule.setup("test")
    test_images, test_labels = datamodule.test_set
    if train_size is not None:
        images, labels = images[: int(train_size)], labels[: int(train_size)]
    num_classes = int(max(labels.max(), test_labels.max())) + 1 if len(labels) else 0
    if num_classes < 2:
        raise UserError(
            f"data={getattr(datamodule, 'dataset', '?')} has {num_classes} class(es): the classifier needs labelled images of "
            "at least two classes (for a folder of images, one subfolder per class)"
        )
    return images, labels, test_images, test_labels, num_classes


def load_or_train_classifier(
    datamodule,
    epochs: int = EPOCHS,
    seed: int = 0,
    train_size: int | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> tuple[Classifier, float]:
    """The classifier of this data module's images and its accuracy on the test split: read from the cache, or
    trained (on the first `train_size` training images, all when None) and cached.

    `datamodule` is a vaelab data module (it is set up here) or a data_dir holding Fashion-MNIST's IDX files.
    The cache is in `cache_dir`, by default `<data_dir>/classifier/`.
    """
    if isinstance(datamodule, (str, Path)):
        from vaelab.data.mnist import MNISTLike

        datamodule = MNISTLike(dataset="FashionMNIST", data_dir=str(datamodule))
    data = classifier_data(datamodule, train_size)
    images, labels, test_images, test_labels, num_classes = data
    device = torch.device(device) if device is not None else images.device
    image_shape = tuple(images.shape[1:])
    settings = {"epochs": int(epochs), "seed": int(seed), "batch_size": BATCH_SIZE, "lr": LR}
    key = caches.content_key(CACHE.version, settings, num_classes, levels(images), labels, levels(test_images), test_labels)
    folder = Path(cache_dir) if cache_dir is not None else cache_dir_of(datamodule)
    path = folder / f"{getattr(datamodule, 'dataset', 'data')}-{'x'.join(map(str, image_shape))}-{key[:16]}.pt"
    cached = read_cache(path, key, image_shape, num_classes)
    if cached is not None:
        model, record = cached
        log.info("classifier: %s (test accuracy %.4f)", path, record["test_accuracy"])
        return model.to(device), float(record["test_accuracy"])
    log.info(
        "Fréchet feature classifier: none cached for this data yet, so it is trained now, once (%d epochs over %s images; "
        "an estimate of the time follows its first batches), and cached in %s for every later vaelab-eval of this data",
        settings["epochs"],
        f"{len(images):,}",
        path,
    )
    model, record = trained(datamodule, data, settings, device)
    try:
        CACHE.write(path, CACHE.pack(key, record))
        log.info("classifier: cached in %s", path)
    except OSError as err:  # the classifier still serves this run; the next one trains it again
        log.warning("classifier: cannot write the cache %s (%s); it is trained again next time", path, err.strerror or err)
    return model, record["test_accuracy"]


def trained(datamodule, data: tuple, settings: dict, device: torch.device) -> tuple[Classifier, dict]:
    """A classifier trained on classifier_data's tuple, and the record the cache keeps of it."""
    images, labels, test_images, test_labels, num_classes = data
    started = time.perf_counter()
    batches = settings["epochs"] * math.ceil(len(images) / settings["batch_size"])
    with progress.phase("Fréchet feature classifier", batches, "batch", estimate_after=max(10, batches // 50)) as done:
        model = train(
            images.to(device), labels.to(device), num_classes, settings["epochs"], settings["seed"], advance=done.advance
        )
    seconds = time.perf_counter() - started
    test_accuracy = accuracy(model, test_images.to(device), test_labels)
    log.info("classifier: trained on %d images in %.1f s, test accuracy %.4f", len(images), seconds, test_accuracy)
    return model, {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "image_shape": list(images.shape[1:]),
        "num_classes": num_classes,
        "classes": list(getattr(datamodule, "classes", None) or []),
        "dataset": str(getattr(datamodule, "dataset", "")),
        "train_images": len(images),
        "test_accuracy": test_accuracy,
        "train_seconds": round(seconds, 2),
        **settings,
    }
