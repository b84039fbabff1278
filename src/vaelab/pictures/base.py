"""What every picture shares: each picture (grids.py, latent_maps.py, notebook.py) is a Lightning callback with its own config in conf/callbacks/. They share one pattern
(`PictureCallback`): fixed inputs are picked once with a seeded generator, so every epoch shows the same
images; every `every_n_epochs` validation epochs a grid (vaelab.pictures.png) is drawn in eval mode without
gradients, on rank 0 only, logged through each TensorBoard logger's SummaryWriter as `visuals/<tag>` and saved with
the same pixels as `<image_dir>/<tag with / as _>_epochNNN.png` (epochs count from 0, as in checkpoint names); the
PNG encoding and both writes run on one writer thread, done before the epoch's checkpoint is written.

A conditional VAE (model.conditional=true) draws every picture of images with each image's own label; pictures
drawn from the prior name the labels they use (`Samples`: also `samples/by_class`, one row per class).
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from vaelab.data.tensors import seeded_order
from vaelab.errors import UserError
from vaelab.event_files import use_fast_checksums
from vaelab.model.vae import VAE
from vaelab.pictures.png import encode_png, make_grid, png_pixels

PADDING = 2  # pixels between the cells (images of any size, grey or RGB) of every grid
PAD_VALUE = 1.0  # white lines: the images' own backgrounds are black
# TensorBoard's TIME SERIES tab, the one it opens on, sorts its card groups by tag prefix and expands the first two:
# under this prefix the pictures come after the train/ and val/ curves.
TENSORBOARD_PREFIX = "visuals/"
FIT_STAGES = ("fit", "validate")  # the stages that run validation epochs, where most pictures are drawn


@contextmanager
def evaluating(module: torch.nn.Module):
    """Eval mode and no gradients for the duration, then the module's mode as it was."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


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
        self._writing: list[Future] = []  # this callback's pictures on the writer thread, not yet known written
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
        use_fast_checksums()  # the pictures are most of an event file's bytes (vaelab.event_files)
        datamodule = getattr(trainer.datamodule, "data", None)  # the plain source (vaelab.training.data.LightningData)
        if datamodule is None or not hasattr(datamodule, "val_set"):
            raise UserError(
                f"callbacks.{self.name} needs a datamodule holding train_set/val_set/test_set tensors "
                f"(vaelab.data.tensors.TensorData); drop it with ~callbacks.{self.name}"
            )
        self.choose(datamodule, stage)

    def choose(self, datamodule, stage: str) -> None:
        pass

    def pictures(self, trainer: Trainer, vae: VAE) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def due(self, trainer: Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.due(trainer):
            self.publish(trainer, pl_module, self.pictures, f"epoch{trainer.current_epoch:03d}")

    def publish(self, trainer: Trainer, pl_module: LightningModule, draw, suffix: str | None) -> None:
        """Draw with the plain VAE (rank 0 only: one set of pictures under DDP), then log and save every picture."""
        if not trainer.is_global_zero:
            return
        with evaluating(pl_module.vae):
            pictures = draw(trainer, pl_module.vae)
        for tag, image in pictures.items():
            self.log_image(trainer, tag, image, suffix)

    def log_image(self, trainer: Trainer, tag: str, image: torch.Tensor, suffix: str | None) -> None:
        """The pixels here; their PNG encoding (one for both copies: TensorBoard and the file hold the same bytes) and
        both writes on the pictures' writer thread, beside the epoch end's other work (the next pictures, the epoch's
        figures); waited for before the epoch's checkpoint and before the loggers close."""
        self.raise_background_fault()
        pixels = png_pixels(image)  # here: the picture may be on the GPU, and training goes on changing the model
        # add_image's own path (SummaryWriter.add_image encodes, then hands its file writer the summary)
        file_writers = [writer._get_file_writer() for writer in tensorboard_writers(trainer)]
        # Outside the run directory, vaelab-train gives image_dir to this run alone (rundir.take_folders_elsewhere).
        image_dir = self.image_dir or Path(trainer.default_root_dir) / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        path = image_dir / f"{tag.replace('/', '_')}{f'_{suffix}' if suffix else ''}.png"
        self._writing.append(
            writer_thread().submit(write_picture, pixels, TENSORBOARD_PREFIX + tag, file_writers, trainer.global_step, path)
        )

    def raise_background_fault(self) -> None:
        """A write that failed on the writer thread (a full disk) raised here, on the training's thread."""
        for done in [job for job in self._writing if job.done()]:
            self._writing.remove(done)
            done.result()

    def wait_for_writes(self) -> None:
        writing, self._writing = self._writing, []
        for job in writing:
            job.result()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before the epoch's checkpoint (Lightning runs the checkpoint callbacks' hooks last): a run resumed from that
        # checkpoint continues after this epoch, so its pictures must be in the event file and on disk by then.
        self.wait_for_writes()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.wait_for_writes()  # Lightning closes the loggers after the callbacks' teardown

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        with suppress(Exception):  # the exception that stopped the run is the one to report
            self.wait_for_writes()


@functools.cache  # one per process, made on first use
def writer_thread() -> ThreadPoolExecutor:
    """One thread for every picture's PNG encoding and writes, in order (zlib and file writes release the GIL: they
    run on another core beside the drawing of the next pictures; 27 ms an epoch for the default run's six)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaelab-pictures")


def write_picture(pixels: torch.Tensor, tag: str, file_writers: list, step: int, path: Path) -> None:
    png = encode_png(pixels)
    height, width, channels = pixels.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    for file_writer in file_writers:
        file_writer.add_summary(summary, step)
    path.write_bytes(png)


def grid(images: torch.Tensor, ncols: int) -> torch.Tensor:
    return make_grid(images, nrow=ncols, padding=PADDING, pad_value=PAD_VALUE)


def label_column(texts: list[str], cell: int, height: int) -> torch.Tensor:
    """A white strip (3, height, width) to put left of a grid of `cell`-high rows: row r's text, in black, beside it.
    A text of two lines keeps only its first where two do not fit in a cell."""
    from PIL import Image, ImageDraw, ImageFont

    font, spacing = ImageFont.load_default(), 1
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    box = functools.cache(lambda text: measure.multiline_textbbox((0, 0), text, font=font, spacing=spacing))  # once a text
    texts = [text if box(text)[3] - box(text)[1] <= cell else text.splitlines()[0] for text in texts]
    strip = Image.new("RGB", (max(box(text)[2] for text in texts) + 2 * PADDING, height), "white")
    draw = ImageDraw.Draw(strip)
    for row, text in enumerate(texts):
        left, top, _, bottom = box(text)
        y = PADDING + row * (cell + PADDING) + (cell - (bottom - top)) // 2 - top  # centred on the row
        draw.multiline_text((PADDING - left, y), text, fill="black", font=font, spacing=spacing)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255
