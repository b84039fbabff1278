"""Other torchvision datasets by name (vaelab.data.torchvision_data.TorchvisionData): from a local copy in
torchvision's own format, converted once into a cache; nothing is ever downloaded."""

from pathlib import Path

import pytest
import torch

from conftest import idx_bytes
from vaelab.data.mnist import IDX_FILES, locate, read_idx
from vaelab.errors import UserError

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

    import vaelab.data.torchvision_data as data

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
