"""The variational autoencoder (Kingma & Welling 2014) in plain PyTorch, with its losses and bounds.

    q(z|x) = N(mu(x), diag exp(logvar(x)))      the encoder
    p(z)                                        the prior: N(0, I) by default, or a learned mixture (vaelab.model.priors)
    p(x|z)                                      the decoder's output read by a likelihood (vaelab.model.likelihoods)
    -ELBO(x) = -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z))      in nats per image
    IWAE:   -log p(x) ~ -log (1/K) sum_k w_k,  log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)  (Burda et al. 2015)

The KL term is in closed form for the standard prior N(0, I); for a mixture prior, which has none, it is the one-sample
Monte-Carlo estimate log q(z|x) - log p(z) at the reparameterised z the reconstruction term decodes (as the reference
code of the VampPrior computes it). A conditional VAE (Sohn et al. 2015) gives its networks the class label y as
well: q(z|x, y), p(x|z, y), the prior N(0, I) as before. The `notebook` objective reproduces the Keras teaching notebook exactly (see `notebook_loss`).

Nothing here imports Lightning, Hydra or the run plumbing: `VAE` is a torch.nn.Module to use as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.choices import OBJECTIVES
from vaelab.model.likelihoods import Likelihood, bernoulli_nll, bits_per_dim, build, dequantize
from vaelab.model.priors import StandardPrior
from vaelab.model.priors import build as build_prior

LOG_2PI = math.log(2 * math.pi)
# (image, sample) pairs decoded at once by `bounds`: small passes stay in the CPU's caches and reuse the allocator's
# memory, large ones page-fault in fresh tensors (measured, one thread: the IWAE bound of 10,000 test images with
# K = 10 took 1.6 s in passes of 20,000 pairs, 0.8 s in passes of 1,000, the same figures).
PAIRS_PER_PASS = 1000


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)) per example, in nats, summed over latent dimensions."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(dim=-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, in nats, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def elbo_loss(logits, target, mu, logvar, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Batch means of the negative ELBO and its two parts, nats per image (Bernoulli likelihood)."""
    recon = bernoulli_nll(logits, target).mean()
    kl = gaussian_kl(mu, logvar).mean()
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, floor: float) -> torch.Tensor:
    """The free-bits KL term: sum over latent dimensions of max(floor, the batch mean of that dimension's KL)."""
    per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_dim.mean(dim=0).clamp(min=floor).sum()


