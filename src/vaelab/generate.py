"""`vaelab-generate`: picture grids from a trained VAE, written into the run directory.

samples.png: images decoded from z ~ N(0, temperature^2 I) (the means of p(x|z), e.g. sigmoid(logits) for the Bernoulli).
interpolation.png (interpolate=true): each row starts and ends with a random test image; between them, the
decoded points of the straight line between the two images' posterior means.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from vaelab import rundir, schema
from vaelab.checkpoints import load_vae
from vaelab.data import seeded_order
from vaelab.errors import recorded, stopped_by_signals
from vaelab.hardware import resolve_device
from vaelab.sweep import job_reporting

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Path]:
    """Write samples.png (and interpolation.png); returns the written paths by name."""
    # imported here: torchvision (which vaelab.callbacks needs too) takes seconds to import
    from torchvision.utils import save_image

    from vaelab.callbacks import interpolation_rows
    from vaelab.evaluate import test_images

    schema.check(cfg, "generate")
    output_dir = Path(cfg.paths.output_dir)
    rundir.lock(output_dir)
    device = resolve_device(cfg.device)
    vae = load_vae(cfg.ckpt_path, device, tuple(cfg.allow_networks))
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    written = {}

    samples = vae.sample(int(cfg.num_samples), temperature=float(cfg.temperature), generator=generator)
    nrow = int(cfg.nrow) if cfg.nrow else math.ceil(math.sqrt(int(cfg.num_samples)))
    written["samples"] = output_dir / "samples.png"
    save_image(samples, written["samples"], nrow=nrow, padding=2)

    if cfg.interpolate:
        images = test_images(cfg, vae)
        chosen = images[seeded_order(len(images), int(cfg.seed))[: 2 * int(cfg.num_pairs)]].to(device)
        grid = interpolation_rows(vae, chosen[0::2], chosen[1::2], int(cfg.num_steps))
        written["interpolation"] = output_dir / "interpolation.png"
        save_image(grid, written["interpolation"], nrow=int(cfg.num_steps) + 2, padding=2)

    for path in written.values():
        log.info("wrote %s", path)
    return written


def hydra_task(cfg: DictConfig) -> None:
    """The Hydra task of `vaelab-generate`."""
    with job_reporting("vaelab-generate"), recorded(), stopped_by_signals("run it again for the pictures"):
        run(cfg)


if __name__ == "__main__":
    from vaelab.cli import generate as _main

    _main()
