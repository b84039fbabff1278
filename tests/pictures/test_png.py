"""vaelab.pictures.png draws grids and PNGs pixel for pixel as torchvision.utils does (what it replaces, so that
vaelab-generate need not import torchvision)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid as torchvision_grid
from torchvision.utils import save_image

from vaelab.pictures.png import make_grid, save_png


@pytest.mark.parametrize(
    "shape, nrow, padding, pad_value",
    [((16, 1, 28, 28), 8, 2, 0.0), ((10, 3, 8, 12), 4, 2, 1.0), ((7, 1, 5, 5), 3, 0, 0.5), ((1, 3, 9, 9), 8, 2, 1.0)],
)
def test_grids_and_pngs_are_torchvision_s(tmp_path, shape, nrow, padding, pad_value):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(make_grid(images, nrow, padding, pad_value), torchvision_grid(images, nrow, padding, pad_value=pad_value))
    save_png(images, tmp_path / "ours.png", nrow, padding, pad_value)
    save_image(images, tmp_path / "theirs.png", nrow=nrow, padding=padding, pad_value=pad_value)
    ours, theirs = (np.asarray(Image.open(tmp_path / name)) for name in ("ours.png", "theirs.png"))
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)


def test_a_batch_it_cannot_draw_is_refused():
    with pytest.raises(ValueError, match=r"a batch of images \[B, C, H, W\]"):
        make_grid(torch.zeros(3, 4))


def test_vaelab_generate_imports_no_torchvision():
    check = "import vaelab.commands.generate, sys; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
