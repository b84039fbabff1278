"""Encoders map images to (mean, log-variance) of q(z|x); decoders map z to the parameters of p(x|z) per pixel
(Bernoulli logits by default; see vaelab.model.likelihoods).

Conditional networks (num_classes > 0, model.conditional=true; Sohn et al., 2015) also take the label y: as a
one-hot vector of num_classes entries concatenated to the input of the network's first linear layer. Dense
encoder: to the flattened image; conv encoder: to the flattened output of the conv blocks (the heads' input);
both decoders: to z. y is either class indices [B] (int64) or already a vector per image [B, num_classes] (a mix
of two one-hot vectors, as the interpolation picture draws between two classes). num_classes=0 builds the
unconditional network exactly as before: the same layers, parameters and forward pass.

The dense networks have three options of the reference VAE of Tomczak & Welling's VampPrior code
(jmtomczak/vae_vampprior, utils/nn.py and models/VAE.py), each off by default, so the default networks are the ones
they always were:
- gated=true: each hidden layer is a gated linear unit, h = (W1 x + b1) * sigmoid(W2 x + b2) (`GatedDense`), in place of
  ReLU(W x + b);
- logvar_range=[low, high] (encoder): the log-variance clamped to that range (the reference's Hardtanh(-6, 2));
- init=he: every linear layer's weights drawn from N(0, 2 / fan_in) (He et al. 2015), biases as PyTorch draws them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.choices import INITS
from vaelab.errors import UserError


def one_hot(y: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """[B, num_classes] in `like`'s dtype: the one-hot vectors of class indices, or float label vectors as given."""
    return (y if y.is_floating_point() else F.one_hot(y, num_classes)).to(like.dtype)


def with_label(h: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """h [B, D] with the label's one-hot vector appended: [B, D + num_classes]."""
    if y is None:
        raise ValueError("a conditional network (num_classes > 0) needs the labels y")
    return torch.cat([h, one_hot(y, num_classes, h)], dim=-1)


class GatedDense(nn.Module):
    """A gated linear layer (Dauphin et al. 2017; the reference's utils/nn.py): (W1 x + b1) * sigmoid(W2 x + b2)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.h, self.g = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def hidden_layers(sizes: list[int], gated: bool) -> list[nn.Module]:
    """One hidden layer per consecutive pair of sizes: gated linear units, or linear layers followed by ReLU."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [GatedDense(n_in, n_out)] if gated else [nn.Linear(n_in, n_out), nn.ReLU()]
    return layers


def initialise(network: nn.Module, init: str) -> None:
    """init=he: every linear layer's weights redrawn from N(0, 2 / fan_in) (the reference's he_init); biases kept.
    init=default: PyTorch's own initialisation, untouched (no random numbers drawn)."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    if init == "he":
        for layer in network.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / layer.in_features))


class DenseEncoder(nn.Module):
    """The notebook's encoder: flatten, then one linear head each for the mean and the log-variance; `hidden` adds
    hidden layers in between (ReLU, or gated with gated=true). logvar_range=[low, high] clamps the log-variance.
    num_classes > 0: the one-hot label is appended to the flattened image."""

    def __init__(
        self,
        latent_dim: int,
        image_shape=(1, 28, 28),
        hidden: tuple[int, ...] = (),
        num_classes: int = 0,
        gated: bool = False,
        logvar_range: tuple[float, float] | None = None,
        init: str = "default",
    ):
        super().__init__()
        self.num_classes = num_classes
        if logvar_range is not None and not (len(logvar_range) == 2 and float(logvar_range[0]) < float(logvar_range[1])):
            raise ValueError(f"logvar_range={list(logvar_range)} is not [low, high] with low < high")
        self.logvar_range = None if logvar_range is None else (float(logvar_range[0]), float(logvar_range[1]))
        sizes = [math.prod(image_shape) + num_classes, *hidden]
        self.body = nn.Sequential(nn.Flatten(), *hidden_layers(sizes, gated))
        self.heads = nn.Linear(sizes[-1], 2 * latent_dim)  # mean and log-variance in one matmul
        initialise(self, init)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes:  # flattened here (the body's Flatten then keeps it as it is)
            x = with_label(x.flatten(1), y, self.num_classes)
        mu, logvar = self.heads(self.body(x)).chunk(2, dim=-1)
        if self.logvar_range is not None:  # the reference's Hardtanh(low, high): no gradient outside the range
            logvar = logvar.clamp(*self.logvar_range)
        return mu, logvar


class DenseDecoder(nn.Module):
    """The notebook's decoder (linear from z to 784 logits); `hidden` adds hidden layers in between (ReLU, or gated
    with gated=true). out_channels: channels of the output (default the image's; a likelihood with a mean and a
    scale per pixel asks for twice as many). num_classes > 0: the one-hot label is appended to z."""

    def __init__(
        self,
        latent_dim: int,
        image_shape=(1, 28, 28),
        hidden: tuple[int, ...] = (),
        out_channels: int | None = None,
        num_classes: int = 0,
        gated: bool = False,
        init: str = "default",
    ):
        super().__init__()
        c, h, w = image_shape
        self.image_shape, self.num_classes = (out_channels or c, h, w), num_classes
        sizes = [latent_dim + num_classes, *hidden]
        self.body = nn.Sequential(*hidden_layers(sizes, gated), nn.Linear(sizes[-1], math.prod(self.image_shape)))
        initialise(self, init)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = with_label(z, y, self.num_classes)
        return self.body(z).view(-1, *self.image_shape)


def _typed(values) -> str:
    """A list as typed on the command line: [32,64]."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def conv_blocks(image_shape, channels=None, key: str = "model.encoder.channels") -> list[int]:
    """The output channels of each stride-2 block of a conv network for `image_shape`, checked against its size.

    channels=None derives them from the size: one block per halving while both sides stay even and at least 4
    after it, doubling from 32 up to 256: 28x28 -> [32, 64] (ends at 7x7), 32x32 -> [32, 64, 128] (4x4),
    64x64 -> [32, 64, 128, 256] (4x4), 96x96 -> [32, 64, 128, 256] (6x6). A list gives them outright: n blocks
    need both sides divisible by 2^n.
    """
    _, h, w = image_shape
    if channels is None:
        blocks = 0
        while h % 2 ** (blocks + 1) == 0 and w % 2 ** (blocks + 1) == 0 and min(h, w) // 2 ** (blocks + 1) >= 4:
            blocks += 1
        if blocks == 0:
            raise UserError(
                f"model=conv halves the image in stride-2 blocks, but data.image_shape={_typed(image_shape)} has an odd side "
                f"or one under 8 pixels: use image sides divisible by 2 (e.g. data.image_size=32), or model=mlp"
            )
        return [min(32 * 2**i, 256) for i in range(blocks)]
    channels = [int(c) for c in channels]
    if not channels or any(c < 1 for c in channels):
        raise UserError(
            f"{key}={_typed(channels)} is not allowed: give one positive channel count per stride-2 block, e.g. [32,64]"
        )
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        fits = max((n for n in range(1, len(channels)) if h % 2**n == 0 and w % 2**n == 0), default=0)
        fix = f"use {fits} block(s), e.g. {key}={_typed(channels[:fits])}, or " if fits else ""
        raise UserError(
            f"{key}={_typed(channels)} gives {len(channels)} stride-2 blocks, which need image sides divisible by {factor}, "
            f"but data.image_shape={_typed(image_shape)}: {fix}{key}=null (blocks derived from the size), or resize the "
            "images (data.image_size)"
        )
    return channels


