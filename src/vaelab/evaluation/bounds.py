"""The test-set figures of a trained VAE (what vaelab-eval reports), in nats per image:

- the negative ELBO, -E_q[log p(x|z)] + KL(q(z|x) || p(z)), and its two parts (beta = 1, whatever the training beta);
- the importance-weighted estimate of -log p(x) (Burda et al., the IWAE bound):
      -log p(x) ~ -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x),
  computed with logsumexp; it is never above the negative ELBO in expectation and tightens as K grows;
- active units: latent dimensions u with Var_x(E_q[z_u|x]) > threshold (Burda et al.);
- the reconstruction error of noisy inputs against the clean images, for each noise level.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from pathlib import Path

import torch

from vaelab.model.vae import PAIRS_PER_PASS, VAE, add_noise, bounds


@torch.no_grad()
def likelihood(
    vae: VAE,
    images: torch.Tensor,
    num_samples: int,
    pairs_per_pass: int = 20000,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    advance: Callable[[int], object] = lambda images: None,
) -> dict[str, torch.Tensor]:
    """Per-image negative ELBO parts, IWAE estimate of -log p(x) (nats) and posterior means, for every image.

    The reconstruction term averages the same K samples the IWAE estimate uses (less noise than one sample);
    the KL term is exact. Images go through in chunks of pairs_per_pass // K, the samples of a chunk drawn as one
    draw, decoded in passes of at most min(pairs_per_pass, vaelab.model.vae.PAIRS_PER_PASS) (image, sample) pairs
    (the same figures as one pass of the chunk, in half the time); with K above that, the samples of one image are
    split too. A density
    likelihood sees the images dequantised with `generator`'s noise (vaelab.model.vae.VAE.target). labels: the images'
    classes, for a conditional VAE (the figures are then conditioned on them). advance(n): n more images are done.
    """
    # The results are written into tensors allocated once: small tensors kept from every chunk would pin the freed
    # decoder outputs in glibc's heap (measured: 7.5 MB more resident memory per image at K = 5000, killed by the
    # OOM killer at 15.8 GB on the 10,000 test images; flat with this).
    n, latent_dim = images.shape[0], vae.latent_dim
    result = {key: torch.empty(n, dtype=torch.float64, device=images.device) for key in ("recon", "kl", "nll_iwae")}
    result["mu"] = torch.empty(n, latent_dim, device=images.device)
    start = 0
    chunk = max(1, pairs_per_pass // num_samples)
    # decoded in passes of at most PAIRS_PER_PASS pairs (speed), drawn as in one pass of the chunk (the same figures)
    passes = min(pairs_per_pass, PAIRS_PER_PASS)
    for x, y in zip(images.split(chunk), repeat(None) if labels is None else labels.split(chunk)):
        target = vae.target(x, generator)
        mu, logvar = vae.encode(target, y)
        stop = start + x.shape[0]
        for key, value in bounds(vae, target, mu, logvar, num_samples, passes, generator, labels=y).items():
            result[key][start:stop] = value
        result["mu"][start:stop] = mu
        start = stop
        advance(x.shape[0])
    result["neg_elbo"] = result["recon"] + result["kl"]
    return result


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent units whose posterior mean varies across images: Var_x(E_q[z_u|x]) > threshold."""
    return int((mu.double().var(dim=0, unbiased=False) > threshold).sum())


@torch.no_grad()
def noisy_input_errors(
    vae: VAE,
    images: torch.Tensor,
    noise_levels,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    advance: Callable[[int], object] = lambda images: None,
) -> list[dict[str, float]]:
    """For each noise std: decode the posterior mean of the noisy input, compare with the clean image.

    recon_nats: the model's negative log-likelihood of the clean image, nats/image; mse: per pixel, of the
    decoded means. Every level sees the same images; the noise comes from `generator`. labels: as likelihood's.
    advance(n): n more images are done (each image once per level).
    """
    rows = []
    for level in noise_levels:
        nats, squared, count = 0.0, 0.0, 0
        for x, y in zip(images.split(batch_size), repeat(None) if labels is None else labels.split(batch_size)):
            target = vae.target(x, generator)
            noisy = add_noise(target, float(level), generator)
            out = vae.decode(vae.encode(noisy, y)[0], y)
            nats += vae.likelihood.nll(out, target).double().sum().item()
            squared += (vae.likelihood.mean(out) - x).double().pow(2).sum().item()
            count += x.shape[0]
            advance(x.shape[0])
        rows.append({"noise_level": float(level), "recon_nats": nats / count, "mse": squared / (count * x[0].numel())})
    return rows


def plot_noise_errors(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Error against noise level, nats/image and MSE/pixel side by side, as a PNG of 1000 x 400 pixels."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    levels = [r["noise_level"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in [
        (axes[0], "recon_nats", "-log p(clean | decode(mu(noisy))), nats/image"),
        (axes[1], "mse", "MSE per pixel, decoded mean vs clean"),
    ]:
        ax.plot(levels, [r[key] for r in rows], marker="o")
        ax.set_xlabel("input noise std")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)  # no bbox_inches="tight": the size stays figsize * dpi
    plt.close(fig)
