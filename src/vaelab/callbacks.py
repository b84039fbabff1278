"""Pictures in TensorBoard: reconstructions, noisy reconstructions, interpolations, prior samples, latent map,
latent traversals, and the Keras notebook's own pictures (experiment=notebook).

Each picture is a Lightning callback with its own config in conf/callbacks/. They share one pattern
(`PictureCallback`): fixed inputs are picked once with a seeded generator, so every epoch shows the same
images; every `every_n_epochs` validation epochs a torchvision grid is drawn in eval mode without
gradients, on rank 0 only, logged through each TensorBoard logger's SummaryWriter and saved with the
same pixels as `<image_dir>/<tag with / as _>_epochNNN.png` (epochs count from 0, as in checkpoint names).

A conditional VAE (model.conditional=true) draws every picture of images with each image's own label; pictures
drawn from the prior name the labels they use (`Samples`: also `samples/by_class`, one row per class).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from vaelab.data import seeded_order
from vaelab.errors import UserError
from vaelab.module import add_noise, gaussian_kl

PADDING = 2  # pixels between the cells (images of any size, grey or RGB) of every grid
PAD_VALUE = 1.0  # white lines: the images' own backgrounds are black
INTERPOLATIONS = ("linear", "spherical")
FIT_STAGES = ("fit", "validate")  # the stages that run validation epochs, where most pictures are drawn


def reconstruct(pl_module: LightningModule, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded posterior means, as pixel probabilities: deterministic, so epochs compare. y: the images' labels
    (used by a conditional VAE only)."""
    mu, _ = pl_module.encode(x, y)
    return pl_module.decode_mean(mu, y)


def is_conditional(pl_module: LightningModule) -> bool:
    return bool(getattr(pl_module, "conditional", False))


def interpolate(a: torch.Tensor, b: torch.Tensor, steps: int, method: str = "linear") -> torch.Tensor:
    """(pairs, steps, latent) points from a to b, endpoints exactly a and b.

    spherical: along the great circle between the two directions (slerp), which keeps the norm of
    Gaussian latents typical instead of cutting through the low-density centre; falls back to linear
    where the two are (anti)parallel.
    """
    t = torch.linspace(0.0, 1.0, steps, device=a.device, dtype=a.dtype).view(1, -1, 1)
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    linear = (1 - t) * a + t * b
    if method == "linear":
        return linear
    omega = torch.acos(F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)).unsqueeze(-1)
    sin_omega = torch.sin(omega)
    # The weights first, so that they are exactly 1 and 0 at the ends and the endpoints are a and b bit for bit.
    weight_a, weight_b = torch.sin((1 - t) * omega) / sin_omega, torch.sin(t * omega) / sin_omega
    return torch.where(sin_omega.abs() < 1e-6, linear, weight_a * a + weight_b * b)


