"""The training objectives of the plain VAE (vaelab.model.vae) against hand computations and independent
implementations: free bits, the IWAE bound, the likelihoods inside the VAE."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from conftest import dense_vae
from vaelab.model.vae import VAE, bounds, free_bits_kl, gaussian_kl, iwae_bound, log_weights


def small_vae(**kwargs) -> VAE:
    """The plain VAE of conftest.dense_vae (1x4x4 images, latent 3)."""
    return dense_vae(**kwargs).vae


# --- free bits -----------------------------------------------------------------------------------------


def test_free_bits_floor_each_dimensions_batch_mean_kl():
    mu = torch.tensor([[0.1, 2.0], [0.3, -1.0]])
    logvar = torch.tensor([[0.0, 0.0], [-0.2, 0.5]])
    per_dim = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)  # [B, D]
    by_hand = sum(max(0.5, per_dim[:, d].mean().item()) for d in range(2))
    assert free_bits_kl(mu, logvar, 0.5).item() == pytest.approx(by_hand, rel=1e-6)
    assert per_dim[:, 0].mean() < 0.5 < per_dim[:, 1].mean()  # one dimension below the floor, one above
    assert free_bits_kl(mu, logvar, 0.0).item() == pytest.approx(gaussian_kl(mu, logvar).mean().item(), rel=1e-6)
    # in the training loss: recon + weight * free-bits KL, while the reported KL stays the true one
    torch.manual_seed(0)
    model = small_vae()
    x = torch.rand(8, 1, 4, 4)
    torch.manual_seed(1)
    loss = model.training_loss(x, x, free_bits=0.5)
    torch.manual_seed(1)
    parts, mu, logvar = model.loss_and_posterior(x, x)
    assert loss.item() == pytest.approx((parts["recon"] + free_bits_kl(mu, logvar, 0.5)).item(), rel=1e-6)
    assert loss.item() > parts["loss"].item()  # the floor lifts dimensions the encoder has left unused


# --- the IWAE bound ------------------------------------------------------------------------------------


def log_w_by_hand(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) with torch.distributions: an implementation of its own."""
    mu, logvar = model.encode(x)
    std = (0.5 * logvar).exp()
    z = mu + std * eps  # [K, B, D]
    logits = model.decode(z.flatten(0, 1)).view(eps.shape[0], x.shape[0], -1)
    log_px = Bernoulli(logits=logits).log_prob(x.flatten(1).expand_as(logits)).sum(-1)
    return log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu, std).log_prob(z).sum(-1)


def test_the_iwae_loss_is_minus_log_mean_of_the_importance_weights():
    torch.manual_seed(0)
    model = small_vae(objective="iwae")
    x = torch.bernoulli(torch.rand(5, 1, 4, 4))
    torch.manual_seed(3)
    loss = model.training_loss(x, x, num_samples=7)
    torch.manual_seed(3)
    eps = torch.randn(7, 5, 3)
    by_hand = -(torch.logsumexp(log_w_by_hand(model, x, eps), 0) - math.log(7)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_iwae_training_with_k_1_is_single_sample_elbo_training_step_for_step():
    """K = 1: the bound is the ELBO. vaelab's IWAE objective trained 20 Adam steps against a loop of its own that
    maximises log p(x|z) + log p(z) - log q(z|x) for one z (torch.distributions), the same draws: equal at every step."""
    torch.manual_seed(0)
    vaelab_model = small_vae(objective="iwae")
    reference = copy.deepcopy(vaelab_model)
    opt_a = torch.optim.Adam(vaelab_model.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(reference.parameters(), lr=1e-2)
    data = torch.bernoulli(torch.rand(20, 8, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    for step, x in enumerate(data):
        torch.manual_seed(100 + step)
        loss_a = vaelab_model.training_loss(x, x, num_samples=1)
        torch.manual_seed(100 + step)
        loss_b = -log_w_by_hand(reference, x, torch.randn(1, 8, 3)).mean()
        assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5), step
        for opt, loss in ((opt_a, loss_a), (opt_b, loss_b)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(vaelab_model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_iwae_bound_tightens_with_k_and_stays_below_the_elbo():
    torch.manual_seed(0)
    model = small_vae().eval()
    x = torch.bernoulli(torch.rand(200, 1, 4, 4))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        by_k = {}
        for k in (1, 10, 100):
            log_w = torch.add(*log_weights(model, x, mu, logvar, k, generator=torch.Generator().manual_seed(0)))
            by_k[k] = iwae_bound(log_w).mean().item()
        parts = bounds(model, x, mu, logvar, 2000, generator=torch.Generator().manual_seed(1))
    neg_elbo = (parts["recon"] + parts["kl"]).mean().item()  # recon averaged over 2000 draws: close to exact
    assert by_k[100] < by_k[10] < by_k[1]
    assert by_k[1] == pytest.approx(neg_elbo, abs=0.5)  # K = 1 estimates the -ELBO itself
    assert parts["nll_iwae"].mean().item() < by_k[100] < neg_elbo


# --- likelihoods inside the VAE -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "likelihood,kwargs,channels",
    [
        ("bernoulli", {}, 1),
        ("continuous_bernoulli", {}, 1),
        ("discretized_logistic", {}, 2),
        ("gaussian", {}, 1),
        ("gaussian", {"scale": "pixel"}, 2),
    ],
)
def test_every_likelihood_trains_and_reports_bits_per_dim(likelihood, kwargs, channels):
    torch.manual_seed(0)
    model = small_vae(likelihood=likelihood, likelihood_kwargs=kwargs)
    assert model.decode(torch.zeros(2, 3)).shape == (2, channels, 4, 4)
    x = torch.randint(0, 256, (16, 1, 4, 4)) / 255.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model.training_loss(model.target(x), model.target(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.decode_mean(torch.zeros(2, 3)).shape == (2, 1, 4, 4)
    bpd = model.bits_per_dim(100.0)
    assert bpd == pytest.approx((100.0 + (16 * math.log(256) if model.likelihood.dequantized else 0)) / (16 * math.log(2)))
    if likelihood == "gaussian" and not kwargs:
        assert "likelihood.log_std" in model.state_dict()  # the global scale is learned and checkpointed
