"""vaelab.caches, the one mechanism of the caches read from disk, and the three caches built on it: the image folder's
decoded pixels, torchvision's converted arrays and the Fréchet classifier's weights. Real files, real tensors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab import caches
from vaelab.data.image_folder import CACHE_FOLDER, ImageFolder
from vaelab.errors import UserError


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- the helper itself ---------------------------------------------------------------------------------------------

SCHEMA = {
    "x": caches.Tensor(torch.float32, ("n", 2)),
    "y": caches.Tensor(torch.int64, ("n",), low=0),
    "names": caches.NAMES,
}


def test_a_cache_is_served_only_when_its_kind_version_key_and_every_tensor_are_right(tmp_path, caplog):
    log = logging.getLogger("vaelab.test_caches")
    cache = caches.Cache("toy", 3, log, "toy: the cache", "making it again")
    path = tmp_path / "toy.pt"
    good = {"x": torch.tensor([[0.5, 1.0], [2.0, 3.0]]), "y": torch.tensor([0, 1]), "names": ["a", "b"]}
    cache.write(path, cache.pack("k1", good))
    read = cache.read(path, "k1", SCHEMA)
    assert read is not None and torch.equal(read["x"], good["x"]) and read["names"] == ["a", "b"]
    assert not warnings(caplog)
    for label, record, key, why in [
        ("another key", good, "k2", "is out of date (made from other content: key k1, expected k2)"),
        ("NaN", {**good, "x": torch.tensor([[0.5, float("nan")], [2.0, 3.0]])}, "k1", "x holds 1 non-finite values"),
        ("inf", {**good, "x": torch.tensor([[0.5, float("inf")], [2.0, 3.0]])}, "k1", "x holds 1 non-finite values"),
        ("dtype", {**good, "y": torch.tensor([0.0, 1.0])}, "k1", "y is torch.float32, expected torch.int64"),
        ("n", {**good, "y": torch.tensor([0, 1, 1])}, "k1", "y has the shape (3,), expected (2,)"),
        ("negative", {**good, "y": torch.tensor([0, -1])}, "k1", "y holds values below 0"),
        ("a key missing", {"x": good["x"], "y": good["y"]}, "k1", "the record holds ['x', 'y'], expected ['names', 'x', 'y']"),
        ("names", {**good, "names": ["a", 2]}, "k1", "names is ['a', 2], expected a list of names or None"),
    ]:
        caplog.clear()
        cache.write(path, cache.pack("k1", record))
        assert cache.read(path, key, SCHEMA) is None, label
        (line,) = warnings(caplog)
        assert line.startswith(f"toy: the cache {path} is ") and why in line and line.endswith("; making it again"), line
    caplog.clear()
    path.write_bytes(path.read_bytes()[:200])  # truncated
    assert cache.read(path, "k1", SCHEMA) is None and "is damaged (" in warnings(caplog)[0]
    caplog.clear()
    torch.save({"x": good["x"]}, path)  # a torch file, but no cache
    assert cache.read(path, "k1", SCHEMA) is None and "kind None, expected 'toy'" in warnings(caplog)[0]
    caplog.clear()
    cache.write(path, caches.Cache("toy", 2, log, "", "").pack("k1", good))  # written by an older vaelab
    assert cache.read(path, "k1", SCHEMA) is None and "is out of date (version 2, expected 3)" in warnings(caplog)[0]
    assert cache.read(tmp_path / "none.pt", "k1", SCHEMA) is None and len(warnings(caplog)) == 1  # none: no line


# --- the image folder ----------------------------------------------------------------------------------------------


def save_png(path: Path, pixels: np.ndarray) -> None:
    """Uncompressed PNG: its size depends on the image's size alone, never on the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path, compress_level=0)


def folder_of(root: Path, n: int = 10) -> Path:
    for i in range(n):
        save_png(root / ("a" if i % 2 else "b") / f"{i}.png", np.full((8, 8), 20 * i, dtype=np.uint8))
    return root


def image_folder(root: Path, tmp_path: Path) -> ImageFolder:
    return ImageFolder(
        path=str(root), data_dir=str(tmp_path / "data"), channels=1, image_size=8, image_shape=(1, 8, 8), workers=1,
        val_fraction=0.2, test_fraction=0.2,
    )  # fmt: skip


