"""vaelab.image_folder.ImageFolder on real image files that PIL writes into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaelab.image_folder as image_folder
from vaelab.errors import UserError
from vaelab.image_folder import CACHE_FOLDER, ImageFolder


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

    write(root / "emu" / "e2.png", size=(9, 9), value=77)  # a new file: a new key, decoded anew
    changed = make(root, tmp_path)
    changed.setup()
    assert sum(len(s[0]) for s in (changed.train_set, changed.val_set, changed.test_set)) == 11
    assert len(list((root / CACHE_FOLDER).glob("*.pt"))) == 2
    # another setting that changes the pixels is another cache too
    make(root, tmp_path, crop=False).setup()
    assert len(list((root / CACHE_FOLDER).glob("*.pt"))) == 3


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

    def read_only_source(path, data):
        if root in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(image_folder, "write_cache", read_only_source)
    make(root, tmp_path).setup()
    assert not (root / CACHE_FOLDER).exists()
    (fallback,) = (tmp_path / "data" / "image_folder").glob("*/*.pt")
    dm = make(root, tmp_path)
    monkeypatch.setattr(image_folder, "decode_chunk", None)  # a second run reads the fallback cache
    dm.setup()
    assert len(dm.train_set[0]) == 6
    monkeypatch.undo()

    def nowhere(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(image_folder, "write_cache", nowhere)
    with pytest.raises(UserError) as err:
        make(root, tmp_path, cache_dir=str(tmp_path / "elsewhere")).setup()
    message = str(err.value)
    assert "\n" not in message and str(root / CACHE_FOLDER) in message and str(tmp_path / "elsewhere") in message
    assert "data.cache_dir" in message and fallback.exists()


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


def test_bad_settings(tmp_path):
    root = classes_folder(tmp_path / "images")
    with pytest.raises(UserError, match=r"data.channels=2 is not 1 or 3"):
        make(root, tmp_path, channels=2, image_shape=(2, 8, 8))
    with pytest.raises(UserError, match=r"data.image_shape=\[1, 28, 28\] does not match data.channels=3 and data.image_size=8"):
        make(root, tmp_path, channels=3, image_shape=(1, 28, 28))
    with pytest.raises(UserError, match="leave no training images"):
        make(root, tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError) as err:
        make(root, tmp_path, val_fraction=0.01, test_fraction=0.2).setup()
    message = str(err.value)
    assert "\n" not in message and "0 for validation" in message and "data.val_fraction=0.01" in message


def test_config_resolves_checks_and_builds(tmp_path, compose):
    from vaelab import schema
    from vaelab.errors import build

    root = classes_folder(tmp_path / "images")
    cfg = compose(["data=image_folder", f"data.path={root}", "data.channels=3", "data.image_size=16"])
    schema.check(cfg, "train")
    assert cfg.data.dataset == "ImageFolder" and cfg.data.image_shape == [3, 16, 16]
    assert cfg.model.encoder.image_shape == [3, 16, 16]
    dm = build(cfg.data, "data")
    assert isinstance(dm, ImageFolder) and dm.image_shape == (3, 16, 16) and dm.batch_size == cfg.batch_size
