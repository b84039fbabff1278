"""Operations on the latent space that the pictures and vaelab-generate share: reconstructions from posterior means,
paths between two codes, the KL each latent unit carries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vaelab.model.vae import VAE, gaussian_kl


def reconstruct(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded posterior means, as pixel probabilities: deterministic, so epochs compare. y: the images' labels
    (used by a conditional VAE only)."""
    mu, _ = vae.encode(x, y)
    return vae.decode_mean(mu, y)


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
    vae: VAE,
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
    if vae.conditional:
        k = vae.num_classes
        t = torch.linspace(0.0, 1.0, num_steps, device=starts.device).view(1, -1, 1)
        a, b = (F.one_hot(y, k).float().unsqueeze(1) for y in (start_labels, end_labels))
        labels = ((1 - t) * a + t * b).flatten(0, 1)
    z = interpolate(vae.encode(starts, start_labels)[0], vae.encode(ends, end_labels)[0], num_steps, method)
    decoded = vae.decode_mean(z.flatten(0, 1), labels).unflatten(0, z.shape[:2])
    return torch.cat([starts.unsqueeze(1), decoded, ends.unsqueeze(1)], dim=1).flatten(0, 1)


def unit_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """[latent_dim]: per latent unit u, the mean over the images of KL(q(z_u|x) || N(0, 1)), in nats."""
    return gaussian_kl(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)  # summed over a trailing axis of one: per unit
