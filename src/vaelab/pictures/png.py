"""Image grids and PNG files, pixel for pixel as torchvision.utils' make_grid and save_image draw a batch of images
[B, C, H, W] in [0, 1], without importing torchvision: its import (torch._dynamo, through torchvision.ops) took
1.5 s of vaelab-generate's 6-7 s, which needs nothing else of it. tests/pictures/test_png.py compares the two."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """[3 (or C), rows, columns]: the images in rows of `nrow`, `padding` pixels of `pad_value` around each; grey
    images as RGB; a single image as it is."""
    if images.dim() != 4:
        raise ValueError(f"make_grid takes a batch of images [B, C, H, W], not a tensor of shape {list(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, columns * cell_w + padding), pad_value)
    for k, image in enumerate(images):
        top, left = (k // columns) * cell_h + padding, (k % columns) * cell_w + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def png_pixels(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """The grid of `images` (or one image [C, H, W]) as 8-bit RGB pixels [H, W, 3] on the CPU, rounded as
    torchvision's save_image rounds (SummaryWriter.add_image would truncate instead)."""
    grid = make_grid(images, nrow, padding, pad_value) if images.dim() == 4 else images
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return grid.detach().float().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)


def encode_png(pixels: torch.Tensor) -> bytes:
    """[H, W, 3] uint8 pixels as PNG bytes. zlib level 1, not PIL's 6: on vaelab's six pictures of the default run it
    took 18 ms an epoch against 65 ms, with files 3% smaller in all (lossless either way: the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> None:
    """The grid of `images` (or one image [C, H, W]) as an 8-bit PNG, rounded as torchvision's save_image rounds."""
    Path(path).write_bytes(encode_png(png_pixels(images, nrow, padding, pad_value)))
