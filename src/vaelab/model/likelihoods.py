"""Observation likelihoods p(x|z) for the decoder's output.

The decoder emits `out` of shape [B, P*C, H, W] for images x of shape [B, C, H, W] with values in [0, 1];
P = `params_per_channel`. Where P = 2 the first C channels are the means and the last C the log-scales
(`out.chunk(2, dim=1)`). Every `nll` returns -log p(x | out) per image in nats, summed over pixels and
channels, computed in float32 whatever the input dtype (mixed precision would lose the small differences
these formulas rely on).

Units (see `bits_per_dim`): Bernoulli and the discretized logistic give probabilities of discrete values;
the continuous Bernoulli and the Gaussian give densities on [0, 1], which only become a bound on a discrete
likelihood when evaluated on dequantised data (`dequantize`) and offset by D*ln 256.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.choices import LIKELIHOODS as NAMES

LEVELS = 256  # 8-bit grey levels k/255, k = 0..255

# Continuous Bernoulli, in terms of the logit eta (lam = sigmoid(eta), |lam - 1/2| ~= |eta|/4).
# log C(eta) = log|eta| - log tanh(|eta|/2) is accurate in value everywhere but 0/0 at eta = 0, and its
# gradient is a difference of two ~1/eta terms: float32 relative error ~2e-7/eta^2. The series through eta^6
# has truncation ~2.6e-5 eta^8, relative gradient error ~1.3e-3 eta^6. The two gradient errors cross at
# |eta| ~ 0.33; at 0.3 the series is good to ~1e-6 (value ~1e-9), the closed form just outside to ~4e-6.
CB_LOG_NORM_EPS = 0.3  # i.e. |lam - 1/2| < tanh(0.15)/2 ~= 0.074
# The mean 1/2 + (coth(eta/2) - 2/eta)/2 cancels absolutely: error ~ float32 eps/|eta| (6e-5 at eta=1e-3).
# The series through eta^7 has truncation ~2e-8 |eta|^9: both are ~float32 eps at |eta| = 1.
CB_MEAN_EPS = 1.0
# Discretized logistic: PixelCNN++ clamps log s at -7 for data on [-1, 1]; on [0, 1] the same sharpness
# (bin half-width / s ~= 4.3, at most 97% of the mass in one bin) is -7 - ln 2. It bounds 1/s, hence a, b
# and the gradients, and stops a pixel's nll running to 0 on a collapsed scale.
DL_LOG_SCALE_MIN = -7.0 - math.log(2.0)
# Gaussian, per-pixel mode: dequantised data keep within-bin noise of std 1/(256 sqrt 12) (log ~= -6.69)
# that no decoder can predict, so the optimum never lies below it; -7 only guards against early blow-ups.
GAUSSIAN_LOG_STD_MIN = -7.0


class Likelihood(nn.Module):
    """Base: `nll(out, x)` [B] nats, `mean(out)` and `sample(out)` [B, C, H, W]."""

    name: str = ""
    params_per_channel: int = 1
    dequantized: bool = False  # a density on [0, 1]: trained and evaluated on dequantised data (`dequantize`)

    def __init__(self, channels: int = 1):
        super().__init__()
        self.channels = channels

    @property
    def out_channels(self) -> int:
        """Channels the decoder must emit: P * C."""
        return self.params_per_channel * self.channels

    def _out(self, out: Tensor) -> Tensor:
        if out.dim() != 4 or out.shape[1] != self.out_channels:
            raise ValueError(
                f"{self.name}: decoder output has shape {tuple(out.shape)}, expected "
                f"[B, {self.out_channels}, H, W] ({self.params_per_channel} per image channel)"
            )
        return out.float()

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


def _rand(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


class _BernoulliPixelNLL(torch.autograd.Function):
    """-log Bernoulli(x | sigmoid(z)) per pixel, the binary cross-entropy from logits z:
        softplus(z) - x z = max(z, 0) - x z + log(1 + exp(-|z|)).
    F.binary_cross_entropy_with_logits computes the last term with log1p, which torch's CPU kernels do not vectorise
    (measured, one thread: 8.4 ns an element against 0.8 for exp and 1.0 for log), so the IWAE test bound spent most of
    its time there. Here it is log(1 + e) with e = exp(-|z|) in (0, 1]: rounding 1 + e costs at most 6e-8 nats a pixel,
    below float32's resolution of a sum over pixels. In place where it can be: a fresh tensor of the IWAE bound's size
    (30 MB) costs more in page faults than its arithmetic. The gradient is BCE-with-logits' own,
    (sigmoid(z) - x) * grad: training is the same bit for bit (tests/model/test_likelihoods.py)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        ctx.dtypes = logits.dtype, target.dtype
        dtype = torch.promote_types(logits.dtype, target.dtype)  # as BCE-with-logits: in the wider of the two
        logits, target = logits.to(dtype), target.to(dtype)
        ctx.save_for_backward(logits, target)
        nll = logits.abs().neg_().exp_().add_(1).log_()
        return nll.add_(logits.clamp(min=0)).addcmul_(logits, target, value=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, target = ctx.saved_tensors
        logits_dtype, target_dtype = ctx.dtypes
        grad_logits = ((logits.sigmoid() - target) * grad).to(logits_dtype) if ctx.needs_input_grad[0] else None
        return grad_logits, (-logits * grad).to(target_dtype) if ctx.needs_input_grad[1] else None


def bernoulli_pixel_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-log p(target | sigmoid(logits)) per pixel, nats (the binary cross-entropy from logits, as
    F.binary_cross_entropy_with_logits(reduction="none"), faster on the CPU). Like it, it takes no broadcasting."""
    if logits.shape != target.shape:
        raise ValueError(f"bernoulli: logits of shape {tuple(logits.shape)} for images of shape {tuple(target.shape)}")
    return _BernoulliPixelNLL.apply(logits, target)


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-log p(target | logits) per example, in nats, summed over pixels (stable: computed from logits)."""
    return bernoulli_pixel_nll(logits, target).flatten(1).sum(dim=1)


class Bernoulli(Likelihood):
    """out = logits; -log p = sum BCE(sigmoid(out), x). A proper likelihood only for binarized x in {0, 1}:
    on grey levels it is a cross-entropy, not a normalised density on [0, 1]."""

    name = "bernoulli"
    params_per_channel = 1

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return bernoulli_nll(self._out(out), x.float())

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(self._out(out))

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(self.mean(out), generator=generator)


def cb_log_norm(eta: Tensor) -> Tensor:
    """log C for the continuous Bernoulli with logit eta.

    C(lam) = 2 atanh(1 - 2 lam) / (1 - 2 lam); with lam = sigmoid(eta), 1 - 2 lam = -tanh(eta/2), so
    atanh(1 - 2 lam) = -eta/2 and C = eta / tanh(eta/2), even in eta, C(0) = 2. For a = |eta|,
    log C = log a - log(1 - e^-a) + log(1 + e^-a)  (no overflow, no 1 - 2 lam cancellation);
    near 0: log C = log 2 + eta^2/12 - 7 eta^4/1440 + 31 eta^6/90720 (from log(x/tanh x), x = eta/2).
    """
    a = eta.abs()
    small = a < CB_LOG_NORM_EPS
    a_safe = torch.where(small, torch.ones_like(a), a)  # keeps the unused branch (and its gradient) finite
    closed = torch.log(a_safe) - torch.log(-torch.expm1(-a_safe)) + F.softplus(-a_safe)
    e2 = eta * eta
    series = math.log(2.0) + e2 * (1.0 / 12 + e2 * (-7.0 / 1440 + e2 * (31.0 / 90720)))
    return torch.where(small, series, closed)


def cb_mean(eta: Tensor) -> Tensor:
    """E[x] = lam/(2 lam - 1) + 1/(2 atanh(1 - 2 lam)) = 1/2 + (coth(eta/2) - 2/eta)/2 (Langevin function);
    near 0: 1/2 + eta/12 - eta^3/720 + eta^5/30240 - eta^7/1209600."""
    small = eta.abs() < CB_MEAN_EPS
    e = torch.where(small, torch.ones_like(eta), eta)
    closed = 0.5 + 0.5 * (1.0 / torch.tanh(0.5 * e) - 2.0 / e)
    e2 = eta * eta
    series = 0.5 + eta * (1.0 / 12 + e2 * (-1.0 / 720 + e2 * (1.0 / 30240 - e2 / 1209600)))
    return torch.where(small, series, closed)


class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), out = logits eta, lam = sigmoid(eta):
    p(x | lam) = C(lam) lam^x (1 - lam)^(1-x) on [0, 1], so -log p = BCE(eta, x) - log C(eta)."""

    name = "continuous_bernoulli"
    dequantized = True
    params_per_channel = 1

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        eta = self._out(out)
        nll = bernoulli_pixel_nll(eta, x.float()) - cb_log_norm(eta)
        return nll.flatten(1).sum(1)

    def mean(self, out: Tensor) -> Tensor:
        return cb_mean(self._out(out))

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Inverse CDF. F(x) = (lam^x (1-lam)^(1-x) + lam - 1)/(2 lam - 1) inverts to
        x = log1p(u expm1(eta)) / eta. It is evaluated at -|eta| (expm1 of a positive logit overflows past
        88) and mirrored, since 1 - X ~ CB(-eta); near 0, x = u + u(1-u) eta/2 + O(eta^2)."""
        eta = self._out(out)
        u = _rand(eta, generator)
        neg = -eta.abs()
        small = neg > -1e-4
        n = torch.where(small, -torch.ones_like(neg), neg)
        v = torch.where(eta > 0, 1.0 - u, u)  # mirrored uniform, so the draw stays monotone in u
        x_neg = torch.where(small, v + 0.5 * v * (1.0 - v) * neg, torch.log1p(v * torch.expm1(n)) / n)
        return torch.where(eta > 0, 1.0 - x_neg, x_neg).clamp(0.0, 1.0)


