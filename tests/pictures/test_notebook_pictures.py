"""experiment=notebook logs the Keras notebook's own pictures: its 10 x 10 latent grid and its four-image train and
test reconstructions, read back with TensorBoard's reader and rebuilt here by hand from the same codes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA_DIR, SYSTEM_DIR, event_accumulator, image_tags, logged_images, train_run
from vaelab.data.mnist import MNISTLike
from vaelab.data.tensors import seeded_order

CELL, PAD, N = 28, 2, 10
NOTEBOOK_TAGS = {
    "notebook/latent_grid": (N, N),
    "notebook/reconstructions/train": (2, 4),
    "notebook/reconstructions/test": (2, 4),
}


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory) -> Path:
    """The notebook preset at its batch of 32, a few batches, one epoch, with the traversals switched off."""
    run = tmp_path_factory.mktemp("notebook") / "run"
    train_run(run, "experiment=notebook", "batch_size=32", "epochs=1", "trainer.limit_train_batches=15", "~callbacks.traversals")
    return run


@pytest.fixture(scope="module")
def notebook_vae(notebook_run):
    from vaelab.runs.checkpoints import load_vae

    # last.ckpt holds the weights that drew the pictures of the last (here the only) epoch
    return load_vae(notebook_run / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def splits():
    datamodule = MNISTLike(data_dir=str(DATA_DIR), system_dir=SYSTEM_DIR)
    datamodule.setup("fit")
    return {"train": datamodule.train_set[0], "test": datamodule.test_set[0]}


def logged(run: Path, tag: str) -> np.ndarray:
    """The one picture logged under tag, as HxWx3 uint8."""
    (event,) = logged_images(event_accumulator(run), tag)
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def picks(images: torch.Tensor, n: int) -> torch.Tensor:
    """The first n of the seeded order (seed 0), as every picture callback picks its fixed images."""
    return images[seeded_order(len(images), 0)[:n]]


def notebook_codes(vae, x: torch.Tensor, sampled: bool = True) -> torch.Tensor:
    """The notebook's encoder output: z = mean + exp(log_sigma) * eps, eps ~ N(0, 0.1^2), eps from a generator
    seeded with 0 (the callback's seed); sampled=False: the means alone."""
    with torch.no_grad():
        mean, log_sigma = vae.encode(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    return mean + torch.exp(log_sigma) * eps if sampled else mean


def to_pixels(p: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 as the pictures round them (to nearest)."""
    return np.clip(p * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)


def hand_grid(vae, codes: torch.Tensor, even_from_row: bool = True) -> np.ndarray:
    """The notebook's latent grid from two codes, by hand: values = linspace(min, max, 10) over both codes' entries;
    cell (i, j), row i from the top and column j from the left, decodes z with z[even] = values[i] and
    z[odd] = values[j] (even_from_row=False: the other way round); 28x28 cells with 2 white pixels between and
    around them."""
    codes = codes.numpy()
    values = np.linspace(float(codes.min()), float(codes.max()), N).astype(np.float32)
    z = np.empty((N * N, codes.shape[1]), dtype=np.float32)
    for i in range(N):
        for j in range(N):
            row, column = (values[i], values[j]) if even_from_row else (values[j], values[i])
            z[i * N + j, 0::2] = row
            z[i * N + j, 1::2] = column
    with torch.no_grad():
        decoded = torch.sigmoid(vae.decode(torch.from_numpy(z))).numpy()[:, 0]
    canvas = np.full((PAD + N * (CELL + PAD), PAD + N * (CELL + PAD)), 255, dtype=np.uint8)
    for i in range(N):
        for j in range(N):
            top, left = PAD + i * (CELL + PAD), PAD + j * (CELL + PAD)
            canvas[top : top + CELL, left : left + CELL] = to_pixels(decoded[i * N + j])
    return canvas


def test_notebook_pictures_are_logged_and_saved_and_traversals_switch_off(notebook_run):
    acc = event_accumulator(notebook_run)
    tags = image_tags(acc)
    assert set(NOTEBOOK_TAGS) <= tags
    assert "traversals" not in tags and not list((notebook_run / "images").glob("traversals*"))  # ~callbacks.traversals
    for tag, (rows, cols) in NOTEBOOK_TAGS.items():
        pixels = logged(notebook_run, tag)
        assert pixels.shape == (PAD + rows * (CELL + PAD), PAD + cols * (CELL + PAD), 3), tag
        png = notebook_run / "images" / f"{tag.replace('/', '_')}_epoch000.png"
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), pixels), tag


def test_notebook_grid_is_the_notebooks_construction_from_the_same_two_codes(notebook_run, notebook_vae, splits):
    pixels = logged(notebook_run, "notebook/latent_grid")
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()  # grey
    codes = notebook_codes(notebook_vae, picks(splits["test"], 2))  # the first two test picks, sampled
    expected = hand_grid(notebook_vae, codes)
    assert np.array_equal(pixels[..., 0], expected)
    # The test can tell: the codes without sampling, or rows and columns swapped, give other pixels.
    means = notebook_codes(notebook_vae, picks(splits["test"], 2), sampled=False)
    assert not np.array_equal(hand_grid(notebook_vae, means), expected)
    assert np.abs(hand_grid(notebook_vae, codes, even_from_row=False).astype(int) - expected).mean() > 1.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_notebook_reconstructions_show_four_images_above_their_sampled_reconstructions(split, notebook_run, notebook_vae, splits):
    pixels = logged(notebook_run, f"notebook/reconstructions/{split}")[..., 0]
    row = lambda r: np.stack([pixels[PAD + r * (CELL + PAD) :][:CELL, PAD + c * (CELL + PAD) :][:, :CELL] for c in range(4)])
    images = picks(splits[split], 4)
    assert np.array_equal(row(0), to_pixels(images[:, 0].numpy()))  # the four originals, exact
    with torch.no_grad():
        sampled = torch.sigmoid(notebook_vae.decode(notebook_codes(notebook_vae, images))).numpy()[:, 0]
        means = torch.sigmoid(notebook_vae.decode(notebook_codes(notebook_vae, images, sampled=False))).numpy()[:, 0]
    assert np.abs(row(1) / 255.0 - sampled).max() <= 0.6 / 255  # decoded from a sampled z, as vae.predict does
    assert np.abs(row(1) / 255.0 - means).max() > 2 / 255  # not from the means


def test_only_the_notebook_preset_draws_them_and_bad_settings_fail_in_one_line(compose):
    from vaelab.errors import UserError
    from vaelab.runs.settings import check

    assert "notebook_pictures" not in compose([]).callbacks
    assert compose(["experiment=notebook"]).callbacks.notebook_pictures.grid_size == N
    with pytest.raises(UserError, match=r"callbacks\.notebook_pictures\.grid_size=1 is not allowed: .* an integer >= 2"):
        check(compose(["experiment=notebook", "callbacks.notebook_pictures.grid_size=1"]), "train")
