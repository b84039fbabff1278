"""In-memory tensors and their batches (vaelab.data.tensors): every image once per epoch, reshuffled by epoch,
shared across ranks; binarization, and the pictures shown the images as training prepares them."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA_DIR, SYSTEM_DIR
from vaelab.data.mnist import MNISTLike
from vaelab.data.tensors import TensorBatches


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


# --- binarization ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datamodules():
    made = {}
    for mode in ("none", "dynamic", "static"):
        dm = MNISTLike(data_dir=str(DATA_DIR), system_dir=SYSTEM_DIR, batch_size=500, binarize=mode)
        dm.setup()
        made[mode] = dm
    return made


def first_batch(dm: MNISTLike, epoch: int) -> torch.Tensor:
    batches = TensorBatches(
        *dm.train_set, batch_size=500, shuffle=True, seed=0, epoch_fn=lambda: epoch, binarize=dm.binarize == "dynamic"
    )
    return next(iter(batches))


@pytest.mark.slow  # 7 s: Fashion-MNIST three times
def test_dynamic_binarization_redraws_training_images_each_epoch_and_fixes_the_test_images(datamodules):
    grey, dynamic, static = datamodules["none"], datamodules["dynamic"], datamodules["static"]
    x0, y0 = first_batch(dynamic, 0)
    assert set(x0.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first_batch(dynamic, 0)[0], x0)  # the same epoch again (a resume): the same draw
    # epoch 1 with epoch 0's order: the same images, freshly drawn pixels
    order0 = TensorBatches(*grey.train_set, batch_size=500, shuffle=True, seed=0, epoch_fn=lambda: 0)._indices()[:500]
    redrawn = torch.bernoulli(grey.train_set[0][order0], generator=torch.Generator().manual_seed(1))
    assert not torch.equal(redrawn, x0)
    x1 = first_batch(dynamic, 1)[0]
    assert not torch.equal(x1, x0)
    # each pixel is a Bernoulli draw of its grey level: over many images, the mean matches the grey mean
    assert x0.mean().item() == pytest.approx(grey.train_set[0][order0].mean().item(), abs=5e-3)
    # validation and test: binarized once, the same in every epoch and every data module (a second run)
    for split in ("val_set", "test_set"):
        assert set(getattr(dynamic, split)[0].unique().tolist()) == {0.0, 1.0}
        assert torch.equal(getattr(dynamic, split)[0], getattr(static, split)[0])
    again = MNISTLike(data_dir=str(DATA_DIR), system_dir=SYSTEM_DIR, binarize="dynamic")
    again.setup()
    assert torch.equal(again.test_set[0], dynamic.test_set[0])
    # static: the training images are binarized once too
    assert set(static.train_set[0].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first_batch(static, 0)[0], static.train_set[0][order0])
    # none: the grey levels, as before
    assert len(grey.test_set[0].unique()) > 200


@pytest.mark.slow  # shares the three data modules above
def test_the_pictures_show_images_prepared_as_the_model_was_trained(datamodules):
    """Under binarize=dynamic the pictures' training images are one fixed Bernoulli draw of the chosen grey images
    (the model is never trained on grey levels), the validation images the data module's own fixed draws; with
    binarize=static the data module's binary images as they are; with binarize=none grey levels, as before."""
    from vaelab.pictures.grids import Reconstructions
    from vaelab.pictures.notebook import NotebookPictures

    def binary(images: torch.Tensor) -> bool:
        return set(images.unique().tolist()) <= {0.0, 1.0}

    for mode, dm in datamodules.items():
        shown = Reconstructions(num_images=16, seed=3)
        shown.choose(dm, "fit")
        notebook = NotebookPictures(num_images=4, seed=3)
        notebook.choose(dm, "fit")
        chosen, labels = shown.pick(dm.train_set, 16, "num_images")  # as the data module holds them
        (train, train_labels), (val, _) = shown.inputs["train"], shown.inputs["val"]
        assert torch.equal(train_labels, labels)  # each drawn image keeps its own label (a conditional model's input)
        assert binary(train) == binary(notebook.train_images) == binary(val) == (mode != "none")
        if mode == "dynamic":
            assert not binary(chosen)  # grey levels in the data module: training draws them afresh every epoch
            again = Reconstructions(num_images=16, seed=3)
            again.choose(dm, "fit")
            assert torch.equal(again.inputs["train"][0], train)  # one draw: every epoch, every run
            assert torch.all(train[chosen == 0] == 0) and torch.all(train[chosen == 1] == 1)  # a draw of these images
            assert train.mean().item() == pytest.approx(chosen.mean().item(), abs=0.02)
        else:
            assert torch.equal(train, chosen)
