"""`vaelab-generate`: picture grids from a trained VAE, written into the run directory.

samples.png: images decoded from z ~ N(0, temperature^2 I) (the means of p(x|z), e.g. sigmoid(logits) for the Bernoulli).
interpolation.png (interpolate=true): each row starts and ends with a random test image; between them, the
decoded points of the straight line between the two images' posterior means.

A conditional VAE's checkpoint (model.conditional=true): `label=Sandal` (a class name, in any case, or its index)
makes every sample of that class; without it, sample i is of class i mod the number of classes. Interpolations
encode each test image with its own label (vaelab.model.latent.interpolation_rows).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from vaelab import progress
from vaelab.data.tensors import seeded_order
from vaelab.errors import UserError, when_stopped
from vaelab.pictures.png import save_png
from vaelab.runs.checkpoints import load_vae
from vaelab.runs.hardware import resolve_device, use_threads

log = logging.getLogger(__name__)


def class_index(label, class_names: list[str] | None, ckpt_path: str) -> int:
    """The class `label` names (a class name in any case, or an index) among the checkpoint's classes; one line
    listing the valid ones otherwise, or saying that the checkpoint's model is not conditional."""
    text = str(label).strip()
    if not class_names:
        raise UserError(
            f"label={text}: the checkpoint {ckpt_path} is of an unconditional VAE, which takes no label; drop label=, "
            "or train a conditional one with vaelab-train model.conditional=true"
        )
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    valid = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
    raise UserError(f"label={text} is not a class of this checkpoint's model: give a name (any case) or an index: {valid}")


def run(cfg: DictConfig) -> dict[str, Path]:
    """Write samples.png (and interpolation.png); returns the written paths by name."""
    from vaelab.evaluation.test_data import test_set
    from vaelab.model.latent import interpolation_rows

    output_dir = Path(cfg.paths.output_dir)
    use_threads(cfg.threads)
    device = resolve_device(cfg.device)
    vae = load_vae(cfg.ckpt_path, device, tuple(cfg.allow_networks))
    class_names = vae.class_names  # None for an unconditional VAE
    n = int(cfg.num_samples)
    labels = None
    if cfg.get("label") is not None:
        index = class_index(cfg.label, class_names, str(cfg.ckpt_path))
        labels = torch.full((n,), index, device=device)
        log.info("samples of class %d, %s", index, class_names[index])
    elif vae.conditional:
        labels = torch.arange(n, device=device) % len(class_names)
        log.info("a conditional VAE: sample i is of class i mod %d (label=<name or index> for one class)", len(class_names))
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    written = {"samples": output_dir / "samples.png"} | (
        {"interpolation": output_dir / "interpolation.png"} if cfg.interpolate else {}
    )

    with progress.phase(", ".join(path.name for path in written.values()), len(written), "picture") as done:
        samples = vae.sample(n, temperature=float(cfg.temperature), generator=generator, labels=labels)
        nrow = int(cfg.nrow) if cfg.nrow else math.ceil(math.sqrt(int(cfg.num_samples)))
        save_png(samples, written["samples"], nrow=nrow, padding=2)
        done.advance()
        if cfg.interpolate:
            images, test_labels = test_set(cfg, vae)
            order = seeded_order(len(images), int(cfg.seed))[: 2 * int(cfg.num_pairs)]
            chosen, chosen_labels = images[order].to(device), test_labels[order].to(device)
            starts, ends = chosen_labels[0::2], chosen_labels[1::2]
            grid = interpolation_rows(vae, chosen[0::2], chosen[1::2], int(cfg.num_steps), start_labels=starts, end_labels=ends)
            save_png(grid, written["interpolation"], nrow=int(cfg.num_steps) + 2, padding=2)
            done.advance()

    when_stopped(f" after the pictures were written in {output_dir}: they are complete")
    for path in written.values():
        log.info("wrote %s", path)
    return written


def hydra_task(cfg: DictConfig) -> None:
    """The Hydra task of `vaelab-generate`."""
    when_stopped("; run it again for the pictures")
    run(cfg)
