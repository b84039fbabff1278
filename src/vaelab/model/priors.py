"""The prior p(z) of the VAE, a swappable part (model/prior=standard|vamp|mog):

    standard   p(z) = N(0, I)                                               the KL term in closed form
    mog        p(z) = 1/K sum_k N(z; m_k, diag exp(l_k))                    K learned means m_k and log-variances l_k
    vamp       p(z) = 1/K sum_k q(z | u_k)                                  the VampPrior (Tomczak & Welling 2018): the
                                                                            encoder at K learned pseudo-inputs u_k

Each has log_prob(z, encoder) -> log p(z) summed over the latent dimensions, and sample(n, encoder, ...) -> n draws of
z. `encoder` is the VAE's encoder (x -> (mean, log-variance) of q(z|x)): the VampPrior's components are the encoder's
posteriors at its pseudo-inputs, so it is given at each call rather than held (its weights are the VAE's, saved once).
The mixtures' parameters are the prior's own (in the state dict under `prior.`); the standard prior has none, so a
VAE with it has the state dict it always had.

`build(settings, latent_dim, image_shape)` builds a prior from its settings (conf/model/prior/<name>.yaml), plain data
with a `name`: what checkpoints record and vaelab-eval and vaelab-generate rebuild it from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)
Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k N(z; means_k, diag exp(logvars_k)) for z [..., D] and K components [K, D]: [...].

    The quadratic term sum_d (z_d - m_kd)^2 / v_kd is expanded into z^2 @ (1/v)^T - 2 z @ (m/v)^T + sum_d m_kd^2 / v_kd,
    two matrix products, so no [..., K, D] tensor is formed: the IWAE bound with K = 5000 samples of a 500-component
    prior is then about 50 times faster on a CPU than the broadcast difference, and fits in memory."""
    inv_var = torch.exp(-logvars)  # [K, D]
    flat = z.reshape(-1, z.shape[-1])
    quadratic = flat.pow(2) @ inv_var.T - 2 * flat @ (means * inv_var).T + (means.pow(2) * inv_var).sum(-1)
    log_normal = -0.5 * (quadratic + logvars.sum(-1) + z.shape[-1] * LOG_2PI)  # [N, K]
    log_p = torch.logsumexp(log_normal, dim=-1) - math.log(means.shape[0])
    return log_p.reshape(z.shape[:-1])


class StandardPrior(nn.Module):
    """p(z) = N(0, I). No parameters. The KL of a Gaussian posterior to it has a closed form (vaelab.model.vae.gaussian_kl)."""

    name = "standard"
    closed_form_kl = True

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = int(latent_dim)

    def log_prob(self, z: torch.Tensor, encoder: Encoder | None = None) -> torch.Tensor:
        return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)

    def sample(
        self,
        n: int,
        encoder: Encoder | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """n draws of z ~ N(0, temperature^2 I)."""
        return torch.randn(n, self.latent_dim, generator=generator, device=device) * temperature


class MixturePrior(nn.Module):
    """A uniform mixture of K diagonal Gaussians; subclasses say where the components' means and log-variances come from."""

    closed_form_kl = False

    def components(self, encoder: Encoder | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor, encoder: Encoder | None = None) -> torch.Tensor:
        means, logvars = (t.float() for t in self.components(encoder))
        with torch.autocast(z.device.type, enabled=False):  # in fp32 even under bf16 autocast: the expansion cancels terms
            return mixture_log_prob(z.float(), means, logvars)

    def sample(
        self,
        n: int,
        encoder: Encoder | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """n draws: a component k uniformly at random, then z ~ N(m_k, temperature^2 diag exp(l_k))."""
        means, logvars = self.components(encoder)
        k = torch.randint(means.shape[0], (n,), generator=generator, device=means.device)
        eps = torch.randn(n, means.shape[1], generator=generator, device=means.device)
        return (means[k] + (0.5 * logvars[k]).exp() * eps * temperature).to(device)


class GaussianMixturePrior(MixturePrior):
    """p(z) = 1/K sum_k N(z; m_k, diag exp(l_k)), the means and log-variances learned; the means start as N(0, I)
    draws, the log-variances at 0."""

    name = "mog"

    def __init__(self, latent_dim: int, components: int = 500):
        super().__init__()
        self.means = nn.Parameter(torch.randn(int(components), int(latent_dim)))
        self.logvars = nn.Parameter(torch.zeros(int(components), int(latent_dim)))

    def components(self, encoder: Encoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.means, self.logvars


class VampPrior(MixturePrior):
    """p(z) = 1/K sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs u_k, made as in the reference
    code (jmtomczak/vae_vampprior, models/Model.py add_pseudoinputs): a linear layer without bias, K inputs to the
    image's size, applied to the fixed one-hot "idle input" I_K, then Hardtanh(0, 1); its weights start as
    N(pseudo_input_mean, pseudo_input_std^2) draws (0.05 and 0.01 there, utils/load_data.py)."""

    name = "vamp"

    def __init__(
        self,
        latent_dim: int,
        image_shape=(1, 28, 28),
        components: int = 500,
        pseudo_input_mean: float = 0.05,
        pseudo_input_std: float = 0.01,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.means = nn.Linear(int(components), math.prod(self.image_shape), bias=False)
        nn.init.normal_(self.means.weight, float(pseudo_input_mean), float(pseudo_input_std))

    def pseudo_inputs(self) -> torch.Tensor:
        """[K, C, H, W]: Hardtanh(0, 1) of the linear layer at the idle input. Row k of I_K W^T is column k of W, so
        the product is read off the weights (the same values and gradients, without a K x K x D matrix product)."""
        return F.hardtanh(self.means.weight.T, 0.0, 1.0).reshape(-1, *self.image_shape)

    def components(self, encoder: Encoder | None) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder is None:
            raise ValueError("the VampPrior's components are the encoder's posteriors at its pseudo-inputs: pass the encoder")
        return encoder(self.pseudo_inputs())


# Keyed by name, in the order of the vocabulary (vaelab.choices.PRIORS, which the settings read).
PRIORS: dict[str, type[nn.Module]] = {cls.name: cls for cls in (StandardPrior, VampPrior, GaussianMixturePrior)}
SETTINGS = {
    "standard": (),
    "mog": ("components",),
    "vamp": ("components", "pseudo_input_mean", "pseudo_input_std"),
}


def build(settings: Mapping[str, Any] | None, latent_dim: int, image_shape=(1, 28, 28)) -> nn.Module:
    """The prior its settings describe ({name: vamp, components: 500, ...}; None or no name: the standard prior)."""
    settings = dict(settings or {})
    name = settings.pop("name", "standard")
    if name not in PRIORS:
        raise ValueError(f"prior {name!r} is not one of {', '.join(PRIORS)}")
    unknown = sorted(set(settings) - set(SETTINGS[name]))
    if unknown:
        raise ValueError(f"the {name} prior has no setting {unknown[0]!r} (its settings: {', '.join(SETTINGS[name]) or 'none'})")
    if name == "vamp":
        return VampPrior(latent_dim, image_shape, **settings)
    return PRIORS[name](latent_dim, **settings)