def log1mexp(d: Tensor) -> Tensor:
    """log(1 - e^-d) for d > 0, accurate for tiny and large d."""
    return torch.where(d < math.log(2.0), torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d)))


class DiscretizedLogistic(Likelihood):
    """Discretized logistic over the 256 levels x = k/255 (PixelCNN++, Salimans et al. 2017), out = (mu, log s):
    P(k) = sigmoid(a) - sigmoid(b), a = (x + 1/510 - mu)/s, b = (x - 1/510 - mu)/s, with b = -inf for
    k = 0 and a = +inf for k = 255.

    In log space, exactly: sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b-a)), and
    b - a = -1/(255 s), so log P = logsigmoid(a) + logsigmoid(-b) + log(1 - exp(-1/(255 s))). No term cancels,
    so tiny bin masses need no extra branch (PixelCNN++ switches to pdf * bin width there; this form is exact
    where that is approximate). The bin-width term is taken from log d = -log s - ln 255, so it stays finite
    even when s overflows. log s is clamped below at DL_LOG_SCALE_MIN.
    """

    name = "discretized_logistic"
    params_per_channel = 2

    def __init__(self, channels: int = 1, log_scale_min: float = DL_LOG_SCALE_MIN):
        super().__init__(channels)
        self.log_scale_min = log_scale_min

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_s = self._out(out).chunk(2, dim=1)
        return mu, log_s.clamp(min=self.log_scale_min)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        mu, log_s = self._split(out)
        x = x.float()
        inv_s = torch.exp(-log_s)
        half = 0.5 / (LEVELS - 1)
        a = (x + half - mu) * inv_s
        b = (x - half - mu) * inv_s
        log_d = -log_s - math.log(LEVELS - 1)  # log of (a - b) = 1/(255 s)
        d = torch.exp(log_d)
        # log(1 - e^-d): for d below 1e-3 use log d - d/2 (error d^2/24 < 5e-8), which never underflows.
        log_width = torch.where(d < 1e-3, log_d - 0.5 * d, log1mexp(d.clamp(min=1e-3)))
        lo, hi = half, 1.0 - half  # level 0 lies below 1/510, level 255 above 1 - 1/510
        log_p = torch.where(
            x < lo, F.logsigmoid(a), torch.where(x > hi, F.logsigmoid(-b), F.logsigmoid(a) + F.logsigmoid(-b) + log_width)
        )
        return -log_p.flatten(1).sum(1)

    def mean(self, out: Tensor) -> Tensor:
        """clamp(mu, 0, 1): the location, which the model can push outside [0, 1] to put mass on an edge level.
        (The exact mean of the discretized variable differs by at most about s, the tail mass at the edges.)"""
        return self._split(out)[0].clamp(0.0, 1.0)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """mu + s logit(u), rounded to the nearest level k/255 (edges absorb the tails)."""
        mu, log_s = self._split(out)
        u = _rand(mu, generator).clamp(1e-6, 1.0 - 1e-6)
        y = mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        return torch.round(y.clamp(0.0, 1.0) * (LEVELS - 1)) / (LEVELS - 1)


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation: level x = k/255 -> y = (k + u)/256, u ~ U[0, 1), so y lies in [k/256, (k+1)/256).

    A density p on [0, 1]^D trained on y defines the discrete model P(k) = integral of p over k's bin
    = 256^-D E_u[p((k+u)/256)], and by Jensen
        -log P(k) <= E_u[-log p((k+u)/256)] + D ln 256,
    so `nll` on dequantised data plus D ln 256 is an upper bound, in nats, on the discrete -log P(k)
    (`bits_per_dim` adds it). Computed in float32; the result is kept strictly below the bin's upper edge
    (k + u rounds up to k + 1 in float32 when u is within 2^-17 of 1).
    """
    k = torch.round(x.float() * (LEVELS - 1))
    y = (k + _rand(k, generator)) / LEVELS
    return torch.minimum(y, torch.nextafter((k + 1.0) / LEVELS, torch.zeros_like(y)))


class Gaussian(Likelihood):
    """Gaussian density on dequantised data: -log p = sum [ (y - mu)^2 / (2 sigma^2) + log sigma + ln(2 pi)/2 ].

    scale="global" (default; P = 1): one learned log sigma shared by all pixels, an nn.Parameter. This is
    the calibrated decoder of the sigma-VAE (Rybkin et al. 2021): sigma^2 tracks the mean squared error, so
    the reconstruction/KL balance is learned instead of tuned, and it has none of the per-pixel variance
    instabilities. It is not clamped: its optimum is at least the within-bin noise std (log ~= -6.69), and a
    clamp would leave a dead gradient if a step overshot. scale="pixel" (P = 2): the decoder emits
    (mu, log sigma) per pixel; log sigma is clamped below at GAUSSIAN_LOG_STD_MIN.
    """

    name = "gaussian"
    dequantized = True

    def __init__(
        self, channels: int = 1, scale: str = "global", init_log_std: float = 0.0, log_std_min: float = GAUSSIAN_LOG_STD_MIN
    ):
        super().__init__(channels)
        if scale not in ("pixel", "global"):
            raise ValueError(f"gaussian: scale={scale!r} is not 'pixel' or 'global'")
        self.scale = scale
        self.params_per_channel = 2 if scale == "pixel" else 1
        self.log_std_min = log_std_min
        self.log_std = nn.Parameter(torch.tensor(float(init_log_std))) if scale == "global" else None

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        out = self._out(out)
        if self.scale == "global":
            return out, self.log_std.float().expand_as(out)
        mu, log_std = out.chunk(2, dim=1)
        return mu, log_std.clamp(min=self.log_std_min)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        mu, log_std = self._split(out)
        z = (x.float() - mu) * torch.exp(-log_std)
        return (0.5 * z * z + log_std + 0.5 * math.log(2.0 * math.pi)).flatten(1).sum(1)

    def mean(self, out: Tensor) -> Tensor:
        """clamp(mu, 0, 1), for pictures (the mean of y = (k+u)/256, not of k/255: they differ by < 1/256)."""
        return self._split(out)[0].clamp(0.0, 1.0)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y = mu + sigma * N(0, 1), mapped back to its level k = floor(256 y) (the inverse of `dequantize`),
        clamped to 0..255, returned as k/255."""
        mu, log_std = self._split(out)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
        k = torch.floor((mu + torch.exp(log_std) * eps) * LEVELS).clamp(0, LEVELS - 1)
        return k / (LEVELS - 1)


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, ContinuousBernoulli, DiscretizedLogistic, Gaussian)}


