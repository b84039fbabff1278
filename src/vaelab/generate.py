"""`vaelab-generate`: picture grids from a trained VAE, written into the run directory.

samples.png: images decoded from z ~ N(0, temperature^2 I) (the decoder's Bernoulli means, sigmoid(logits)).
interpolation.png (interpolate=true): each row starts and ends with a random test image; between them, the
decoded points of the straight line between the two images' posterior means.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.checkpoints import load_vae, resolve_device
from vaelab.train import CONF_DIR
from vaelab.validate import UserError, exit_cleanly

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Path]:
    """Write samples.png (and interpolation.png); returns the written paths by name."""
    # imported here: torchvision (which vaelab.callbacks needs too) takes seconds to import
    from torchvision.utils import save_image

    from vaelab.callbacks import interpolation_rows

    for key in ("num_samples", "num_pairs"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key}={cfg[key]} must be at least 1")
    if int(cfg.num_steps) < 2:
        raise ValueError(f"num_steps={cfg.num_steps} must be at least 2 (both ends of each line)")
    output_dir = Path(cfg.paths.output_dir)
    device = resolve_device(cfg.device)
    vae = load_vae(cfg.ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    written = {}

    samples = vae.sample(int(cfg.num_samples), temperature=float(cfg.temperature), generator=generator)
    nrow = int(cfg.nrow) if cfg.nrow else math.ceil(math.sqrt(int(cfg.num_samples)))
    written["samples"] = output_dir / "samples.png"
    save_image(samples, written["samples"], nrow=nrow, padding=2)

    if cfg.interpolate:
        datamodule = instantiate(cfg.data)
        datamodule.setup("test")
        test_images = datamodule.test_set[0]
        pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(int(cfg.seed)))[: 2 * int(cfg.num_pairs)]
        chosen = test_images[pick].to(device)
        grid = interpolation_rows(vae, chosen[0::2], chosen[1::2], int(cfg.num_steps))
        written["interpolation"] = output_dir / "interpolation.png"
        save_image(grid, written["interpolation"], nrow=int(cfg.num_steps) + 2, padding=2)

    for path in written.values():
        log.info("wrote %s", path)
    return written


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    """Entry point of `vaelab-generate`."""
    with exit_cleanly("vaelab-generate"):  # a bad checkpoint or a missing ckpt_path: one line on stderr, exit status 1
        if OmegaConf.is_missing(cfg, "ckpt_path"):
            raise UserError("ckpt_path is required, e.g. vaelab-generate ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt")
        run(cfg)


if __name__ == "__main__":
    main()
