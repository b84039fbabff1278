"""Data discovery, IDX reading and its errors on synthetic files; batching from in-memory tensors."""

import gzip
import struct
from pathlib import Path

import pytest
import torch

from vaelab.data.mnist import IDX_FILES, MNISTLike, locate, read_idx
from vaelab.data.tensors import TensorBatches
from vaelab.errors import UserError


def idx_bytes(array: torch.Tensor, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.numpy().tobytes()


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


def test_tensor_batches_cover_everything_once_and_reshuffle_by_epoch():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    epoch = [0]
    batches = TensorBatches(x, y, batch_size=4, shuffle=True, seed=1, epoch_fn=lambda: epoch[0])
    assert len(batches) == 3
    first = torch.cat([b[1] for b in batches])
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[1] for b in batches]), first)  # same epoch, same order
    epoch[0] = 1
    assert not torch.equal(torch.cat([b[1] for b in batches]), first)
    ordered = TensorBatches(x, y, batch_size=4, shuffle=False)
    assert torch.cat([b[1] for b in ordered]).tolist() == list(range(10))


def test_tensor_batches_shard_across_ranks():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    shards = [torch.cat([b[1] for b in TensorBatches(x, y, 2, True, seed=3, rank=r, world_size=2)]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(torch.cat(shards).tolist()) == list(range(10))


# --- other torchvision datasets by name (vaelab.data.torchvision_data.TorchvisionData); nothing is ever downloaded -----------------

OFFLINE = {  # a proxy on a closed port: a download fails at once, even where the internet is
    **{k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
    "no_proxy": "",
    "NO_PROXY": "",
}


@pytest.fixture(scope="module")
def tiny_kmnist(tmp_path_factory) -> tuple[Path, dict]:
    """A KMNIST copy in torchvision's own on-disk format (IDX files in <data_dir>/KMNIST/raw/, no pickle), small:
    200 training and 50 test images (real Fashion-MNIST pixels and labels)."""
    from conftest import DATA_DIR

    real = locate(DATA_DIR, "FashionMNIST", None, download=False)
    data_dir = tmp_path_factory.mktemp("torchvision")
    raw = data_dir / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    tensors = {}
    for (split, kind), (stem, magic, shape) in IDX_FILES.items():
        n = 200 if split == "train" else 50
        tensors[(split, kind)] = read_idx(real / stem, magic, shape)[:n].contiguous()
        (raw / stem).write_bytes(idx_bytes(tensors[(split, kind)], magic))
    return data_dir, tensors


def test_a_torchvision_dataset_loads_from_a_local_copy_once_then_from_its_cache(tiny_kmnist, monkeypatch, caplog):
    import torchvision

    import vaelab.data.mnist as data

    data_dir, tensors = tiny_kmnist
    dm = data.TorchvisionData("KMNIST", data_dir=str(data_dir), image_shape=(1, 28, 28), val_size=50)
    dm.prepare_data()
    dm.setup()
    assert [len(s[0]) for s in (dm.train_set, dm.val_set, dm.test_set)] == [150, 50, 50]
    assert dm.classes == torchvision.datasets.KMNIST.classes
    assert torch.equal(dm.test_set[0].mul(255).round().to(torch.uint8)[:, 0], tensors[("test", "images")])
    assert torch.equal(dm.test_set[1], tensors[("test", "labels")].long())
    train = torch.cat([dm.train_set[0], dm.val_set[0]]).mul(255).round().to(torch.uint8)[:, 0]
    assert sorted(map(bytes, train.flatten(1).numpy())) == sorted(map(bytes, tensors[("train", "images")].flatten(1).numpy()))
    cache = data_dir / "KMNIST" / "vaelab-KMNIST.pt"
    assert cache.is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("torchvision's files read again although the cache was there")

    monkeypatch.setattr(data, "open_torchvision", refuse)
    again = data.TorchvisionData("KMNIST", data_dir=str(data_dir), image_shape=(1, 28, 28), val_size=50)
    again.prepare_data()
    again.setup()
    assert torch.equal(again.val_set[0], dm.val_set[0]) and torch.equal(again.test_set[1], dm.test_set[1])
    assert again.classes == dm.classes
    monkeypatch.undo()
    cache.write_bytes(b"damaged")  # a damaged cache is converted again, with a warning
    data.TorchvisionData("KMNIST", data_dir=str(data_dir), image_shape=(1, 28, 28), val_size=50).setup()
    assert "damaged" in caplog.text and torch.load(cache, weights_only=True)["test"][0].shape == (50, 1, 28, 28)
    with pytest.raises(UserError, match=r"^KMNIST's images are \[1,28,28\] .* set data.image_shape=\[1,28,28\]$"):
        data.TorchvisionData("KMNIST", data_dir=str(data_dir), image_shape=(3, 32, 32)).setup()
    with pytest.raises(UserError, match=r"^data.val_size=5000 is not allowed for KMNIST: it has 200 training images"):
        data.TorchvisionData("KMNIST", data_dir=str(data_dir), image_shape=(1, 28, 28), val_size=5000).setup()


def test_a_torchvision_dataset_trains_from_the_shell(tmp_path, tiny_kmnist):
    from conftest import read_metrics, train_run

    data_dir, _ = tiny_kmnist
    run = tmp_path / "run"
    settings = ["data=torchvision", "data.dataset=KMNIST", "data.image_shape=[1,28,28]", "data.val_size=50"]
    train_run(run, *settings, f"data.data_dir={data_dir}", "epochs=1", "latent_dim=4")
    assert read_metrics(run)["test/loss"] > 0
    names = (run / "tensorboard" / "00003" / "latent_map" / "metadata.tsv").read_text().splitlines()  # 150 / 64: 3 steps
    assert len(names) == 50 and set(names) <= {"o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"}


def test_kmnist_by_name_reads_its_idx_files_like_fashion_mnist(tmp_path):
    from conftest import DATA_DIR

    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, _, _ in IDX_FILES.values():  # KMNIST's files have Fashion-MNIST's format and sizes
        (raw / stem).symlink_to(locate(DATA_DIR, "FashionMNIST", None, download=False) / stem)
    dm = MNISTLike("KMNIST", data_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup()
    assert dm.classes[:3] == ["o", "ki", "su"] and dm.train_set[0].shape == (55000, 1, 28, 28)


def test_offline_download_of_a_torchvision_dataset_is_one_line(tmp_path):
    from conftest import FAST, one_line, run_cli

    proc = run_cli(
        *FAST,
        f"hydra.run.dir={tmp_path / 'run'}",
        "data=cifar10",
        f"data.data_dir={tmp_path / 'data'}",
        "data.download=true",
        "model.likelihood=discretized_logistic",
        check=False,
        env=OFFLINE,
    )
    line = one_line(proc, f"vaelab-train: error: downloading CIFAR10 with torchvision into {tmp_path}/data/CIFAR10 failed (")
    assert line.endswith(f"; check the connection, or put torchvision's files for CIFAR10 in {tmp_path}/data/CIFAR10")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_torchvision_names_and_missing_files_are_one_line(tmp_path, compose):
    from vaelab.data.torchvision_data import TorchvisionData
    from vaelab.runs import settings

    with pytest.raises(UserError, match=r"^data.dataset='Cifar' is not a torchvision dataset: choose one of CIFAR10, CIFAR100"):
        TorchvisionData("Cifar", data_dir=str(tmp_path))
    with pytest.raises(UserError) as err:
        TorchvisionData("CIFAR10", data_dir=str(tmp_path)).setup()
    assert str(err.value).startswith(f"CIFAR10 not found in {tmp_path}/CIFAR10 (torchvision: RuntimeError: Dataset not found")
    assert str(err.value).endswith(
        "download it once with data.download=true (needs the internet), or put torchvision's files for CIFAR10 there"
    )
    cfg = compose(["data=cifar10", "model.likelihood=discretized_logistic"])
    settings.check(cfg, "train")
    assert cfg.data.image_shape == [3, 32, 32] and cfg.data.dataset == "CIFAR10"
    with pytest.raises(UserError, match="model.likelihood=bernoulli is not a likelihood of 3-channel images"):
        settings.check(compose(["data=svhn"]), "train")
    with pytest.raises(UserError, match=r"^data.dataset is required, e.g. data.dataset=CIFAR10$"):
        settings.check(compose(["data=torchvision"]), "train")


def test_torchvision_arrays_become_nchw_uint8_tensors():
    from types import SimpleNamespace

    import numpy as np

    from vaelab.data.torchvision_data import as_tensors

    hwc = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)  # CIFAR: [N, H, W, C], labels in .targets
    images, labels = as_tensors(SimpleNamespace(data=hwc, targets=[3, 1]), "CIFAR10")
    assert images.shape == (2, 3, 4, 4) and torch.equal(images[1, 2], torch.from_numpy(hwc[1, :, :, 2]))
    assert labels.tolist() == [3, 1] and labels.dtype == torch.int64
    chw = np.zeros((2, 3, 8, 8), dtype=np.uint8)  # SVHN: [N, C, H, W], labels in .labels
    assert as_tensors(SimpleNamespace(data=chw, labels=np.array([0, 9])), "SVHN")[0].shape == (2, 3, 8, 8)
    with pytest.raises(UserError, match="torchvision's CelebA does not hold its images as one uint8 array: .* data=image_folder"):
        as_tensors(SimpleNamespace(filename=["a.jpg"], targets=[0]), "CelebA")
