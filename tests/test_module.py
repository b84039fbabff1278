"""The losses against hand-computed values, and the model interface for every network."""

import math

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vaelab.model.vae import VAE, add_noise, bernoulli_nll, elbo_loss, gaussian_kl, notebook_loss


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


@pytest.mark.parametrize("model", ["dense", "mlp", "conv"])
@pytest.mark.parametrize("latent_dim", [2, 16])
def test_every_model_has_the_interface(compose, model, latent_dim):
    cfg = compose([f"model={model}", f"latent_dim={latent_dim}"])
    vae: VAE = instantiate(cfg.model)
    x = torch.rand(6, 1, 28, 28)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (6, latent_dim)
    assert vae.decode(mu).shape == (6, 1, 28, 28)
    samples = vae.sample(5)
    assert samples.shape == (5, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    parts = vae.loss(x, x)
    assert set(parts) == {"loss", "recon", "kl"} and torch.isfinite(parts["loss"])
    parts["loss"].backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_notebook_sampling_uses_exp_log_sigma_and_small_eps(compose):
    cfg = compose(["experiment=notebook"])
    vae = instantiate(cfg.model)
    mu = torch.zeros(20000, 1)
    log_sigma = torch.full((20000, 1), math.log(2.0))
    z = vae.reparameterize(mu, log_sigma)
    assert z.std().item() == pytest.approx(2.0 * 0.1, rel=0.05)  # exp(log_sigma) * N(0, 0.1^2)
    cfg = compose([])
    z = instantiate(cfg.model).reparameterize(mu, log_sigma)
    assert z.std().item() == pytest.approx(math.sqrt(2.0), rel=0.05)  # exp(logvar / 2) * N(0, 1)


def test_checkpoint_hparams_are_plain(compose):
    vae = instantiate(compose([]).model)
    assert type(vae.hparams["encoder"]) is dict and type(vae.hparams["optimizer"]) is dict


def test_unknown_objective_is_refused(compose):
    with pytest.raises(InstantiationException, match="model.objective='mse'"):
        instantiate(compose(["model.objective=mse"]).model)


def test_a_nan_batch_reaches_the_validation_mean(compose):
    """The per-image means keep a NaN (torchmetrics would drop it by default): the guard then stops the run."""
    vae = instantiate(compose(["latent_dim=2"]).model)
    x = torch.rand(4, 1, 28, 28)
    vae._eval_step(x, "val")
    vae.eval_means["val_loss"].update(torch.tensor(float("nan")), weight=4)
    assert torch.isnan(vae.eval_means["val_loss"].compute())


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.mark.parametrize("model", ["dense", "mlp", "conv"])
def test_every_model_can_be_conditional_with_labels_through_every_figure(compose, model):
    """model.conditional=true: the labels reach the loss, the IWAE bound and the samples, and change them; the class
    names are plain hyperparameters (what a checkpoint rebuilds the networks from)."""
    from vaelab.model.vae import bounds

    vae: VAE = instantiate(compose([f"model={model}", "latent_dim=4", "model.conditional=true"]).model, class_names=FASHION)
    assert vae.conditional and vae.num_classes == 10 and vae.hparams["class_names"] == FASHION
    assert type(vae.hparams["class_names"]) is list
    torch.manual_seed(0)
    x, y, other = torch.rand(6, 1, 28, 28), torch.arange(6), torch.arange(6) + 4
    torch.manual_seed(1)
    a = vae.loss(x, x, y)
    torch.manual_seed(1)
    b = vae.loss(x, x, other)
    assert a["loss"] != b["loss"]
    a["loss"].backward()
    assert all(p.grad is not None for p in vae.parameters())
    mu, logvar = vae.encode(x, y)
    iwae = lambda labels: bounds(vae, x, mu, logvar, 5, generator=torch.Generator().manual_seed(0), labels=labels)["nll_iwae"]
    assert not torch.equal(iwae(y), iwae(other))
    sample = lambda labels: vae.sample(6, generator=torch.Generator().manual_seed(0), labels=labels)
    assert not torch.equal(sample(y), sample(other))
    vae._eval_step(x, "val", y)  # validation and test take the batch's labels


def test_a_conditional_model_without_class_names_is_refused(compose):
    with pytest.raises(InstantiationException, match="needs class_names"):
        instantiate(compose(["model.conditional=true"]).model)


def test_the_default_model_is_unconditional_and_ignores_labels(compose):
    vae: VAE = instantiate(compose(["latent_dim=2"]).model)
    assert not vae.conditional and vae.hparams["conditional"] is False and vae.hparams["class_names"] is None
    assert vae.encoder.num_classes == 0 and vae.decoder.num_classes == 0
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(vae.encode(x, torch.tensor([1, 2, 3]))[0], vae.encode(x)[0])
