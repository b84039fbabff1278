"""Pictures of the latent space: the 2-D manifold and scatter or TensorBoard's PROJECTOR, and latent traversals."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule, Trainer

from vaelab.model.latent import unit_kl
from vaelab.model.vae import VAE
from vaelab.pictures.base import FIT_STAGES, PictureCallback, evaluating, grid, label_column, tensorboard_writers

SPRITE_SIDE = 8192  # TensorBoard's projector shows no sprite larger than this, in pixels a side
# What would break a row of the projector's metadata.tsv: a tab starts a column, a newline (or another line break) a row.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def projector_label(name: str) -> str:
    """A class name as one cell of the projector's metadata.tsv: control characters written as escapes (a newline
    as the two characters \\n), the rest as it is."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), name)


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """The projector's thumbnails: the images themselves, shrunk (area averaging) only where the sprite of all of them
    would exceed SPRITE_SIDE pixels a side (2,000 images: 45 a side, so images of up to 182 pixels stay as they are)."""
    images = images.float().cpu()
    cell = SPRITE_SIDE // math.ceil(math.sqrt(len(images)))
    h, w = images.shape[-2:]
    if max(h, w) <= cell:
        return images
    scale = cell / max(h, w)
    return F.interpolate(images, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="area")


def add_projector(writer, points: torch.Tensor, metadata: list[str], images: torch.Tensor, step: int, tag: str) -> None:
    """What `writer.add_embedding(points, metadata, label_img=images, global_step=step, tag=tag)` writes, the same
    files for the PROJECTOR, in a fraction of its time (1.35 s for vaelab's 2,000 x 256 means, most of a run's end):
    TensorBoard formats tensors.tsv one number at a time in Python and builds its sprite in float64, PNG-encoded at
    zlib level 6; here numpy formats each row (float32 exactly: 9 digits), the sprite is built in bytes in one reshape and
    encoded at level 1 (vaelab.pictures.png). Its pixels truncated to 1/255 as TensorBoard's are; images of any
    aspect laid out `ceil(sqrt(N))` a row, as the PROJECTOR reads them. tests/pictures compares it with add_embedding."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from torch.utils.tensorboard._embedding import get_embedding_info, make_tsv, write_pbtxt

    from vaelab.pictures.png import encode_png

    subdir = f"{step:05d}/{tag}"
    folder = Path(writer.get_logdir()) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "tensors.tsv", points.float().cpu().numpy(), fmt="%.9g", delimiter="\t")
    make_tsv(metadata, str(folder))
    count, channels, height, width = images.shape
    side = math.ceil(math.sqrt(count))
    pixels = images.detach().cpu().double().mul(255).clamp_(0, 255).to(torch.uint8)  # truncated, as TensorBoard's
    cells = torch.zeros(side * side, 3, height, width, dtype=torch.uint8)  # laid out in bytes: an eighth of float64's
    cells[:count] = pixels.expand(-1, 3, -1, -1)  # grey as RGB, as TensorBoard's
    sprite = cells.view(side, side, 3, height, width).permute(0, 3, 1, 4, 2).reshape(side * height, side * width, 3)
    (folder / "sprite.png").write_bytes(encode_png(sprite))
    config = ProjectorConfig()
    config.embeddings.extend([get_embedding_info(metadata, images, subdir, step, tag)])
    write_pbtxt(writer.get_logdir(), text_format.MessageToString(config))


class LatentMap(PictureCallback):
    """`latent_map`: with a 2-D latent space, every `every_n_epochs` epochs, the decoded manifold over a
    grid of Gaussian quantiles (tag `latent_map`) and a scatter of validation latent means coloured by
    class (tag `latent_map/scatter`); with a larger one, the validation latent means with their class
    names and thumbnails in TensorBoard's PROJECTOR tab (tag `latent_map`), once, at the end of training."""

    name = "latent_map"

    def __init__(self, grid_size: int = 20, quantile_range: tuple[float, float] = (0.05, 0.95), num_points: int = 2000, **kwargs):
        super().__init__(**kwargs)
        low, high = quantile_range
        self.grid_size, self.quantile_range, self.num_points = grid_size, (float(low), float(high)), num_points
        self.images = self.labels = self.names = None

    def choose(self, datamodule, stage: str) -> None:
        if stage in FIT_STAGES:
            # up to num_points: a small folder of images may have fewer validation images, and all of them are shown
            self.images, self.labels = self.pick(
                datamodule.val_set, min(self.num_points, len(datamodule.val_set[0])), "num_points"
            )
            self.names = getattr(datamodule, "classes", None)  # the data's own class names (a folder's subfolders)

    def on_validation_epoch_end(self, trainer, pl_module):
        if pl_module.vae.latent_dim == 2:
            super().on_validation_epoch_end(trainer, pl_module)

    def label_names(self, labels) -> list[str]:
        return [self.names[k] if self.names and k < len(self.names) else str(k) for k in labels]

    def manifold(self, vae: VAE, label: int | None = None) -> torch.Tensor:
        """Decoded z over a regular grid of Gaussian quantiles: z[0] grows to the right, z[1] upwards (a conditional
        VAE: decoded as class `label`)."""
        quantiles = torch.linspace(*self.quantile_range, self.grid_size, device=vae.device)
        values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
        z = torch.cartesian_prod(values.flip(0), values)[:, [1, 0]]  # row-major: top row first
        y = None if label is None else torch.full((len(z),), label, device=z.device)
        return grid(vae.decode_mean(z, y), self.grid_size)

    def scatter(self, mu: torch.Tensor, epoch: int) -> torch.Tensor:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D

        mu, labels = mu.float().cpu().numpy(), self.labels.cpu().numpy()
        figure = Figure(figsize=(6.4, 5.6), dpi=100)
        canvas = FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        count = max(len(self.names or []), int(labels.max()) + 1)
        # tab10 for up to 10 classes (Fashion-MNIST's pictures as they always were), tab20 up to 20, then a ramp
        cmap, top = ("tab10", 10) if count <= 10 else ("tab20", 20) if count <= 20 else ("turbo", count)
        points = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=top - 0.5, s=4, alpha=0.7)
        present = np.unique(labels)
        if len(present) <= 20:  # one legend entry per class present, with its name
            handles = [Line2D([], [], marker="o", ls="", color=points.cmap(points.norm(k)), markersize=5) for k in present]
            ax.legend(handles, self.label_names(present), fontsize=7, markerscale=0.8, loc="upper right")
        ax.set(xlabel="z[0]", ylabel="z[1]", title=f"validation latent means, epoch {epoch}")
        figure.tight_layout()
        canvas.draw()
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255

    def pictures(self, trainer, vae):
        mu = vae.encode(self.images, self.labels)[0]
        scatter = {"latent_map/scatter": self.scatter(mu, trainer.current_epoch)}
        if not vae.conditional:
            return {"latent_map": self.manifold(vae), **scatter}
        # A conditional VAE's manifold depends on the class: one per class, `latent_map/<label>_<name>`.
        names = vae.class_names
        return {
            **{f"latent_map/{k}_{re.sub(r'[^A-Za-z0-9-]+', '_', name)}": self.manifold(vae, k) for k, name in enumerate(names)},
            **scatter,
        }

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        vae = pl_module.vae
        if vae.latent_dim == 2 or not trainer.is_global_zero or self.images is None:
            return
        with evaluating(vae):
            mu = vae.encode(self.images, self.labels)[0].float().cpu()
        metadata = [projector_label(name) for name in self.label_names(self.labels.cpu().tolist())]  # one row per point
        for writer in tensorboard_writers(trainer):
            add_projector(writer, mu, metadata, thumbnails(self.images), trainer.global_step, "latent_map")


