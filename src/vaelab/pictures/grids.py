"""Grids of images: reconstructions, noisy reconstructions, interpolations, prior samples."""

from __future__ import annotations

import torch
from pytorch_lightning import LightningModule, Trainer

from vaelab.model.latent import interpolation_rows, reconstruct
from vaelab.model.vae import VAE, add_noise
from vaelab.pictures.base import FIT_STAGES, PictureCallback, grid, label_column


class Reconstructions(PictureCallback):
    """`reconstructions/train` and `reconstructions/val`: fixed inputs (top row) above their reconstructions
    (bottom row) each epoch; `reconstructions/test` once on test images when the test stage runs."""

    name = "reconstructions"

    def __init__(self, num_images: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.num_images = num_images
        self.inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (images, labels)

    def choose(self, datamodule, stage: str) -> None:
        splits = ["train", "val"] if stage in FIT_STAGES else ["test"] if stage == "test" else []
        for split in splits:
            self.inputs[split] = (
                self.pick_training(datamodule, self.num_images, "num_images")
                if split == "train"
                else self.pick(getattr(datamodule, f"{split}_set"), self.num_images, "num_images")
            )

    def draw(self, vae: VAE, split: str) -> torch.Tensor:
        x, y = self.inputs[split]
        return grid(torch.cat([x, reconstruct(vae, x, y)]), self.num_images)

    def pictures(self, trainer, vae):
        return {f"reconstructions/{split}": self.draw(vae, split) for split in ("train", "val")}

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.publish(trainer, pl_module, lambda trainer, m: {"reconstructions/test": self.draw(m, "test")}, None)


class NoisyReconstructions(PictureCallback):
    """`noisy_reconstructions`: fixed validation inputs, the same with Gaussian noise of `noise_factor`
    (clipped to [0, 1], one fixed draw), and the reconstructions of the noisy inputs: three rows."""

    name = "noisy_reconstructions"

    def __init__(self, num_images: int = 16, noise_factor: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_images, self.noise_factor = num_images, float(noise_factor)
        self.clean = self.noisy = self.labels = None

    def choose(self, datamodule, stage: str) -> None:
        if stage in FIT_STAGES:
            self.clean, self.labels = self.pick(datamodule.val_set, self.num_images, "num_images")
            generator = torch.Generator(device=self.clean.device).manual_seed(self.seed)
            self.noisy = add_noise(self.clean, self.noise_factor, generator)

    def pictures(self, trainer, vae):
        rows = torch.cat([self.clean, self.noisy, reconstruct(vae, self.noisy, self.labels)])
        return {"noisy_reconstructions": grid(rows, self.num_images)}


class Interpolation(PictureCallback):
    """`interpolation`: one row per pair of validation images: the first image, `steps` images decoded
    along the path between the two latent means (its ends are the two reconstructions), the second image."""

    name = "interpolation"

    def __init__(self, num_pairs: int = 8, steps: int = 10, method: str = "linear", **kwargs):
        super().__init__(**kwargs)
        self.num_pairs, self.steps, self.method = num_pairs, steps, method
        self.starts = self.ends = self.labels = None

    def choose(self, datamodule, stage: str) -> None:
        if stage in FIT_STAGES:
            images, self.labels = self.pick(datamodule.val_set, 2 * self.num_pairs, "num_pairs", per_value=2)
            self.starts, self.ends = images[: self.num_pairs], images[self.num_pairs :]

    def pictures(self, trainer, vae):
        n = self.num_pairs
        rows = interpolation_rows(vae, self.starts, self.ends, self.steps, self.method, self.labels[:n], self.labels[n:])
        return {"interpolation": grid(rows, self.steps + 2)}


class Samples(PictureCallback):
    """`samples`: images decoded from z ~ N(0, temperature^2 I), the same seeded z every epoch.

    A conditional VAE decodes sample i with class i mod num_classes in `samples`, and also draws `samples/by_class`:
    one row per class (its name in a label column on the left), `ncols` samples each; column j decodes the same z
    in every row, so a column shows one draw of the prior as each class."""

    name = "samples"

    def __init__(self, num_samples: int = 64, ncols: int = 8, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_samples, self.ncols, self.temperature = num_samples, ncols, float(temperature)

    def pictures(self, trainer, vae):
        generator = torch.Generator(device=vae.device).manual_seed(self.seed)
        if not vae.conditional:
            return {"samples": grid(vae.sample(self.num_samples, self.temperature, generator), self.ncols)}
        labels = torch.arange(self.num_samples, device=vae.device) % vae.num_classes
        samples = grid(vae.sample(self.num_samples, self.temperature, generator, labels), self.ncols)
        images, _ = self.by_class(vae)
        rows = grid(images, self.ncols)
        strip = label_column(list(vae.class_names), images.shape[-2], rows.shape[-2]).to(rows.device)
        return {"samples": samples, "samples/by_class": torch.cat([strip, rows], dim=-1)}

    def by_class(self, vae: VAE, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [num_classes * per_class, C, H, W], their labels): per_class (default ncols) samples of each class,
        class by class, sample j of every class decoded from the same seeded z."""
        per_class = per_class or self.ncols
        generator = torch.Generator(device=vae.device).manual_seed(self.seed)
        z = torch.randn(per_class, vae.latent_dim, generator=generator, device=vae.device)
        labels = torch.arange(vae.num_classes, device=vae.device).repeat_interleave(per_class)
        z = (z * self.temperature).repeat(vae.num_classes, 1)
        return vae.decode_mean(z, labels), labels