def notebook_loss(logits, target, mu, log_sigma) -> dict[str, torch.Tensor]:
    """The notebook's loss: per-pixel mean binary cross-entropy plus
    -mean(log_sigma - mean^2 - exp(log_sigma) + 1) / 2, both averaged over the batch."""
    recon = F.binary_cross_entropy_with_logits(logits, target)
    kl = -0.5 * (1.0 + log_sigma - mu.pow(2) - log_sigma.exp()).mean()
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def add_noise(x: torch.Tensor, noise_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The notebook's corruption: x + noise_factor * N(0, 1), clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + noise_factor * noise).clamp_(0.0, 1.0)


def log_weights(
    vae: VAE,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    prior_weight: float = 1.0,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z_k) and prior_weight * (log p(z_k) - log q(z_k|x)) for z_k ~ N(mu, exp(logvar)), each [K, B], log p(z)
    under the VAE's prior. Reparameterised: gradients flow through z_k (the IWAE objective trains on it). labels: the
    images' classes, for a conditional VAE (None otherwise)."""
    eps = torch.randn((num_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps
    log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)  # (z - mu)^2 / var = eps^2
    log_prior = vae.log_prior(z)
    if labels is not None:
        labels = labels.expand(num_samples, *labels.shape).flatten(0, 1)  # as z.flatten(0, 1): sample k of image b
    out = vae.decode(z.flatten(0, 1), labels).float()
    targets = target.expand(num_samples, *target.shape).flatten(0, 1)
    log_px_z = -vae.likelihood.nll(out, targets).view(num_samples, -1)
    return log_px_z, prior_weight * (log_prior - log_q)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """Per image -log (1/K) sum_k w_k from log w of shape [K, B], in float64 (K up to thousands)."""
    return math.log(log_w.shape[0]) - torch.logsumexp(log_w.double(), dim=0)


def bounds(
    vae: VAE,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int,
    pairs_per_pass: int = PAIRS_PER_PASS,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per image (float64): recon (averaged over the K samples), the KL (exact for the standard prior; for a mixture
    prior averaged over the same K samples, log q(z_k|x) - log p(z_k)), and nll_iwae, the IWAE estimate of -log p(x)
    from K samples, decoded at most `pairs_per_pass` (image, sample) pairs at a time (at least one sample of every
    image: the samples are drawn pass by pass, in the order one draw of all K would give them on the CPU). labels: as
    log_weights' (then these are the bounds of -log p(x|y))."""
    per_pass = min(num_samples, max(1, pairs_per_pass // max(1, target.shape[0])))
    log_px_z, log_ratio = zip(
        *(
            log_weights(vae, target, mu, logvar, min(per_pass, num_samples - start), generator, labels=labels)
            for start in range(0, num_samples, per_pass)
        )
    )
    log_px_z, log_ratio = torch.cat(log_px_z), torch.cat(log_ratio)
    return {
        "recon": -log_px_z.double().mean(0),
        "kl": gaussian_kl(mu, logvar).double() if vae.prior.closed_form_kl else -log_ratio.double().mean(0),
        "nll_iwae": iwae_bound(log_px_z + log_ratio),
    }


class VAE(nn.Module):
    """encode(x) -> (mu, logvar); decode(z) -> the likelihood's parameters; decode_mean(z) -> images;
    sample(n) -> images; loss(x_in, target) -> the batch means of the -ELBO and its parts. A conditional VAE takes the
    labels y (class indices) as the second argument of each: encode(x, y), decode(z, y), sample(n, labels=y).
    prior: p(z), a module of vaelab.model.priors (default the standard prior N(0, I))."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        objective: str = "elbo",
        beta: float = 1.0,
        epsilon_std: float = 1.0,
        class_names: list[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        prior: nn.Module | None = None,
    ):
        super().__init__()
        self.settings = dict(settings or {})  # what it was built from (a checkpoint's hyper_parameters): for reports
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective={objective!r} is not one of {OBJECTIVES}")
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim, self.image_shape = int(latent_dim), tuple(image_shape)
        self.objective, self.beta, self.epsilon_std = objective, float(beta), float(epsilon_std)
        self.class_names = [str(name) for name in class_names] if class_names else None
        self.conditional = self.class_names is not None
        self.num_classes = len(self.class_names) if self.conditional else 0
        self.prior = prior if prior is not None else StandardPrior(self.latent_dim)
        # A mixture prior's KL is log q(z|x) - log p(z) at z ~ q(z|x): z must be drawn from the q it names.
        if not self.prior.closed_form_kl and (objective == "notebook" or self.conditional or self.epsilon_std != 1.0):
            raise ValueError(
                f"the {self.prior.name} prior needs an unconditional VAE with objective elbo or iwae and epsilon_std 1 "
                f"(got objective={objective}, conditional={self.conditional}, epsilon_std={self.epsilon_std:g})"
            )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], build_network: Callable[..., nn.Module]) -> VAE:
        """The VAE a checkpoint's (or a config's) model settings describe: `encoder` and `decoder` are network
        settings that `build_network(node, **extra)` builds (Hydra's instantiate, or the checkpoint loader's checked
        builder); the other keys are those of conf/model/dense.yaml. Unknown keys (the optimizer, the training
        schedule) are ignored here. `prior`: the prior's settings (vaelab.model.priors.build; none: N(0, I))."""
        conditional = bool(settings.get("conditional", False))
        class_names = settings.get("class_names") if conditional else None
        if conditional and not class_names:
            raise ValueError("a conditional VAE needs class_names, the names of the data's classes by label")
        decoder_settings = settings["decoder"]
        image_shape = tuple(decoder_settings.get("image_shape") or (1, 28, 28))
        likelihood = build(
            str(settings.get("likelihood", "bernoulli")), image_shape[0], **(settings.get("likelihood_kwargs") or {})
        )
        labelled = {"num_classes": len(class_names)} if conditional else {}  # unconditional networks: built as always
        # A likelihood with more than one parameter per pixel (a mean and a scale) needs more decoder channels.
        extra = {"out_channels": likelihood.out_channels} if likelihood.out_channels != image_shape[0] else {}
        return cls(
            encoder=build_network(settings["encoder"], **labelled),
            decoder=build_network(decoder_settings, **extra, **labelled),
            likelihood=likelihood,
            latent_dim=int(settings["latent_dim"]),
            image_shape=image_shape,
            objective=str(settings.get("objective", "elbo")),
            beta=float(settings.get("beta", 1.0)),
            epsilon_std=float(settings.get("epsilon_std", 1.0)),
            class_names=class_names,
            settings=settings,
            prior=build_prior(settings.get("prior"), int(settings["latent_dim"]), image_shape),
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), or of q(z|x, y) for a conditional VAE (y ignored by an unconditional one)."""
        return self.encoder(x, y) if self.conditional else self.encoder(x)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The likelihood's parameters (for the Bernoulli: logits), shaped like the images."""
        return self.decoder(z, y) if self.conditional else self.decoder(z)

    def decode_mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The mean image of p(x|z) (or p(x|z, y)), in [0, 1]: what the pictures show."""
        return self.likelihood.mean(self.decode(z, y))

    def labels_of(self, y: torch.Tensor) -> torch.Tensor | None:
        """What the networks are given as labels: y for a conditional VAE, nothing for an unconditional one."""
        return y if self.conditional else None

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of z from q(z|x) as training draws it; `generator` fixes it (the pictures' draws)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        if self.epsilon_std != 1.0:  # the notebook's 0.1; no op a step otherwise (each costs microseconds on a CPU)
            eps = eps * self.epsilon_std
        if self.objective == "notebook":
            return mu + logvar.exp() * eps  # the notebook's z = mean + exp(log_sigma) * eps
        return mu + (0.5 * logvar).exp() * eps

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        mu, logvar = self.encode(x, y)
        return self.decode(self.reparameterize(mu, logvar), y), mu, logvar

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n images decoded from draws of the prior (N(0, temperature^2 I) for the standard prior; a mixture's
        components widened by the temperature); a conditional VAE decodes image i with labels[i]."""
        z = self.prior.sample(n, self.encoder, generator, temperature, self.device)
        return self.decode_mean(z, labels)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) under this VAE's prior, summed over the latent dimensions: [...] for z [..., latent_dim]."""
        return self.prior.log_prob(z, self.encoder)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per example: in closed form for the standard prior; otherwise the one-sample Monte-Carlo
        estimate log q(z|x) - log p(z) at z, the reparameterised draw of q(z|x) the reconstruction decodes."""
        if self.prior.closed_form_kl:
            return gaussian_kl(mu, logvar)
        z = z.float()  # the loss in fp32 (a bf16 z under autocast)
        return gaussian_log_prob(z, mu, logvar) - self.log_prior(z)

    def target(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the likelihood models: the 8-bit levels themselves, or for a density on [0, 1] the same images
        uniformly dequantised (fresh noise in training, the fixed evaluation noise in validation and test)."""
        return dequantize(x, generator) if self.likelihood.dequantized else x

    def bits_per_dim(self, nats: torch.Tensor | float) -> torch.Tensor | float:
        """Nats per image -> bits per dimension under this VAE's likelihood (vaelab.model.likelihoods.bits_per_dim);
        a float for a float, a tensor for a tensor."""
        return bits_per_dim(nats, math.prod(self.image_shape), self.likelihood.name)

    def loss(self, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Batch means of the true -ELBO (beta as set) and its two parts, nats per image."""
        return self.loss_and_posterior(x_in, target, y)[0]

    def loss_and_posterior(self, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None = None):
        """(loss parts, mu, logvar): `loss` with the posterior it drew from, for the training objectives."""
        # The loss in fp32 even under bf16 autocast: sums over 784 pixels and the latent are too coarse in bf16.
        mu, logvar = self.encode(x_in, y)
        z = self.reparameterize(mu, logvar)  # as forward() draws it
        out, mu, logvar = self.decode(z, y).float(), mu.float(), logvar.float()
        if self.objective == "notebook":
            return notebook_loss(out, target, mu, logvar), mu, logvar
        recon = self.likelihood.nll(out, target).mean()
        kl = self.kl(mu, logvar, z).mean()
        return {"loss": recon + (kl if self.beta == 1.0 else self.beta * kl), "recon": recon, "kl": kl}, mu, logvar

    def training_loss(
        self,
        x_in: torch.Tensor,
        target: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        kl_weight: float | None = None,
        free_bits: float = 0.0,
        num_samples: int = 1,
    ) -> torch.Tensor:
        """The training objective: the -ELBO with the KL weighted by `kl_weight` (a warm-up; default beta) and free
        bits, or for objective=iwae the IWAE bound with `num_samples` samples."""
        weight = self.beta if kl_weight is None else kl_weight
        if self.objective == "iwae":
            mu, logvar = (t.float() for t in self.encode(x_in, y))
            log_w = log_weights(self, target, mu, logvar, num_samples, prior_weight=weight, labels=y)
            return iwae_bound(torch.add(*log_w)).mean().float()
        parts, mu, logvar = self.loss_and_posterior(x_in, target, y)
        if self.objective == "notebook" or (weight == self.beta and not free_bits):
            return parts["loss"]
        if free_bits and not self.prior.closed_form_kl:
            raise ValueError(f"free bits need the KL per latent dimension, which the {self.prior.name} prior does not have")
        kl = free_bits_kl(mu, logvar, free_bits) if free_bits else parts["kl"]
        return parts["recon"] + weight * kl