class Traversals(PictureCallback):
    """`traversals`: latent traversals of one fixed validation image (the first of the seeded picks, the first
    input of `reconstructions/val` with the same seed). The `num_units` units with the largest KL(q(z_u|x) ||
    N(0, 1)) averaged over `kl_images` fixed validation images (all of them if fewer), i.e. the most used units,
    most used first (ties by index), one row each: the image's posterior mean with that unit alone set to
    mean + v, for `steps` values v evenly spaced over [-range_std, range_std] (prior standard deviations),
    decoded. With an odd `steps` the middle column is the reconstruction. A label column left of the rows names
    each unit and its KL: `z17`, `KL 3.21` (nats). With fewer units than `num_units` (latent_dim 2), every unit
    gets a row."""

    name = "traversals"

    def __init__(self, num_units: int = 8, range_std: float = 3.0, steps: int = 11, kl_images: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.num_units, self.range_std, self.steps, self.kl_images = num_units, float(range_std), steps, kl_images
        self.images = self.labels = None

    def choose(self, datamodule, stage: str) -> None:
        if stage in FIT_STAGES:
            # At most kl_images: a small validation set (an own image folder) is averaged over whole.
            n = min(self.kl_images, len(datamodule.val_set[0]))
            self.images, self.labels = self.pick(datamodule.val_set, n, "kl_images")

    def rows(self, vae: VAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(units [k], their mean KL [k], decoded traversals [k * steps, C, H, W]), most used unit first (a
        conditional VAE: every image encoded with its own label, the traversals decoded with the traversed one's)."""
        mu, logvar = (t.float() for t in vae.encode(self.images, self.labels))
        kl = unit_kl(mu, logvar)
        units = torch.sort(kl, descending=True, stable=True).indices[: self.num_units]
        offsets = torch.linspace(-self.range_std, self.range_std, self.steps, device=mu.device)
        z = mu[0].expand(len(units), self.steps, -1).clone()  # mu[0]: the traversed image, the first of the picks
        rows = torch.arange(len(units), device=mu.device)
        z[rows, :, units] += offsets  # row r: unit units[r] moves along the offsets, the other units stay put
        z = z.flatten(0, 1)
        y = self.labels[:1].expand(len(z)) if vae.conditional else None  # the traversed image's label
        return units, kl[units], vae.decode_mean(z, y)

    def pictures(self, trainer, vae):
        units, kl, decoded = self.rows(vae)
        traversal = grid(decoded, self.steps)
        labels = [f"z{u}\nKL {k:.2f}" for u, k in zip(units.tolist(), kl.tolist())]
        strip = label_column(labels, decoded.shape[-2], traversal.shape[-2]).to(traversal.device)
        return {"traversals": torch.cat([strip, traversal], dim=-1)}