class ConvEncoder(nn.Module):
    """Stride-2 convolutions (kernel 4, ReLU), one per entry of `channels`, each halving the image, then linear heads
    for the mean and log-variance. channels=None: derived from the image size (`conv_blocks`); the 28x28 default is
    28 -> 14 -> 7 with 32 and 64 channels. num_classes > 0: the one-hot label is appended to the flattened output of
    the conv blocks, the input of the heads (the first linear layer)."""

    def __init__(self, latent_dim: int, image_shape=(1, 28, 28), channels: list[int] | None = None, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        c, h, w = image_shape
        channels = conv_blocks(image_shape, channels, "model.encoder.channels")
        layers: list[nn.Module] = []
        for n_in, n_out in zip([c, *channels[:-1]], channels):
            layers += [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Flatten())
        side = 2 ** len(channels)
        self.heads = nn.Linear(channels[-1] * (h // side) * (w // side) + num_classes, 2 * latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        if self.num_classes:
            h = with_label(h, y, self.num_classes)
        mu, logvar = self.heads(h).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: linear to the smallest map, then stride-2 transposed convolutions (kernel 4), each
    doubling the image, the last one to the output channels (out_channels: as DenseDecoder's). num_classes > 0: the
    one-hot label is appended to z."""

    def __init__(
        self,
        latent_dim: int,
        image_shape=(1, 28, 28),
        channels: list[int] | None = None,
        out_channels: int | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        self.num_classes = num_classes
        c, h, w = image_shape
        channels = conv_blocks(image_shape, channels, "model.decoder.channels")
        side = 2 ** len(channels)
        self.start = (channels[-1], h // side, w // side)
        layers: list[nn.Module] = [
            nn.Linear(latent_dim + num_classes, math.prod(self.start)),
            nn.ReLU(),
            nn.Unflatten(1, self.start),
        ]
        outs = [*reversed(channels[:-1]), out_channels or c]
        for n_in, n_out in zip(reversed(channels), outs):
            layers += [nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])  # no ReLU after the last: it emits the likelihood's parameters

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = with_label(z, y, self.num_classes)
        return self.body(z)
