"""The Keras teaching notebook's own pictures (experiment=notebook)."""

from __future__ import annotations

import numpy as np
import torch

from vaelab.model.vae import VAE
from vaelab.pictures.base import FIT_STAGES, PictureCallback, grid


class NotebookPictures(PictureCallback):
    """The Keras notebook's own pictures (on with experiment=notebook), every `every_n_epochs` validation epochs.

    Each code is drawn as the notebook's encoder draws it, z = mean + exp(log_sigma) * eps with
    eps ~ N(0, epsilon_std^2 I) (`VAE.reparameterize`: objective=notebook, epsilon_std=0.1), its eps from a
    generator seeded with `seed` on the model's device, fresh for each picture: the same eps every epoch.

    - `notebook/latent_grid` (its last-but-one cell): two test images (the first two of the seeded test picks,
      encoded together as one batch of two) are encoded with sampling; `values = np.linspace(lo, hi, grid_size)`
      with lo and hi the min and max over all entries of both codes; the cell in row i (top to bottom) and column
      j (left to right) is decoded from z with every even-indexed unit (z[0], z[2], ...) set to values[i] and
      every odd-indexed unit (z[1], z[3], ...) to values[j]: a grid_size x grid_size grid, values[0] (the
      smallest) at the top left. The two images enter only through lo and hi.
    - `notebook/reconstructions/train` and `notebook/reconstructions/test`: `num_images` fixed images of that
      set (top row) above their reconstructions (bottom row). Keras' `vae.predict` runs the sampling layer, so
      the notebook decodes a sampled z, and so do these (the other pictures decode posterior means).
    Decoded images are the decoder's pixel means (the notebook's sigmoid outputs)."""

    name = "notebook_pictures"

    def __init__(self, grid_size: int = 10, num_images: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.grid_size, self.num_images = grid_size, num_images
        self.train_images = self.test_images = self.train_labels = self.test_labels = None

    def choose(self, datamodule, stage: str) -> None:
        if stage in FIT_STAGES:
            self.train_images, self.train_labels = self.pick_training(datamodule, self.num_images, "num_images")
            self.test_images, self.test_labels = self.pick(datamodule.test_set, max(2, self.num_images), "num_images")

    def sampled_codes(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return vae.reparameterize(*vae.encode(x, y), generator)

    def latent_grid(self, vae: VAE, codes: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The notebook's grid from two codes; a conditional VAE decodes every cell as class `label` (the first
        image's)."""
        n = self.grid_size
        values = torch.from_numpy(np.linspace(codes.min().item(), codes.max().item(), n)).to(codes)  # as the notebook
        z = codes.new_empty(n, n, codes.shape[-1])
        z[:, :, 0::2] = values.view(n, 1, 1)  # row value
        z[:, :, 1::2] = values.view(1, n, 1)  # column value
        y = None if label is None else label.expand(n * n)
        return grid(vae.decode_mean(z.flatten(0, 1), y), n)

    def reconstructions(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return grid(torch.cat([x, vae.decode_mean(self.sampled_codes(vae, x, y), y)]), len(x))

    def pictures(self, trainer, vae):
        codes = self.sampled_codes(vae, self.test_images[:2], self.test_labels[:2])
        n = self.num_images
        return {
            "notebook/latent_grid": self.latent_grid(vae, codes, self.test_labels[:1]),
            "notebook/reconstructions/train": self.reconstructions(vae, self.train_images, self.train_labels),
            "notebook/reconstructions/test": self.reconstructions(vae, self.test_images[:n], self.test_labels[:n]),
        }
