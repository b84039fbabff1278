"""The VAE as a LightningModule, and its losses and bounds.

Default objective: the negative ELBO in nats per image,
    -ELBO(x) = -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I)),
with p(x|z) the observation likelihood (vaelab.likelihoods; default a Bernoulli per pixel from logits) summed
over pixels, and the KL in closed form. Training objectives, each composable with beta:
- kl_warmup_epochs=N: the KL weight rises linearly from 0 to beta over N epochs (per step);
- free_bits=L: the KL term is sum_d max(L, mean over the batch of KL_d) (Kingma et al. 2016);
- objective=iwae, num_samples=K: the importance-weighted bound of Burda et al. (2015),
      -log (1/K) sum_k w_k,   log w_k = log p(x|z_k) + beta * (log p(z_k) - log q(z_k|x)),   z_k ~ q(z|x).
Validation and test always report the true bounds (beta as set, no warm-up, no free bits): val/loss (what
the best checkpoint is chosen by), val/nelbo = recon + KL, and test/nll_iwae, the IWAE estimate of -log p(x).
The `notebook` objective reproduces the Keras teaching notebook exactly (see `notebook_loss`).

conditional=True (model.conditional=true) makes it a conditional VAE (Sohn et al., 2015): q(z|x, y) and p(x|z, y)
with the class label y as a one-hot vector at the first linear layer of both networks (vaelab.networks), the
prior N(0, I) as before; every figure above is then conditioned on the images' own labels. The class names
(plain strings, from the data module) are saved with the hyperparameters, so a checkpoint rebuilds its networks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from vaelab.likelihoods import bits_per_dim, build, dequantize

OBJECTIVES = ("elbo", "notebook", "iwae")
EVAL_KEYS = ("loss", "recon", "kl", "noisy_recon", "nelbo", "nll_iwae")
BPD_KEYS = ("nelbo", "nll_iwae")  # also logged in bits per dimension, as <stage>/<key>_bpd
LOG_2PI = math.log(2 * math.pi)
EVAL_SEED = 0  # the dequantisation noise and the importance samples of validation and test: the same every epoch


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, in nats, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target | logits) per example, in nats, summed over pixels (stable: computed from logits)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)


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
    """log p(x|z_k) and prior_weight * (log p(z_k) - log q(z_k|x)) for z_k ~ N(mu, exp(logvar)), each [K, B].
    Reparameterised: gradients flow through z_k (the IWAE objective trains on it). labels: the images' classes, for
    a conditional VAE (None otherwise)."""
    eps = torch.randn((num_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps
    log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)  # (z - mu)^2 / var = eps^2
    log_prior = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
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
    pairs_per_pass: int = 20000,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per image (float64): recon (averaged over the K samples), the exact KL, and nll_iwae, the IWAE estimate of
    -log p(x) from K samples, decoded at most `pairs_per_pass` (image, sample) pairs at a time. labels: as
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
        "kl": gaussian_kl(mu, logvar).double(),
        "nll_iwae": iwae_bound(log_px_z + log_ratio),
    }


def _plain(node):
    """Plain dicts and lists: checkpoints then hold only built-in types and load with weights_only."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def add_noise(x: torch.Tensor, noise_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The notebook's corruption: x + noise_factor * N(0, 1), clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + noise_factor * noise).clamp_(0.0, 1.0)


