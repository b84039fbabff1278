"""The test split a checkpoint is judged on (vaelab-eval) or interpolates between (vaelab-generate): the data the
settings name, prepared as the checkpoint's model was trained unless asked otherwise, checked against the model."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, open_dict

from vaelab.errors import UserError, build
from vaelab.model.vae import VAE

log = logging.getLogger(__name__)


def test_images(cfg: DictConfig, vae: VAE) -> torch.Tensor:
    """The test images of cfg.data, prepared as the checkpoint's model was trained (data.binarize=null, the
    default) unless asked otherwise; refused in one line when the model takes another shape."""
    return test_set(cfg, vae)[0]


def test_set(cfg: DictConfig, vae: VAE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of cfg.data's test split, the images as `test_images` prepares them."""
    if cfg.data.get("binarize", "none") is None:
        with open_dict(cfg):
            cfg.data.binarize = str(vae.settings.get("binarize", "none"))
        log.info("data.binarize=%s, as the checkpoint's model was trained", cfg.data.binarize)
    datamodule = build(cfg.data, "data")
    datamodule.setup("test")
    images, labels = datamodule.test_set
    model_shape = tuple(vae.image_shape)
    if model_shape != tuple(images.shape[1:]):
        c, h, w = model_shape
        size = f"data.image_size={h}" if h == w else f"data.image_size=null data.image_shape=[{c},{h},{w}]"
        raise UserError(
            f"the checkpoint's model takes {model_shape} images but data={cfg.data.dataset} has "
            f"{tuple(images.shape[1:])}; pass the data it was trained on, e.g. "
            + ("data=mnist" if model_shape == (1, 28, 28) else f"data=image_folder data.path=<dir> data.channels={c} {size}")
        )
    classes = int(getattr(vae, "num_classes", 0))
    if classes and len(labels) and int(labels.max()) >= classes:
        raise UserError(
            f"the checkpoint's conditional model knows {classes} classes but data={cfg.data.dataset} has labels up to "
            f"{int(labels.max())}: pass the data it was trained on"
        )
    return images, labels
