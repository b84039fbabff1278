"""The VAE as a LightningModule, and its losses.

Default objective: the negative ELBO in nats per image,
    -ELBO(x) = -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I)),
with p(x|z) a Bernoulli per pixel (from logits) summed over pixels, and the KL in closed form.
The `notebook` objective reproduces the Keras teaching notebook exactly (see `notebook_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

OBJECTIVES = ("elbo", "notebook")
EVAL_KEYS = ("loss", "recon", "kl", "noisy_recon")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, in nats, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target | logits) per example, in nats, summed over pixels (stable: computed from logits)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)


def elbo_loss(logits, target, mu, logvar, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Batch means of the negative ELBO and its two parts, nats per image."""
    recon = bernoulli_nll(logits, target).mean()
    kl = gaussian_kl(mu, logvar).mean()
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def notebook_loss(logits, target, mu, log_sigma) -> dict[str, torch.Tensor]:
    """The notebook's loss: per-pixel mean binary cross-entropy plus
    -mean(log_sigma - mean^2 - exp(log_sigma) + 1) / 2, both averaged over the batch."""
    recon = F.binary_cross_entropy_with_logits(logits, target)
    kl = -0.5 * (1.0 + log_sigma - mu.pow(2) - log_sigma.exp()).mean()
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def _plain(node):
    """Plain dicts and lists: checkpoints then hold only built-in types and load with weights_only."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def add_noise(x: torch.Tensor, noise_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The notebook's corruption: x + noise_factor * N(0, 1), clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + noise_factor * noise).clamp_(0.0, 1.0)


class VAE(pl.LightningModule):
    """encode(x) -> (mu, logvar); decode(z) -> logits; sample(n) -> images; loss dicts logged generically."""

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
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective={objective!r} is not one of {OBJECTIVES}")
        encoder, decoder, optimizer = _plain(encoder), _plain(decoder), _plain(optimizer)
        # logger=False: the HPARAMS tab gets a flat, stable set of values from the entry point instead.
        self.save_hyperparameters(logger=False)
        self.encoder = instantiate(encoder)
        self.decoder = instantiate(decoder)
        self._train_loss_sum = None  # running sum since the last logged step (tensor, no host sync per step)
        self._train_loss_count = 0
        # Per-image means of validation and test figures (weighted by batch size; torchmetrics syncs them under DDP).
        # nan_strategy="disable": a NaN must reach the mean (the guard stops on it; torchmetrics' default drops it),
        # and no per-batch check means no host sync per batch.
        self.eval_means = torch.nn.ModuleDict(
            {f"{stage}_{key}": MeanMetric(nan_strategy="disable") for stage in ("val", "test") for key in EVAL_KEYS}
        )

    # --- the model ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits, shaped like the images."""
        return self.decoder(z)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(mu) * self.hparams.epsilon_std
        if self.hparams.objective == "notebook":
            return mu + logvar.exp() * eps  # the notebook's z = mean + exp(log_sigma) * eps
        return mu + (0.5 * logvar).exp() * eps

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.hparams.latent_dim, generator=generator, device=self.device) * temperature
        return torch.sigmoid(self.decode(z))

    def loss(self, x_in: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        # The loss in fp32 even under bf16 autocast: sums over 784 pixels and the latent are too coarse in bf16.
        logits, mu, logvar = (t.float() for t in self(x_in))
        if self.hparams.objective == "notebook":
            return notebook_loss(logits, target, mu, logvar)
        return elbo_loss(logits, target, mu, logvar, self.hparams.beta)

    # --- training ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, _ = batch
        x_in = add_noise(x, self.hparams.noise_factor) if self.hparams.denoise else x
        loss = self.loss(x_in, x)["loss"]
        # self.log costs ~0.5 ms; log the mean over each window of log_every_n_steps steps instead of every step.
        detached = loss.detach().float()
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_loss_count += 1
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", self._train_loss_sum / self._train_loss_count, prog_bar=True)
            self._train_loss_sum, self._train_loss_count = None, 0
        return loss

    def _eval_step(self, x: torch.Tensor, stage: str) -> None:
        parts = self.loss(x, x)
        if self.hparams.noise_factor > 0:
            # Reconstruction error of noisy inputs against the clean images: the notebook's noise weakness, tracked.
            parts["noisy_recon"] = self.loss(add_noise(x, self.hparams.noise_factor), x)["recon"]
        for key, value in parts.items():
            mean = self.eval_means[f"{stage}_{key}"]
            mean.update(value.detach().float(), weight=x.shape[0])
            self.log(f"{stage}/{key}", mean, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch[0], "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch[0], "test")

    def configure_optimizers(self):
        return instantiate(self.hparams.optimizer)(params=self.parameters())  # a partial: the config holds its settings
