"""The plain VAE's losses against hand-computed values (vaelab.model.vae)."""

import math

import pytest
import torch

from vaelab.model.vae import add_noise, bernoulli_nll, elbo_loss, gaussian_kl, notebook_loss


def test_gaussian_kl_matches_hand_computation():
    mu = torch.tensor([[0.5, -1.0]])
    logvar = torch.tensor([[math.log(2.0), 0.0]])
    # 0.5 * [(0.25 + 2 - 1 - ln 2) + (1 + 1 - 1 - 0)]
    expected = 0.5 * ((0.25 + 2.0 - 1.0 - math.log(2.0)) + 1.0)
    assert gaussian_kl(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).tolist() == [0.0, 0.0, 0.0]


def test_bernoulli_nll_sums_pixels_in_nats():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])  # one 1x2x2 image
    target = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]])
    p = torch.sigmoid(logits).flatten()
    t = target.flatten()
    expected = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p.tolist(), t.tolist()))
    assert bernoulli_nll(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Stable from logits where sigmoid saturates: log(1 + e^-100) ~ 1e-44, not log(0).
    assert torch.isfinite(bernoulli_nll(torch.full((1, 1, 1, 1), 100.0), torch.zeros(1, 1, 1, 1))).all()
    assert bernoulli_nll(torch.full((1, 1, 1, 1), 100.0), torch.zeros(1, 1, 1, 1)).item() == pytest.approx(100.0)


def test_elbo_loss_is_batch_mean_of_recon_plus_beta_kl():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    recon = bernoulli_nll(logits, target)
    kl = gaussian_kl(mu, logvar)
    out = elbo_loss(logits, target, mu, logvar, beta=0.5)
    assert out["recon"].item() == pytest.approx(recon.mean().item(), rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx((recon + 0.5 * kl).mean().item(), rel=1e-6)


def test_notebook_loss_matches_its_formula():
    logits = torch.tensor([[[[0.0, 1.0]]]])  # one 1x1x2 image
    target = torch.tensor([[[[1.0, 0.0]]]])
    mu = torch.tensor([[1.0, 0.0]])
    log_sigma = torch.tensor([[0.0, math.log(0.5)]])
    p0, p1 = 0.5, 1 / (1 + math.exp(-1.0))
    bce = (-math.log(p0) - math.log(1 - p1)) / 2  # per-pixel mean
    kl = -((0.0 - 1.0 - 1.0 + 1.0) + (math.log(0.5) - 0.0 - 0.5 + 1.0)) / 2 / 2  # -mean(...)/2
    out = notebook_loss(logits, target, mu, log_sigma)
    assert out["recon"].item() == pytest.approx(bce, rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert out["loss"].item() == pytest.approx(bce + kl, rel=1e-6)


def test_add_noise_is_clipped_and_scaled():
    x = torch.full((1000, 1, 28, 28), 0.5)
    noisy = add_noise(x, 0.1, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.02)
    assert torch.equal(add_noise(x, 0.0), x)