@torch.no_grad()
def interpolation_rows(
    vae: LightningModule,
    starts: torch.Tensor,
    ends: torch.Tensor,
    num_steps: int,
    method: str = "linear",
    start_labels: torch.Tensor | None = None,
    end_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """[pairs * (num_steps + 2), C, H, W]: per pair, the start image, num_steps images decoded along the path
    between the two posterior means (its ends are the two reconstructions), the end image. A conditional VAE
    encodes each image with its own label and decodes the path with the one-hot labels mixed linearly along it
    (the start's label at the start, the end's at the end)."""
    labels = None
    if is_conditional(vae):
        k = vae.num_classes
        t = torch.linspace(0.0, 1.0, num_steps, device=starts.device).view(1, -1, 1)
        a, b = (F.one_hot(y, k).float().unsqueeze(1) for y in (start_labels, end_labels))
        labels = ((1 - t) * a + t * b).flatten(0, 1)
    z = interpolate(vae.encode(starts, start_labels)[0], vae.encode(ends, end_labels)[0], num_steps, method)
    decoded = vae.decode_mean(z.flatten(0, 1), labels).unflatten(0, z.shape[:2])
    return torch.cat([starts.unsqueeze(1), decoded, ends.unsqueeze(1)], dim=1).flatten(0, 1)


@contextmanager
def evaluating(pl_module: LightningModule):
    """Eval mode and no gradients for the duration, then the module's mode as it was."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        pl_module.train(was_training)


def tensorboard_writers(trainer: Trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class PictureCallback(Callback):
    """Pick fixed inputs once (seeded); every `every_n_epochs` validation epochs log the grids of `pictures`.

    Subclasses set `name` (their file in conf/callbacks/), override `choose` (pick inputs when the data is
    set up, before training starts) and `pictures` (tag -> image tensor (3, H, W) in [0, 1]).
    """

    name = "picture"

    def __init__(self, every_n_epochs: int = 1, seed: int = 0, image_dir: str | None = None):
        self.every_n_epochs, self.seed = every_n_epochs, seed
        self.image_dir = Path(image_dir) if image_dir else None  # None: <trainer.default_root_dir>/images

    def pick(
        self, tensors: tuple[torch.Tensor, torch.Tensor], n: int, key: str, per_value: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n (image, label) pairs chosen by a generator seeded with `seed`: the same every epoch and every run.
        `key` is the setting that asks for them, per_value images for each unit of it (2 for pairs)."""
        images, labels = tensors
        if n > len(images):
            raise UserError(
                f"callbacks.{self.name}.{key}={n // per_value} is too large: at most {len(images) // per_value} "
                f"({len(images)} images to draw from); lower it, e.g. callbacks.{self.name}.{key}={len(images) // per_value}"
            )
        index = seeded_order(len(images), self.seed)[:n].to(images.device)
        return images[index], labels[index]

    def pick_training(self, datamodule, n: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """n training images chosen as `pick` chooses them, prepared as training sees them: under
        data.binarize=dynamic each is one Bernoulli draw of its grey levels, fixed by `seed` (training draws afresh
        every epoch; the validation and test sets, and static training images, are binarized already)."""
        images, labels = self.pick(datamodule.train_set, n, key)
        if getattr(datamodule, "binarize", "none") != "dynamic":
            return images, labels
        return torch.bernoulli(images, generator=torch.Generator(device=images.device).manual_seed(self.seed)), labels

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_set"):
            raise UserError(
                f"callbacks.{self.name} needs a datamodule holding train_set/val_set/test_set tensors "
                f"(vaelab.data.TensorData); drop it with ~callbacks.{self.name}"
            )
        self.choose(datamodule, stage)

    def choose(self, datamodule, stage: str) -> None:
        pass

    def pictures(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def due(self, trainer: Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.due(trainer):
            self.publish(trainer, pl_module, self.pictures, f"epoch{trainer.current_epoch:03d}")

    def publish(self, trainer: Trainer, pl_module: LightningModule, draw, suffix: str | None) -> None:
        """Draw (rank 0 only: one set of pictures under DDP), then log and save every picture."""
        if not trainer.is_global_zero:
            return
        with evaluating(pl_module):
            pictures = draw(trainer, pl_module)
        for tag, image in pictures.items():
            self.log_image(trainer, tag, image, suffix)

    def log_image(self, trainer: Trainer, tag: str, image: torch.Tensor, suffix: str | None) -> None:
        image = image.detach().float().cpu()
        # save_image's own rounding, done once here: TensorBoard and the PNG then hold the same pixels
        # (SummaryWriter would truncate floats to uint8 instead of rounding them).
        pixels = image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
        for writer in tensorboard_writers(trainer):
            writer.add_image(tag, pixels, global_step=trainer.global_step)
        image_dir = self.image_dir or Path(trainer.default_root_dir) / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        stem = tag.replace("/", "_") + (f"_{suffix}" if suffix else "")
        save_image(image, image_dir / f"{stem}.png")


def grid(images: torch.Tensor, ncols: int) -> torch.Tensor:
    return make_grid(images, nrow=ncols, padding=PADDING, pad_value=PAD_VALUE)


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

    def draw(self, pl_module: LightningModule, split: str) -> torch.Tensor:
        x, y = self.inputs[split]
        return grid(torch.cat([x, reconstruct(pl_module, x, y)]), self.num_images)

    def pictures(self, trainer, pl_module):
        return {f"reconstructions/{split}": self.draw(pl_module, split) for split in ("train", "val")}

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

    def pictures(self, trainer, pl_module):
        rows = torch.cat([self.clean, self.noisy, reconstruct(pl_module, self.noisy, self.labels)])
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

    def pictures(self, trainer, pl_module):
        n = self.num_pairs
        rows = interpolation_rows(pl_module, self.starts, self.ends, self.steps, self.method, self.labels[:n], self.labels[n:])
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

    def pictures(self, trainer, pl_module):
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        if not is_conditional(pl_module):
            return {"samples": grid(pl_module.sample(self.num_samples, self.temperature, generator), self.ncols)}
        labels = torch.arange(self.num_samples, device=pl_module.device) % pl_module.num_classes
        samples = grid(pl_module.sample(self.num_samples, self.temperature, generator, labels), self.ncols)
        images, _ = self.by_class(pl_module)
        rows = grid(images, self.ncols)
        strip = label_column(list(pl_module.hparams.class_names), images.shape[-2], rows.shape[-2]).to(rows.device)
        return {"samples": samples, "samples/by_class": torch.cat([strip, rows], dim=-1)}

    def by_class(self, pl_module: LightningModule, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [num_classes * per_class, C, H, W], their labels): per_class (default ncols) samples of each class,
        class by class, sample j of every class decoded from the same seeded z."""
        per_class = per_class or self.ncols
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        z = torch.randn(per_class, pl_module.hparams.latent_dim, generator=generator, device=pl_module.device)
        labels = torch.arange(pl_module.num_classes, device=pl_module.device).repeat_interleave(per_class)
        z = (z * self.temperature).repeat(pl_module.num_classes, 1)
        return pl_module.decode_mean(z, labels), labels


SPRITE_SIDE = 8192  # TensorBoard's projector shows no sprite larger than this, in pixels a side


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
        if pl_module.hparams.latent_dim == 2:
            super().on_validation_epoch_end(trainer, pl_module)

    def label_names(self, labels) -> list[str]:
        return [self.names[k] if self.names and k < len(self.names) else str(k) for k in labels]

    def manifold(self, pl_module: LightningModule, label: int | None = None) -> torch.Tensor:
        """Decoded z over a regular grid of Gaussian quantiles: z[0] grows to the right, z[1] upwards (a conditional
        VAE: decoded as class `label`)."""
        quantiles = torch.linspace(*self.quantile_range, self.grid_size, device=pl_module.device)
        values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
        z = torch.cartesian_prod(values.flip(0), values)[:, [1, 0]]  # row-major: top row first
        y = None if label is None else torch.full((len(z),), label, device=z.device)
        return grid(pl_module.decode_mean(z, y), self.grid_size)

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

    def pictures(self, trainer, pl_module):
        mu = pl_module.encode(self.images, self.labels)[0]
        scatter = {"latent_map/scatter": self.scatter(mu, trainer.current_epoch)}
        if not is_conditional(pl_module):
            return {"latent_map": self.manifold(pl_module), **scatter}
        # A conditional VAE's manifold depends on the class: one per class, `latent_map/<label>_<name>`.
        names = pl_module.hparams.class_names
        return {
            **{
                f"latent_map/{k}_{re.sub(r'[^A-Za-z0-9-]+', '_', name)}": self.manifold(pl_module, k)
                for k, name in enumerate(names)
            },
            **scatter,
        }

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.hparams.latent_dim == 2 or not trainer.is_global_zero or self.images is None:
            return
        with evaluating(pl_module):
            mu = pl_module.encode(self.images, self.labels)[0].float().cpu()
        metadata = self.label_names(self.labels.cpu().tolist())
        for writer in tensorboard_writers(trainer):
            writer.add_embedding(
                mu, metadata=metadata, label_img=thumbnails(self.images), global_step=trainer.global_step, tag="latent_map"
            )


def unit_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """[latent_dim]: per latent unit u, the mean over the images of KL(q(z_u|x) || N(0, 1)), in nats."""
    return gaussian_kl(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)  # summed over a trailing axis of one: per unit


def label_column(texts: list[str], cell: int, height: int) -> torch.Tensor:
    """A white strip (3, height, width) to put left of a grid of `cell`-high rows: row r's text, in black, beside it.
    A text of two lines keeps only its first where two do not fit in a cell."""
    from PIL import Image, ImageDraw, ImageFont

    font, spacing = ImageFont.load_default(), 1
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    box = lambda text: measure.multiline_textbbox((0, 0), text, font=font, spacing=spacing)
    texts = [text if box(text)[3] - box(text)[1] <= cell else text.splitlines()[0] for text in texts]
    strip = Image.new("RGB", (max(box(text)[2] for text in texts) + 2 * PADDING, height), "white")
    draw = ImageDraw.Draw(strip)
    for row, text in enumerate(texts):
        left, top, _, bottom = box(text)
        y = PADDING + row * (cell + PADDING) + (cell - (bottom - top)) // 2 - top  # centred on the row
        draw.multiline_text((PADDING - left, y), text, fill="black", font=font, spacing=spacing)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


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

    def rows(self, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(units [k], their mean KL [k], decoded traversals [k * steps, C, H, W]), most used unit first (a
        conditional VAE: every image encoded with its own label, the traversals decoded with the traversed one's)."""
        mu, logvar = (t.float() for t in pl_module.encode(self.images, self.labels))
        kl = unit_kl(mu, logvar)
        units = torch.sort(kl, descending=True, stable=True).indices[: self.num_units]
        offsets = torch.linspace(-self.range_std, self.range_std, self.steps, device=mu.device)
        z = mu[0].expand(len(units), self.steps, -1).clone()  # mu[0]: the traversed image, the first of the picks
        rows = torch.arange(len(units), device=mu.device)
        z[rows, :, units] += offsets  # row r: unit units[r] moves along the offsets, the other units stay put
        z = z.flatten(0, 1)
        y = self.labels[:1].expand(len(z)) if is_conditional(pl_module) else None  # the traversed image's label
        return units, kl[units], pl_module.decode_mean(z, y)

    def pictures(self, trainer, pl_module):
        units, kl, decoded = self.rows(pl_module)
        traversal = grid(decoded, self.steps)
        labels = [f"z{u}\nKL {k:.2f}" for u, k in zip(units.tolist(), kl.tolist())]
        strip = label_column(labels, decoded.shape[-2], traversal.shape[-2]).to(traversal.device)
        return {"traversals": torch.cat([strip, traversal], dim=-1)}


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

    def sampled_codes(self, pl_module: LightningModule, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return pl_module.reparameterize(*pl_module.encode(x, y), generator)

    def latent_grid(self, pl_module: LightningModule, codes: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The notebook's grid from two codes; a conditional VAE decodes every cell as class `label` (the first
        image's)."""
        n = self.grid_size
        values = torch.from_numpy(np.linspace(codes.min().item(), codes.max().item(), n)).to(codes)  # as the notebook
        z = codes.new_empty(n, n, codes.shape[-1])
        z[:, :, 0::2] = values.view(n, 1, 1)  # row value
        z[:, :, 1::2] = values.view(1, n, 1)  # column value
        y = None if label is None else label.expand(n * n)
        return grid(pl_module.decode_mean(z.flatten(0, 1), y), n)

    def reconstructions(self, pl_module: LightningModule, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return grid(torch.cat([x, pl_module.decode_mean(self.sampled_codes(pl_module, x, y), y)]), len(x))

    def pictures(self, trainer, pl_module):
        codes = self.sampled_codes(pl_module, self.test_images[:2], self.test_labels[:2])
        n = self.num_images
        return {
            "notebook/latent_grid": self.latent_grid(pl_module, codes, self.test_labels[:1]),
            "notebook/reconstructions/train": self.reconstructions(pl_module, self.train_images, self.train_labels),
            "notebook/reconstructions/test": self.reconstructions(pl_module, self.test_images[:n], self.test_labels[:n]),
        }