class VAE(pl.LightningModule):
    """encode(x) -> (mu, logvar); decode(z) -> the likelihood's parameters; decode_mean(z) -> images;
    sample(n) -> images; loss dicts logged generically. A conditional VAE takes the labels y (class indices) as the
    second argument of each: encode(x, y), decode(z, y), sample(n, labels=y)."""

    def __init__(
        self,
        encoder: Mapping,
        decoder: Mapping,
        latent_dim: int,
        optimizer: Mapping | None = None,
        name: str = "custom",
        objective: str = "elbo",
        beta: float = 1.0,
        epsilon_std: float = 1.0,
        noise_factor: float = 0.0,
        denoise: bool = False,
        likelihood: str = "bernoulli",
        likelihood_kwargs: Mapping | None = None,
        binarize: str = "none",
        kl_warmup_epochs: int = 0,
        free_bits: float = 0.0,
        num_samples: int = 1,
        eval_iwae_samples: int = 10,
        val_iwae_every_n_epochs: int = 0,
        conditional: bool = False,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective={objective!r} is not one of {OBJECTIVES}")
        if conditional and not class_names:
            raise ValueError("a conditional VAE needs class_names, the names of the data's classes by label")
        class_names = [str(name) for name in class_names] if conditional else None
        encoder, decoder, optimizer = _plain(encoder), _plain(decoder), _plain(optimizer)
        likelihood_kwargs = _plain(likelihood_kwargs)
        # logger=False: the HPARAMS tab gets a flat, stable set of values from the entry point instead.
        self.save_hyperparameters(logger=False)
        self.image_shape = tuple(decoder.get("image_shape") or (1, 28, 28))
        self.likelihood = build(likelihood, self.image_shape[0], **(likelihood_kwargs or {}))
        self.conditional = bool(conditional)
        self.num_classes = len(class_names) if conditional else 0
        labelled = {"num_classes": self.num_classes} if conditional else {}  # unconditional networks: built as always
        self.encoder = instantiate(encoder, **labelled)
        # A likelihood with more than one parameter per pixel (a mean and a scale) needs more decoder channels.
        extra = {"out_channels": self.likelihood.out_channels} if self.likelihood.out_channels != self.image_shape[0] else {}
        self.decoder = instantiate(decoder, **extra, **labelled)
        self._train_loss_sum = None  # running sum since the last logged step (tensor, no host sync per step)
        self._train_loss_count = 0
        self._eval_generator: torch.Generator | None = None
        # Per-image means of validation and test figures (weighted by batch size; torchmetrics syncs them under DDP).
        # nan_strategy="disable": a NaN must reach the mean (the guard stops on it; torchmetrics' default drops it),
        # and no per-batch check means no host sync per batch.
        self.eval_means = torch.nn.ModuleDict(
            {f"{stage}_{key}": MeanMetric(nan_strategy="disable") for stage in ("val", "test") for key in EVAL_KEYS}
        )

    # --- the model ---------------------------------------------------------------------------------
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
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype) * self.hparams.epsilon_std
        if self.hparams.objective == "notebook":
            return mu + logvar.exp() * eps  # the notebook's z = mean + exp(log_sigma) * eps
        return mu + (0.5 * logvar).exp() * eps

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        mu, logvar = self.encode(x, y)
        return self.decode(self.reparameterize(mu, logvar), y), mu, logvar

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n images decoded from z ~ N(0, temperature^2 I); a conditional VAE decodes image i with labels[i]."""
        z = torch.randn(n, self.hparams.latent_dim, generator=generator, device=self.device) * temperature
        return self.decode_mean(z, labels)

    def target(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the likelihood models: the 8-bit levels themselves, or for a density on [0, 1] the same images
        uniformly dequantised (fresh noise in training, the fixed evaluation noise in validation and test)."""
        return dequantize(x, generator) if self.likelihood.dequantized else x

    def kl_weight(self) -> float:
        """beta, reached linearly over the first kl_warmup_epochs epochs (per step) of training."""
        epochs = self.hparams.kl_warmup_epochs
        if not epochs or not self.training:
            return self.hparams.beta
        done = self.trainer.current_epoch + self.trainer.fit_loop.epoch_loop.batch_idx / max(1, self.trainer.num_training_batches)
        return self.hparams.beta * min(1.0, done / epochs)

    def loss(self, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Batch means of the true -ELBO (beta as set) and its two parts, nats per image."""
        return self._loss(x_in, target, y)[0]

    def _loss(self, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None = None):
        # The loss in fp32 even under bf16 autocast: sums over 784 pixels and the latent are too coarse in bf16.
        out, mu, logvar = (t.float() for t in self(x_in, y))
        if self.hparams.objective == "notebook":
            return notebook_loss(out, target, mu, logvar), mu, logvar
        recon = self.likelihood.nll(out, target).mean()
        kl = gaussian_kl(mu, logvar).mean()
        return {"loss": recon + self.hparams.beta * kl, "recon": recon, "kl": kl}, mu, logvar

    # --- training ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        target = self.target(x)
        x_in = add_noise(target, self.hparams.noise_factor) if self.hparams.denoise else target
        loss = self.train_loss(x_in, target, self.labels_of(y))
        # self.log costs ~0.5 ms; log the mean over each window of log_every_n_steps steps instead of every step.
        detached = loss.detach().float()
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_loss_count += 1
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", self._train_loss_sum / self._train_loss_count, prog_bar=True)
            if self.hparams.kl_warmup_epochs:
                self.log("train/beta", self.kl_weight())
            self._train_loss_sum, self._train_loss_count = None, 0
        return loss

    def train_loss(self, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective: the -ELBO with the warmed-up KL weight and free bits, or the IWAE bound."""
        hp, weight = self.hparams, self.kl_weight()
        if hp.objective == "iwae":
            mu, logvar = (t.float() for t in self.encode(x_in, y))
            log_w = log_weights(self, target, mu, logvar, hp.num_samples, prior_weight=weight, labels=y)
            return iwae_bound(torch.add(*log_w)).mean().float()
        parts, mu, logvar = self._loss(x_in, target, y)
        if hp.objective == "notebook" or (weight == hp.beta and not hp.free_bits):
            return parts["loss"]
        kl = free_bits_kl(mu, logvar, hp.free_bits) if hp.free_bits else parts["kl"]
        return parts["recon"] + weight * kl

    # --- validation and test -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_generator = torch.Generator(device=self.device).manual_seed(EVAL_SEED)

    on_test_epoch_start = on_validation_epoch_start

    def _eval_step(self, x: torch.Tensor, stage: str, y: torch.Tensor | None = None) -> None:
        hp, generator, y = self.hparams, self._eval_generator, self.labels_of(y)
        target = self.target(x, generator)
        parts, mu, logvar = self._loss(target, target, y)
        if hp.noise_factor > 0:
            # Reconstruction error of noisy inputs against the clean images: the notebook's noise weakness, tracked.
            parts["noisy_recon"] = self.loss(add_noise(target, hp.noise_factor), target, y)["recon"]
        if hp.objective != "notebook":
            parts["nelbo"] = parts["recon"] + parts["kl"]
            every = hp.val_iwae_every_n_epochs
            if stage == "test" or (every and not self.trainer.sanity_checking and (self.current_epoch + 1) % every == 0):
                # Its own generator: the other figures' draws, and so the existing figures, stay as they were.
                iwae = bounds(self, target, mu, logvar, hp.eval_iwae_samples, generator=generator, labels=y)["nll_iwae"]
                parts["nll_iwae"] = iwae.mean()
        for key, value in parts.items():
            mean = self.eval_means[f"{stage}_{key}"]
            mean.update(value.detach().float(), weight=x.shape[0])
            self.log(f"{stage}/{key}", mean, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch[0], "val", batch[1])

    def test_step(self, batch, batch_idx):
        self._eval_step(batch[0], "test", batch[1])

    def _log_bits_per_dim(self, stage: str) -> None:
        """<stage>/nelbo_bpd and <stage>/nll_iwae_bpd, from the epoch's per-image means (already summed over the
        ranks by torchmetrics: every rank logs the same value), for the figures computed this epoch."""
        for key in BPD_KEYS:
            mean = self.eval_means[f"{stage}_{key}"]
            if mean.update_called:  # val/nll_iwae only every val_iwae_every_n_epochs epochs; none for the notebook
                nats = mean.compute()
                self.log(
                    f"{stage}/{key}_bpd", bits_per_dim(nats, math.prod(self.image_shape), self.hparams.likelihood), sync_dist=True
                )

    def on_validation_epoch_end(self) -> None:
        self._log_bits_per_dim("val")

    def on_test_epoch_end(self) -> None:
        self._log_bits_per_dim("test")

    def bits_per_dim(self, nats: float) -> float:
        return float(bits_per_dim(nats, math.prod(self.image_shape), self.hparams.likelihood))

    def configure_optimizers(self):
        return instantiate(self.hparams.optimizer)(params=self.parameters())  # a partial: the config holds its settings