def pixels_of(dm: ImageFolder) -> torch.Tensor:
    """The decoded images in the files' sorted order."""
    return dm.decoded()[0]


def test_an_image_changed_in_place_with_its_size_and_time_kept_is_decoded_anew(tmp_path, caplog):
    """The cache was keyed by names, sizes and modification times, and served the old pixels of such a file."""
    root = folder_of(tmp_path / "images")
    first = image_folder(root, tmp_path)
    assert int(pixels_of(first)[0].float().mean()) == 20  # sorted: a/1.png first, 20 * 1
    (old_cache,) = (root / CACHE_FOLDER).glob("*.pt")
    target = root / "a" / "1.png"
    before = target.stat()
    save_png(target, np.full((8, 8), 222, dtype=np.uint8))  # new pixels, the same number of bytes
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old time: as a copy that keeps times does
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="vaelab.data.image_folder"):
        images = pixels_of(image_folder(root, tmp_path))
    assert int(images[0].float().mean()) == 222 and torch.equal(images[1:], pixels_of(first)[1:])
    assert "decoded into the cache" in caplog.text
    (new_cache,) = (root / CACHE_FOLDER).glob("*.pt")  # the stale cache replaced, not kept beside it
    assert new_cache != old_cache and new_cache.name.startswith("c1-s8-crop-")
    assert int(torch.load(new_cache, weights_only=True)["images"][0].float().mean()) == 222
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vaelab.data.image_folder"):
        assert torch.equal(pixels_of(image_folder(root, tmp_path)), images)  # unchanged: the cache, not decoded
    assert f"images from the cache {new_cache}" in caplog.text and "decoded" not in caplog.text


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_an_image_that_cannot_be_read_is_one_line_naming_it(tmp_path, kind):
    """A file that cannot be stat-ed (a dangling symbolic link, a loop of them) was a traceback from os.stat; it now
    stops the run as an image that cannot be decoded does: one line naming the file and the fix, nothing written."""
    root = folder_of(tmp_path / "images")
    link = root / "a" / "zz.png"
    if kind == "dangling":
        link.symlink_to(root / "a" / "gone.png")
        why = f"(No such file or directory, a symbolic link to {root / 'a' / 'gone.png'})"
    else:
        link.symlink_to(link)
        why = f"(Too many levels of symbolic links, a symbolic link to {link})"
    with pytest.raises(UserError) as err:
        image_folder(root, tmp_path).setup()
    message = str(err.value)
    assert message == f"{link}: cannot be read {why}; delete or fix it, then run again"
    assert not (root / CACHE_FOLDER).exists() and not (tmp_path / "data").exists()
    (root / "b" / "zz.png").symlink_to(root / "b" / "gone.png")  # two: the first named, and how many
    with pytest.raises(UserError, match=r"^.*/a/zz.png: cannot be read .* \(2 files in all cannot be read\); delete or fix"):
        image_folder(root, tmp_path).setup()


# --- torchvision's arrays ------------------------------------------------------------------------------------------


def test_a_torchvision_file_changed_in_place_is_converted_anew(tmp_path, caplog):
    """The torchvision cache was not keyed at all: a replaced file of torchvision's was never read again."""
    from conftest import DATA_DIR, SYSTEM_DIR, idx_bytes
    from vaelab.data.mnist import IDX_FILES, locate, read_idx
    from vaelab.data.torchvision_data import TorchvisionData

    real = locate(DATA_DIR, "FashionMNIST", SYSTEM_DIR, download=False)
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for (split, _), (stem, magic, shape) in IDX_FILES.items():
        (raw / stem).write_bytes(idx_bytes(read_idx(real / stem, magic, shape)[: 60 if split == "train" else 20], magic))
    make = lambda: TorchvisionData("KMNIST", data_dir=str(tmp_path), image_shape=(1, 28, 28), val_size=10)
    first = make()
    first.setup()
    labels = raw / "t10k-labels-idx1-ubyte"
    before, data = labels.stat(), bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # the last test label, another class
    labels.write_bytes(bytes(data))
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger="vaelab.data.torchvision_data"):
        again = make()
        again.setup()
    (line,) = warnings(caplog)
    assert "is out of date (made from other content" in line and line.endswith("converting torchvision's files again")
    assert again.test_set[1][-1] == (first.test_set[1][-1] + 1) % 10 and torch.equal(again.test_set[0], first.test_set[0])
    caplog.clear()
    for path in raw.iterdir():  # torchvision's files gone: the cache is all there is, and is served
        path.unlink()
    third = make()
    third.setup()
    assert torch.equal(third.test_set[1], again.test_set[1]) and not warnings(caplog)