def build(name: str, channels: int, **kwargs) -> Likelihood:
    """The likelihood called `name` (one of NAMES) for images with `channels` channels; kwargs go to its class."""
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood {name!r} is not one of {NAMES}")
    return LIKELIHOODS[name](channels=channels, **kwargs)


def bits_per_dim(nll_nats: Tensor | float, num_dims: int, likelihood_name: str) -> Tensor | float:
    """Nats per image (an nll, or a -ELBO / IWAE bound) -> bits per dimension, D = num_dims (C*H*W).

    discretized_logistic: a probability over the 256 levels, so bits/dim = nats / (D ln 2).
    gaussian, continuous_bernoulli: densities on [0, 1]; on data dequantised by `dequantize` (bins of width
        1/256), -log P(k) <= nats + D ln 256, so bits/dim = (nats + D ln 256) / (D ln 2) = nats/(D ln 2) + 8.
        (A uniform density, nats = 0, gives 8 bits: one of 256 levels.) On undequantised k/255 data the
        figure is not a bound on anything.
    bernoulli: nats / (D ln 2). That is the bits/dim of binarized {0, 1} data; on grey levels the Bernoulli is
        not a likelihood of the data (not normalised on [0, 1]), and the figure is not a bits/dim of the data.
    """
    if likelihood_name not in LIKELIHOODS:
        raise ValueError(f"likelihood {likelihood_name!r} is not one of {NAMES}")
    nats = nll_nats
    if LIKELIHOODS[likelihood_name].dequantized:
        nats = nats + num_dims * math.log(LEVELS)
    return nats / (num_dims * math.log(2.0))


def describe(likelihood: str, binarize: str, channels: int = 1) -> str:
    """What a figure in nats per image is: the likelihood and the data it was computed on, grey (1 channel) or RGB
    (3 channels) as the images are (every report says it)."""
    levels = "grey" if channels == 1 else "RGB" if channels == 3 else f"{channels}-channel"
    if likelihood == "bernoulli" and binarize == "none":
        return f"nats per image; Bernoulli on {levels} levels, not a density (pixels in [0, 1], not binarized)"
    binarized = "binarized pixels" if channels == 1 else f"binarized {levels} pixels"
    data = f"8-bit {levels} levels" if binarize == "none" else f"{binarized} (binarize={binarize})"
    if LIKELIHOODS[likelihood].dequantized:
        return f"nats per image; {likelihood} density of the uniformly dequantised {data}; bits/dim include the 8-bit offset"
    return f"nats per image; {likelihood} likelihood of the {data}"
