"""Fashion-MNIST and the MNIST family (vaelab.data.mnist): data discovery, IDX reading and its errors on synthetic
files, the splits, KMNIST by name."""

import gzip
from pathlib import Path

import pytest
import torch

from conftest import idx_bytes
from vaelab.data.mnist import IDX_FILES, MNISTLike, locate, read_idx
from vaelab.errors import UserError


def write_idx_set(folder: Path, compress: bool, n_train: int = 60000, n_test: int = 10000) -> dict:
    """Four IDX files of the real sizes with recognisable contents (image i filled with i % 256)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (split, kind), (stem, magic, shape) in IDX_FILES.items():
        n = shape[0]
        values = torch.arange(n, dtype=torch.int64) % 256
        array = (
            values.view(n, 1, 1).expand(shape).to(torch.uint8).contiguous() if kind == "images" else (values % 10).to(torch.uint8)
        )
        tensors[(split, kind)] = array
        data = idx_bytes(array, magic)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (folder / stem).write_bytes(data)
    return tensors


@pytest.fixture(scope="module")
def system_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("debian") / "fashion-mnist"
    write_idx_set(folder, compress=True)
    return folder


def test_debian_files_are_decompressed_once_into_torchvision_layout(tmp_path, system_dir):
    raw = locate(tmp_path, "FashionMNIST", str(system_dir), download=False)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    stems = sorted(p.name for p in raw.iterdir())
    assert stems == sorted(stem for stem, _, _ in IDX_FILES.values())
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert locate(tmp_path, "FashionMNIST", str(system_dir), download=False) == raw
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before  # not decompressed again


def test_data_dir_wins_over_system_dir(tmp_path, system_dir):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert locate(tmp_path, "FashionMNIST", str(tmp_path / "nowhere"), download=False) == tmp_path / "FashionMNIST" / "raw"


def test_missing_data_names_three_ways(tmp_path):
    with pytest.raises(UserError) as err:
        locate(tmp_path, "FashionMNIST", str(tmp_path / "nowhere"), download=False)
    message = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "(1)" in message and "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


def test_truncated_idx_file_is_named(tmp_path):
    good = idx_bytes(torch.zeros(10, 28, 28, dtype=torch.uint8), 2051)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(good[:-1])
    with pytest.raises(UserError, match=f"{path}.*truncated"):
        read_idx(path, 2051, (10, 28, 28))


def test_wrong_magic_is_named(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(torch.zeros(10, dtype=torch.uint8), 2051))
    with pytest.raises(UserError, match=f"{path}: IDX magic number is 2051, expected 2049"):
        read_idx(path, 2049, (10,))


def test_wrong_shape_is_named(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(torch.zeros(9, dtype=torch.uint8), 2049))
    with pytest.raises(UserError, match=r"shape \(9,\), expected \(10,\)"):
        read_idx(path, 2049, (10,))


def test_datamodule_splits_scales_and_keeps_labels(tmp_path, system_dir):
    dm = MNISTLike(data_dir=str(tmp_path), system_dir=str(system_dir), batch_size=100, val_size=5000)
    dm.prepare_data()
    dm.setup()
    (xtr, ytr), (xva, _), (xte, _) = dm.train_set, dm.val_set, dm.test_set
    assert xtr.shape == (55000, 1, 28, 28) and xva.shape == (5000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and 0 <= xtr.min() and xtr.max() <= 1
    # image i is filled with (i % 256) / 255 and labelled i % 10: the pairs survive the split
    assert torch.equal((xtr[:, 0, 0, 0] * 255).round().long() % 10, ytr)
    # the split is fixed by split_seed: a second module gets the same validation images
    dm2 = MNISTLike(data_dir=str(tmp_path), system_dir=str(system_dir), val_size=5000)
    dm2.setup()
    assert torch.equal(dm2.val_set[0], xva)


def test_kmnist_by_name_reads_its_idx_files_like_fashion_mnist(tmp_path):
    from conftest import DATA_DIR, SYSTEM_DIR

    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, _, _ in IDX_FILES.values():  # KMNIST's files have Fashion-MNIST's format and sizes
        (raw / stem).symlink_to(locate(DATA_DIR, "FashionMNIST", SYSTEM_DIR, download=False) / stem)
    dm = MNISTLike("KMNIST", data_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup()
    assert dm.classes[:3] == ["o", "ki", "su"] and dm.train_set[0].shape == (55000, 1, 28, 28)