# --- the Fréchet classifier ----------------------------------------------------------------------------------------

TINY = {"train_size": 300, "epochs": 1}


@pytest.fixture(scope="module")
def fashion():
    from conftest import DATA_DIR, SYSTEM_DIR
    from vaelab.data.mnist import MNISTLike

    datamodule = MNISTLike(data_dir=str(DATA_DIR), system_dir=SYSTEM_DIR)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.slow  # trains the classifier in-process (about 7 s each)
@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda w: torch.full_like(w, float("nan")), "state_dict.head.weight holds 1280 non-finite values"),
        (
            lambda w: w.index_put((torch.tensor(3), torch.tensor(7)), torch.tensor(-np.inf)),
            "state_dict.head.weight holds 1 non-finite values",
        ),
        (lambda w: w[:, :64].clone(), "state_dict.head.weight has the shape (10, 64), expected (10, 128)"),
    ],
    ids=["nan", "inf", "shape"],
)
def test_a_classifier_cache_with_bad_weights_is_trained_again_with_one_line(fashion, tmp_path, caplog, monkeypatch, damage, why):
    """A cache with NaN weights was served as it was, and vaelab-eval died with a segfault in the Fréchet distance."""
    from vaelab.evaluation import classifier
    from vaelab.evaluation.classifier import features, load_or_train_classifier

    model, accuracy = load_or_train_classifier(fashion, cache_dir=tmp_path, **TINY)
    (path,) = tmp_path.glob("FashionMNIST-1x28x28-*.pt")
    record = torch.load(path, weights_only=True)
    record["state_dict"]["head.weight"] = damage(record["state_dict"]["head.weight"])
    torch.save(record, path)
    with caplog.at_level(logging.WARNING, logger="vaelab.evaluation.classifier"):
        again, again_accuracy = load_or_train_classifier(fashion, cache_dir=tmp_path, **TINY)
    (line,) = warnings(caplog)
    assert line == f"classifier: the cache {path} is damaged ({why}); training it again"
    assert all(bool(torch.isfinite(w).all()) for w in again.state_dict().values())
    assert torch.isfinite(features(again, fashion.test_set[0][:100])).all()
    assert again_accuracy == accuracy  # seeded: the same classifier again, cached in place of the damaged one
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["head.weight"], model.head.weight)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache is good")

    caplog.clear()
    monkeypatch.setattr(classifier, "train", no_training)
    read, _ = load_or_train_classifier(fashion, cache_dir=tmp_path, **TINY)
    assert torch.equal(read.head.weight, model.head.weight) and not warnings(caplog)


# --- TensorBoard's projector ---------------------------------------------------------------------------------------


def test_class_names_with_control_characters_keep_the_projector_metadata_one_row_per_point(tmp_path):
    """A subfolder named with a newline or a tab split its points' rows of metadata.tsv (TensorBoard then refuses
    the file: more rows than points)."""
    from conftest import train_run

    root = tmp_path / "images"
    names = {"new\nline": "new\\nline", "tab\there": "tab\\there", "plain": "plain"}
    for k, name in enumerate(names):
        for i in range(60):
            save_png(root / name / f"{i}.png", np.full((28, 28), 80 * k + i, dtype=np.uint8))
    run = tmp_path / "run"
    train_run(run, "data=image_folder", f"data.path={root}", "epochs=1", "latent_dim=4")
    (folder,) = (run / "tensorboard").glob("*/latent_map")
    rows = (folder / "metadata.tsv").read_bytes().decode().split("\n")
    points = (folder / "tensors.tsv").read_text().strip("\n").split("\n")
    assert rows[-1] == "" and len(rows[:-1]) == len(points) == 18  # 10% of 180 images, one row each
    assert set(rows[:-1]) <= set(names.values()) and len(set(rows[:-1])) >= 2
    assert all(len(p.split("\t")) == 4 for p in points)
