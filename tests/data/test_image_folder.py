"""vaelab.data.image_folder.ImageFolder on real image files that PIL writes into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaelab.data.image_folder as image_folder
from vaelab.data.image_folder import CACHE_FOLDER, ImageFolder
from vaelab.errors import UserError


def write(path: Path, size=(12, 10), mode="L", value=128, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, 30)
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def classes_folder(root: Path) -> Path:
    """Three class folders of small images: grey and RGB, several sizes, one JPEG, one nested deeper."""
    for i in range(4):
        write(root / "cat" / f"c{i}.png", size=(10 + i, 12), value=20 * i)
    for i in range(3):
        write(root / "dog" / f"d{i}.PNG", size=(16, 9), mode="RGB", value=200)
    write(root / "dog" / "deeper" / "d9.png", size=(8, 8), value=5)
    write(root / "emu" / "e0.JPG", size=(20, 14), mode="RGB", value=100, fmt="JPEG")
    write(root / "emu" / "e1.jpeg", size=(9, 9), mode="RGB", value=100, fmt="JPEG")
    (root / "emu" / "notes.txt").write_text("not an image")
    write(root / "emu" / ".hidden.png", value=1)  # hidden: skipped
    return root


def make(root: Path, tmp_path: Path, **kwargs) -> ImageFolder:
    settings = {"channels": 1, "image_size": 8, "workers": 1, "val_fraction": 0.2, "test_fraction": 0.2}
    settings.update(kwargs)
    c, s = settings["channels"], settings["image_size"]
    settings.setdefault("image_shape", (c, s, s))
    return ImageFolder(path=str(root), data_dir=str(tmp_path / "data"), **settings)


def all_images(dm: ImageFolder) -> tuple[torch.Tensor, torch.Tensor]:
    sets = (dm.train_set, dm.val_set, dm.test_set)
    return torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets])


@pytest.mark.parametrize("channels", [1, 3])
def test_labels_classes_shapes_and_split(tmp_path, channels):
    root = classes_folder(tmp_path / "images")
    dm = make(root, tmp_path, channels=channels, image_size=16)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "emu"]
    assert dm.image_shape == (channels, 16, 16)
    images, labels = all_images(dm)
    assert images.shape == (10, channels, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 2
    assert (len(dm.train_set[0]), len(dm.val_set[0]), len(dm.test_set[0])) == (6, 2, 2)
    # the same split in another run
    again = make(root, tmp_path, channels=channels, image_size=16)
    again.setup("fit")
    assert torch.equal(again.val_set[0], dm.val_set[0]) and torch.equal(again.test_set[1], dm.test_set[1])


def test_flat_folder_label_zero_and_pixels(tmp_path):
    root = tmp_path / "flat"
    for i in range(5):
        write(root / f"x{i}.png", size=(8, 8), value=51 * i)
    dm = make(root, tmp_path)
    dm.setup()
    assert dm.classes is None
    images, labels = all_images(dm)
    assert labels.tolist() == [0] * 5
    assert sorted(round(float(x.mean()) * 255) for x in images) == [0, 51, 102, 153, 204]


def test_crop_keeps_the_centre_resize_squeezes(tmp_path):
    root = tmp_path / "wide"
    pixels = np.zeros((10, 30), dtype=np.uint8)
    pixels[:, 10:20] = 255  # the middle third white
    root.mkdir()
    Image.fromarray(pixels, "L").save(root / "wide.png")
    for i in range(2):
        write(root / f"pad{i}.png", size=(30, 10), value=0)
    cropped = make(root, tmp_path, image_size=10, crop=True, val_fraction=0.34, test_fraction=0.33)
    resized = make(root, tmp_path, image_size=10, crop=False, val_fraction=0.34, test_fraction=0.33)
    for dm in (cropped, resized):
        dm.setup()
    brightest = lambda dm: max(all_images(dm)[0], key=lambda x: float(x.sum()))[0]
    assert brightest(cropped).min() > 0.95  # the centre square: all white
    squeezed = brightest(resized)
    assert squeezed[:, 0].max() < 0.05 and squeezed[:, -1].max() < 0.05 and squeezed[:, 5].min() > 0.95
    assert squeezed.mean() < 0.5


def test_cache_written_then_used_then_rebuilt(tmp_path, monkeypatch):
    root = classes_folder(tmp_path / "images")
    make(root, tmp_path, workers=2).setup()  # the process pool, for real
    caches = list((root / CACHE_FOLDER).glob("*.pt"))
    assert len(caches) == 1
    first = make(root, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache was there")

    monkeypatch.setattr(image_folder, "decode_chunk", refuse)
    monkeypatch.setattr(image_folder, "ProcessPoolExecutor", refuse)
    first.setup()
    assert first.classes == ["cat", "dog", "emu"] and len(first.train_set[0]) == 6
    monkeypatch.undo()

    assert caches[0].name.startswith("c1-s8-crop-")  # the settings that change the pixels, then the hash
    write(root / "emu" / "e2.png", size=(9, 9), value=77)  # a new file: a new hash, decoded anew
    changed = make(root, tmp_path)
    changed.setup()
    assert sum(len(s[0]) for s in (changed.train_set, changed.val_set, changed.test_set)) == 11
    (replaced,) = (root / CACHE_FOLDER).glob("*.pt")  # the stale cache of the same settings is gone
    assert replaced != caches[0] and replaced.name.startswith("c1-s8-crop-")
    # another setting that changes the pixels is another cache, beside it
    make(root, tmp_path, crop=False).setup()
    make(root, tmp_path, channels=3).setup()
    assert sorted(p.name[:11] for p in (root / CACHE_FOLDER).glob("*.pt")) == ["c1-s8-crop-", "c1-s8-resiz", "c3-s8-crop-"]


def test_damaged_cache_is_rebuilt(tmp_path, caplog):
    root = classes_folder(tmp_path / "images")
    make(root, tmp_path).setup()
    (cache,) = (root / CACHE_FOLDER).glob("*.pt")
    cache.write_bytes(b"not a torch file")
    dm = make(root, tmp_path)
    dm.setup()
    assert len(dm.train_set[0]) == 6
    assert "damaged" in caplog.text
    torch.save({"version": 1, "images": torch.zeros(3, 1, 8, 8, dtype=torch.uint8), "labels": None, "classes": None}, cache)
    again = make(root, tmp_path)
    again.setup()
    assert len(again.train_set[0]) == 6
    assert torch.load(cache, weights_only=True)["images"].shape == (10, 1, 8, 8)


def test_unwritable_folder_falls_back_to_cache_dir(tmp_path, monkeypatch):
    root = classes_folder(tmp_path / "images")
    real = image_folder.write_cache

    def read_only_source(path, data, stale_prefix):
        if root in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data, stale_prefix)

    monkeypatch.setattr(image_folder, "write_cache", read_only_source)
    make(root, tmp_path).setup()
    assert not (root / CACHE_FOLDER).exists()
    (fallback,) = (tmp_path / "data" / "image_folder").glob("*/*.pt")
    dm = make(root, tmp_path)
    monkeypatch.setattr(image_folder, "decode_chunk", None)  # a second run reads the fallback cache
    dm.setup()
    assert len(dm.train_set[0]) == 6
    monkeypatch.undo()

    def nowhere(path, data, stale_prefix):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(image_folder, "write_cache", nowhere)
    with pytest.raises(UserError) as err:
        make(root, tmp_path, cache_dir=str(tmp_path / "elsewhere")).setup()
    message = str(err.value)
    assert "\n" not in message and str(root / CACHE_FOLDER) in message and str(tmp_path / "elsewhere") in message
    assert "data.cache_dir" in message and fallback.exists()
    # two folders sharing a cache_dir each get their own folder in it: replacing one's stale cache keeps the other's
    other = classes_folder(tmp_path / "other")
    write(other / "cat" / "extra.png", size=(9, 9), value=3)

    def no_folder_writable(path, data, stale_prefix):
        if CACHE_FOLDER in path.parts:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data, stale_prefix)

    monkeypatch.setattr(image_folder, "write_cache", no_folder_writable)
    shared = tmp_path / "shared"
    for folder in (root, other):
        make(folder, tmp_path, cache_dir=str(shared)).setup()
    assert len(list(shared.glob("*/*.pt"))) == 2 and len({p.parent for p in shared.glob("*/*.pt")}) == 2


def test_corrupt_files_named_in_one_line(tmp_path):
    root = classes_folder(tmp_path / "images")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError) as err:
        make(root, tmp_path, workers=2).setup()
    message = str(err.value)
    assert "\n" not in message
    assert str(root / "cat" / "broken.png") in message and "2 files in all" in message and "delete or fix it" in message
    assert not (root / CACHE_FOLDER).exists()


def test_missing_path_file_path_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        make(tmp_path / "nowhere", tmp_path).setup()
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(UserError, match="is a file, not a folder"):
        make(tmp_path / "file.png", tmp_path).setup()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(UserError) as err:
        make(empty, tmp_path).setup()
    assert "holds no images" in str(err.value) and ".png, .jpg, .jpeg" in str(err.value) and "\n" not in str(err.value)


def test_image_size_null_own_size_mixed_sizes_and_shape(tmp_path):
    root = tmp_path / "same"
    for i in range(3):
        write(root / f"a{i}.png", size=(6, 4), mode="RGB")
    dm = make(root, tmp_path, channels=3, image_size=None, image_shape=(3, 4, 6), val_fraction=0.34, test_fraction=0.33)
    dm.setup()
    assert dm.train_set[0].shape[1:] == (3, 4, 6)
    with pytest.raises(UserError, match=r"set data.image_shape=\[3,4,6\]"):
        make(root, tmp_path, channels=3, image_size=None, image_shape=(3, 5, 5), val_fraction=0.34, test_fraction=0.33).setup()
    with pytest.raises(UserError, match="data.image_size=null keeps"):
        make(root, tmp_path, channels=3, image_size=None, image_shape=(3, None, None))
    write(root / "odd.png", size=(7, 7), mode="RGB")
    with pytest.raises(UserError) as err:
        make(
            root, tmp_path, channels=3, image_size=None, image_shape=(3, 4, 6), workers=2, val_fraction=0.25, test_fraction=0.25
        ).setup()
    message = str(err.value)
    assert "\n" not in message and "differ in size" in message and "data.image_size" in message
    assert str(root / "a0.png") in message and "6x4" in message and str(root / "odd.png") in message and "7x7" in message


def test_too_large_for_memory(tmp_path, monkeypatch):
    root = classes_folder(tmp_path / "images")
    monkeypatch.setattr(image_folder, "memory_available", lambda: 2000)
    monkeypatch.setattr(image_folder, "decode_chunk", None)  # refused before any decoding
    with pytest.raises(UserError) as err:
        make(root, tmp_path, image_size=16).setup()
    message = str(err.value)
    assert "\n" not in message and message.startswith("10 images at 1x16x16 need") and "smaller data.image_size" in message
    assert "data.image_size=6" in message  # 10 * 6 * 6 * 5 = 1800 bytes fit in 2000


def test_bad_settings(tmp_path, compose):
    from vaelab.runs import settings

    root = classes_folder(tmp_path / "images")
    folder = ["data=image_folder", f"data.path={root}"]
    for override, message in [
        ("data.channels=2", "data.channels=2 is not allowed: data.channels must be 1 (grey) or 3 (RGB), e.g. data.channels=3"),
        (
            "data.image_size=0",
            "data.image_size=0 is not allowed: data.image_size must be a positive integer or null, e.g. data.image_size=32",
        ),
        (
            "data.val_fraction=1.5",
            "data.val_fraction=1.5 is not allowed: data.val_fraction must be a fraction in [0, 1), e.g. data.val_fraction=0.1",
        ),
        ("data.workers=0", "data.workers=0 is not allowed: data.workers must be a positive integer or null, e.g. data.workers=4"),
        ("data.crop=perhaps", "data.crop='perhaps' is not allowed: data.crop must be true or false, e.g. data.crop=true"),
    ]:
        with pytest.raises(UserError) as err:
            settings.check(compose([*folder, override]), "train")
        assert str(err.value) == message
    with pytest.raises(UserError, match=r"^data.path is required, e.g. data.path=path/to/images$"):
        settings.check(compose(["data=image_folder"]), "train")
    with pytest.raises(UserError, match=r"data.image_shape=\[1, 28, 28\] does not match data.channels=3 and data.image_size=8"):
        make(root, tmp_path, channels=3, image_shape=(1, 28, 28))
    with pytest.raises(UserError, match="leave no training images"):
        make(root, tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError) as err:
        make(root, tmp_path, val_fraction=0.01, test_fraction=0.2).setup()
    message = str(err.value)
    assert "\n" not in message and "0 for validation" in message and "data.val_fraction=0.01" in message


def test_config_resolves_checks_and_builds(tmp_path, compose):
    from vaelab.errors import build
    from vaelab.runs import settings

    root = classes_folder(tmp_path / "images")
    cfg = compose(
        ["data=image_folder", f"data.path={root}", "data.channels=3", "data.image_size=16", "model.likelihood=gaussian"]
    )
    settings.check(cfg, "train")
    assert cfg.data.dataset == "ImageFolder" and cfg.data.image_shape == [3, 16, 16]
    assert cfg.model.encoder.image_shape == [3, 16, 16]
    dm = build(cfg.data, "data")
    assert isinstance(dm, ImageFolder) and dm.image_shape == (3, 16, 16) and dm.batch_size == cfg.batch_size


# --- from the shell, as a user would -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory) -> Path:
    """300 real Fashion-MNIST test images exported as PNG, one subfolder per class, named by torchvision's class
    names ('/' becomes '-': 'T-shirt-top')."""
    from conftest import DATA_DIR
    from vaelab.data.mnist import MNISTLike

    dm = MNISTLike(data_dir=str(DATA_DIR))
    dm.setup()
    images, labels = dm.test_set
    root = tmp_path_factory.mktemp("fashion") / "images"
    for i in range(300):
        path = root / dm.classes[int(labels[i])].replace("/", "-") / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].mul(255).round().to(torch.uint8).numpy(), "L").save(path)
    return root


def test_fashion_mnist_png_folders_train_and_their_class_names_reach_the_latent_map(tmp_path, fashion_folder):
    from conftest import read_metrics, train_run

    run = tmp_path / "run"
    train_run(run, "data=image_folder", f"data.path={fashion_folder}", "epochs=1", "latent_dim=16")
    assert set(read_metrics(run)) >= {"val/loss", "test/loss", "test/nll_iwae"}
    assert len(list((fashion_folder / CACHE_FOLDER).glob("c1-s28-crop-*.pt"))) == 1
    # the projector: 30 validation images (10% of 300), each named by its folder
    folder = run / "tensorboard" / "00004" / "latent_map"  # 240 training images in batches of 64: 4 steps
    names = (folder / "metadata.tsv").read_text().splitlines()
    classes = sorted(p.name for p in fashion_folder.iterdir() if p.is_dir())
    assert len(names) == 30 and set(names) <= set(classes) and len(set(names)) >= 5
    assert "T-shirt-top" in classes and not any(name.isdigit() for name in names)
    exported = {p: np.asarray(Image.open(p), dtype=np.float32) / 255 for p in fashion_folder.rglob("*.png")}
    paths, stack = list(exported), np.stack(list(exported.values()))
    sprite = np.asarray(Image.open(folder / "sprite.png").convert("L"), dtype=np.float32) / 255
    side = 6  # ceil(sqrt(30)) thumbnails a side
    thumbs = sprite.reshape(side, 28, side, 28).transpose(0, 2, 1, 3).reshape(-1, 28, 28)[:30]
    for thumb, name in zip(thumbs, names):  # each thumbnail is one exported image, and its name is that image's folder
        distance = np.abs(stack - thumb).mean(axis=(1, 2))
        assert distance.min() < 1.5 / 255 and paths[int(distance.argmin())].parent.name == name


def test_bernoulli_on_colour_images_is_refused_before_anything_starts(tmp_path):
    from conftest import draw_shapes, one_line, rgb_data, train_run

    folder = draw_shapes(tmp_path / "shapes", per_class=2)
    proc = train_run(tmp_path / "run", *rgb_data(folder), check=False)
    assert one_line(proc, "vaelab-train: error: ") == (
        "vaelab-train: error: model.likelihood=bernoulli is not a likelihood of 3-channel images of 256 levels "
        "(data.image_shape=[3,32,32]): add model.likelihood=discretized_logistic (or gaussian, or continuous_bernoulli), "
        "or binarize the pixels with data.binarize=dynamic"
    )
    assert not (tmp_path / "run").exists() and not (folder / CACHE_FOLDER).exists()


def test_a_corrupt_image_stops_the_run_in_one_line_before_training(tmp_path):
    from conftest import one_line, train_run

    root = tmp_path / "images"
    for i in range(10):
        write(root / f"x{i}.png", size=(28, 28), value=20 * i)
    (root / "x3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = train_run(tmp_path / "run", "data=image_folder", f"data.path={root}", check=False)
    line = one_line(proc, f"vaelab-train: error: {root / 'x3.png'}: not a readable image (")
    assert line.endswith("; delete or fix it, then run again")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()
    assert not (root / CACHE_FOLDER).exists()


def test_a_conditional_model_on_a_folder_without_classes_stops_in_one_line_before_training(tmp_path):
    """model.conditional=true needs labels: a folder of images without class subfolders has none."""
    from conftest import one_line, train_run

    root = tmp_path / "flat"
    for i in range(10):
        write(root / f"x{i}.png", size=(28, 28), value=20 * i)
    proc = train_run(tmp_path / "run", "data=image_folder", f"data.path={root}", "model.conditional=true", check=False)
    assert proc.returncode == 1
    assert one_line(proc, "vaelab-train: error: ") == (
        f"vaelab-train: error: model.conditional=true needs labelled images, but data.path={root} has no class "
        "subfolders: put the images in one subfolder per class, or train without model.conditional=true"
    )
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_class_names_are_the_subfolders_before_the_data_is_set_up(tmp_path):
    """What a conditional VAE is built with, read before setup (decoded once: setup then takes the same tensors)."""
    dm = make(classes_folder(tmp_path / "images"), tmp_path)
    assert dm.class_names() == ["cat", "dog", "emu"] and dm.train_set is None
    dm.setup("fit")
    assert dm.class_names() == dm.classes == ["cat", "dog", "emu"]
