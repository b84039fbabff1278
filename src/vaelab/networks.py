"""Encoders map images to (mean, log-variance) of q(z|x); decoders map z to the parameters of p(x|z) per pixel
(Bernoulli logits by default; see vaelab.likelihoods)."""

from __future__ import annotations

import math

import torch
from torch import nn


class DenseEncoder(nn.Module):
    """The notebook's encoder: flatten, then one linear head each for the mean and the log-variance."""

    def __init__(self, latent_dim: int, image_shape=(1, 28, 28), hidden: tuple[int, ...] = ()):
        super().__init__()
        sizes = [math.prod(image_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.Linear(sizes[-1], 2 * latent_dim)  # mean and log-variance in one matmul

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.heads(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class DenseDecoder(nn.Module):
    """The notebook's decoder (linear from z to 784 logits); `hidden` adds ReLU layers in between.
    out_channels: channels of the output (default the image's; a likelihood with a mean and a scale per pixel
    asks for twice as many)."""

    def __init__(self, latent_dim: int, image_shape=(1, 28, 28), hidden: tuple[int, ...] = (), out_channels: int | None = None):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (out_channels or c, h, w)
        sizes = [latent_dim, *hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], math.prod(self.image_shape)))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).view(-1, *self.image_shape)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (28 -> 14 -> 7), then linear heads."""

    def __init__(self, latent_dim: int, image_shape=(1, 28, 28), channels: tuple[int, int] = (32, 64)):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"conv encoder needs image sides divisible by 4, got image_shape={tuple(image_shape)}")
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.heads = nn.Linear(c2 * (h // 4) * (w // 4), 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.heads(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: linear to a 7x7 map, then two stride-2 transposed convolutions (out_channels:
    as DenseDecoder's)."""

    def __init__(
        self, latent_dim: int, image_shape=(1, 28, 28), channels: tuple[int, int] = (32, 64), out_channels: int | None = None
    ):
        super().__init__()
        c, h, w = image_shape
        c = out_channels or c
        c1, c2 = channels
        self.start = (c2, h // 4, w // 4)
        self.body = nn.Sequential(
            nn.Linear(latent_dim, math.prod(self.start)),
            nn.ReLU(),
            nn.Unflatten(1, self.start),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, c, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)
