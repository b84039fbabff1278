"""vaelab.model.priors and what uses the prior: log p(z) against hand computations, the Monte-Carlo KL, the bounds,
sampling, the reference architecture's options (gated layers, log-variance clamp, He's initialisation), the
checkpoint round trip, and the one-line refusals of bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import one_line, run_cli
from vaelab.errors import UserError
from vaelab.model import priors
from vaelab.model.networks import DenseDecoder, DenseEncoder, GatedDense
from vaelab.model.vae import VAE, bounds, gaussian_kl, gaussian_log_prob

IMAGE = (1, 4, 4)  # a 16-pixel image: networks small enough for exact checks, large enough to be a real VAE


def hand_mixture_log_prob(z: np.ndarray, means: np.ndarray, logvars: np.ndarray) -> np.ndarray:
    """log (1/K) sum_k prod_d (2 pi v_kd)^(-1/2) exp(-(z_d - m_kd)^2 / (2 v_kd)), written out in float64."""
    var = np.exp(logvars)[None]  # [1, K, D]
    dens = np.prod(np.exp(-((z[:, None, :] - means[None]) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var), axis=-1)
    return np.log(dens.mean(axis=1))


def small_vae(prior: dict | None = None, latent_dim: int = 3, seed: int = 0) -> VAE:
    """A gated VAE of 16-pixel images built from its settings as a checkpoint's are (networks from plain nodes)."""
    torch.manual_seed(seed)
    return VAE.from_settings(settings_of(prior, latent_dim), network)


def settings_of(prior: dict | None, latent_dim: int = 3) -> dict:
    shape = {"latent_dim": latent_dim, "image_shape": list(IMAGE), "hidden": [8], "gated": True}
    return {
        "encoder": {"_target_": "vaelab.model.networks.DenseEncoder", **shape, "logvar_range": [-6.0, 2.0]},
        "decoder": {"_target_": "vaelab.model.networks.DenseDecoder", **shape},
        "latent_dim": latent_dim,
        "likelihood": "bernoulli",
        "prior": prior,
    }


def network(node: dict, **extra) -> torch.nn.Module:
    kind = DenseEncoder if node["_target_"].endswith("DenseEncoder") else DenseDecoder
    return kind(**{k: v for k, v in node.items() if k != "_target_"}, **extra)


def binary_images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, *IMAGE, generator=torch.Generator().manual_seed(seed)))


# --- log p(z) ---------------------------------------------------------------------------------------------------


def test_the_mixture_of_gaussians_log_density_is_the_hand_computation():
    prior = priors.GaussianMixturePrior(latent_dim=3, components=4)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.5, 0.0], [-1.5, -1.0, 1.0], [0.3, 0.3, 0.3]]))
        prior.logvars.copy_(torch.tensor([[0.0, -1.0, 0.5], [-2.0, 0.0, 0.3], [1.0, 1.0, -0.5], [-0.7, 0.2, 0.0]]))
    z = torch.tensor([[0.0, 0.0, 0.0], [1.9, 0.4, 0.1], [-3.0, 2.0, 1.0], [0.3, 0.2, 0.4], [5.0, -4.0, 3.0]])
    expected = hand_mixture_log_prob(
        z.double().numpy(), prior.means.detach().double().numpy(), prior.logvars.detach().double().numpy()
    )
    got = prior.log_prob(z).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # any leading shape: [K, B, D] as the IWAE bound passes it
    assert torch.allclose(prior.log_prob(z.view(1, 5, 3).expand(2, 5, 3)), prior.log_prob(z).expand(2, 5))


def test_the_vampprior_is_the_encoders_posteriors_at_its_pseudo_inputs_written_out_by_hand():
    torch.manual_seed(0)
    encoder = DenseEncoder(2, IMAGE, hidden=[5], gated=True, logvar_range=[-6.0, 2.0])
    prior = priors.VampPrior(2, IMAGE, components=3, pseudo_input_mean=0.5, pseudo_input_std=0.8)
    # as the reference makes them: Hardtanh(0, 1) of a bias-free linear layer at the one-hot idle input
    idle = torch.eye(3)
    reference = torch.nn.functional.hardtanh(prior.means(idle), 0.0, 1.0).view(3, *IMAGE)
    assert torch.equal(prior.pseudo_inputs(), reference)
    assert prior.pseudo_inputs().min() == 0 and prior.pseudo_inputs().max() == 1  # std 0.8: both ends are clamped
    u = np.clip(prior.means.weight.detach().double().numpy().T, 0, 1)  # u_k = column k of W, clamped to [0, 1]
    mean, logvar = (t.detach().double().numpy() for t in encoder(torch.from_numpy(u).float().view(3, *IMAGE)))
    z = torch.randn(6, 2)
    expected = hand_mixture_log_prob(z.double().numpy(), mean, logvar)
    np.testing.assert_allclose(prior.log_prob(z, encoder).detach().double().numpy(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="pass the encoder"):
        prior.log_prob(z)


def test_the_vampprior_starts_as_the_reference_initialises_it():
    prior = priors.VampPrior(40, (1, 28, 28))  # K = 500 pseudo-inputs of 784 pixels, weights ~ N(0.05, 0.01^2)
    weight = prior.means.weight.detach()
    assert weight.shape == (784, 500) and prior.means.bias is None
    assert abs(weight.mean().item() - 0.05) < 1e-3 and abs(weight.std().item() - 0.01) < 1e-3


def test_a_one_component_mixture_at_the_origin_is_the_standard_normal():
    mog = priors.GaussianMixturePrior(latent_dim=4, components=1)
    with torch.no_grad():
        mog.means.zero_()
    z = 3 * torch.randn(50, 4)
    standard = priors.StandardPrior(4).log_prob(z)
    assert torch.allclose(mog.log_prob(z), standard, atol=1e-4)
    assert torch.allclose(standard, -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1))


# --- the KL term and the bounds -----------------------------------------------------------------------------------


def test_the_monte_carlo_kl_has_the_closed_forms_expectation():
    """For N(0, I) written as a one-component mixture (so the Monte-Carlo path is taken), the mean of the one-sample
    estimate log q(z|x) - log p(z) over many draws is the closed-form KL."""
    vae = small_vae({"name": "mog", "components": 1})
    with torch.no_grad():
        vae.prior.means.zero_()
    assert not vae.prior.closed_form_kl
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[-1.0, 0.3, 0.0]])
    draws = 200_000
    z = mu + (0.5 * logvar).exp() * torch.randn(draws, 3, generator=torch.Generator().manual_seed(0))
    estimate = vae.kl(mu.expand(draws, 3), logvar.expand(draws, 3), z)
    closed = gaussian_kl(mu, logvar).item()
    assert abs(estimate.mean().item() - closed) < 4 * estimate.std().item() / math.sqrt(draws)
    assert abs(estimate.mean().item() - closed) < 0.02


def test_the_loss_of_a_mixture_prior_is_the_estimate_at_the_decoded_draw_and_the_standard_keeps_its_closed_form():
    x = binary_images(6)
    for prior in ({"name": "vamp", "components": 5}, None):
        vae = small_vae(prior)
        torch.manual_seed(3)
        parts = vae.loss(x, x)
        torch.manual_seed(3)
        mu, logvar = vae.encode(x)
        z = vae.reparameterize(mu, logvar)
        recon = vae.likelihood.nll(vae.decode(z), x).mean()
        kl = gaussian_kl(mu, logvar) if prior is None else gaussian_log_prob(z, mu, logvar) - vae.log_prior(z)
        assert torch.allclose(parts["recon"], recon) and torch.allclose(parts["kl"], kl.mean(), atol=1e-5)
        assert torch.allclose(parts["loss"], parts["recon"] + parts["kl"])


@pytest.mark.parametrize("prior", [None, {"name": "mog", "components": 6}, {"name": "vamp", "components": 6}])
def test_the_iwae_bound_is_below_the_negative_elbo_for_every_prior(prior):
    vae = small_vae(prior)
    if prior and prior["name"] == "mog":  # far from N(0, I): a bound computed under the wrong prior would show
        with torch.no_grad():
            vae.prior.means.mul_(3.0)
            vae.prior.logvars.fill_(-1.0)
    x = binary_images(20)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        # The -ELBO from the training loss (one draw each), averaged over many draws: its expectation.
        torch.manual_seed(0)
        nelbo = torch.stack([vae.loss(x, x)["loss"] for _ in range(300)]).mean().item()
        one = bounds(vae, x, mu, logvar, 300, generator=torch.Generator().manual_seed(1))
        # The bound with K = 1 is the -ELBO itself (same expectation), by the other code path (log_weights).
        k1 = torch.stack([bounds(vae, x, mu, logvar, 1)["nll_iwae"] for _ in range(300)]).mean().item()
        many = bounds(vae, x, mu, logvar, 1000, generator=torch.Generator().manual_seed(2))["nll_iwae"].mean().item()
    assert abs(k1 - nelbo) < 0.5
    assert abs((one["recon"] + one["kl"]).mean().item() - nelbo) < 0.5  # bounds' recon + KL: the -ELBO too
    assert many < nelbo - 0.05  # strictly tighter: the prior's log p(z) enters both the same way


# --- sampling -----------------------------------------------------------------------------------------------------


def test_mixture_samples_have_the_mixtures_moments_and_temperature_widens_the_components():
    prior = priors.GaussianMixturePrior(latent_dim=2, components=2)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-3.0, 0.0], [3.0, 1.0]]))
        prior.logvars.copy_(torch.log(torch.tensor([[0.25, 1.0], [0.25, 4.0]])))
    z = prior.sample(40_000, generator=torch.Generator().manual_seed(0)).double()
    # mean: the average of the means; variance: the average of (var + mean^2) minus mean^2
    assert torch.allclose(z.mean(0), torch.tensor([0.0, 0.5], dtype=torch.float64), atol=0.05)
    assert torch.allclose(z.var(0), torch.tensor([9.25, 2.5 + 0.25], dtype=torch.float64), rtol=0.03)
    assert abs((z[:, 0] > 0).double().mean().item() - 0.5) < 0.01  # each component half the time
    hot = prior.sample(40_000, generator=torch.Generator().manual_seed(0), temperature=2.0).double()
    assert abs(hot[hot[:, 0] > 0, 0].var().item() - 4 * 0.25) < 0.05


def test_vampprior_samples_lie_where_its_density_is():
    vae = small_vae({"name": "vamp", "components": 5})
    with torch.no_grad():
        z = vae.prior.sample(2000, vae.encoder, generator=torch.Generator().manual_seed(0))
        shifted = z + 3 * vae.prior.components(vae.encoder)[1].exp().sqrt().max()
        assert (vae.log_prior(z) > vae.log_prior(shifted)).double().mean() > 0.99


def test_vae_sample_draws_from_its_prior_and_the_standard_prior_draws_as_before():
    standard = small_vae(None)
    n, temperature = 5, 0.7
    expected = standard.decode_mean(torch.randn(n, 3, generator=torch.Generator().manual_seed(4)) * temperature)
    assert torch.equal(standard.sample(n, temperature, torch.Generator().manual_seed(4)), expected)
    vamp = small_vae({"name": "vamp", "components": 5})
    z = vamp.prior.sample(n, vamp.encoder, torch.Generator().manual_seed(4), temperature)
    assert torch.equal(vamp.sample(n, temperature, torch.Generator().manual_seed(4)), vamp.decode_mean(z))


# --- the reference architecture's options --------------------------------------------------------------------------


def test_gated_layers_are_a_linear_layer_times_the_sigmoid_of_another():
    encoder = DenseEncoder(2, IMAGE, hidden=[5, 4], gated=True)
    decoder = DenseDecoder(2, IMAGE, hidden=[4, 5], gated=True)
    assert [type(m).__name__ for m in encoder.body] == ["Flatten", "GatedDense", "GatedDense"]
    assert [type(m).__name__ for m in decoder.body] == ["GatedDense", "GatedDense", "Linear"]
    layer, x = encoder.body[1], torch.randn(3, 16)
    assert torch.allclose(layer(x), (x @ layer.h.weight.T + layer.h.bias) * torch.sigmoid(x @ layer.g.weight.T + layer.g.bias))
    # the default is the network it always was: Linear and ReLU, under the same names
    plain = DenseEncoder(2, IMAGE, hidden=[5, 4])
    assert [type(m).__name__ for m in plain.body] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU"]
    assert not any(isinstance(m, GatedDense) for m in plain.modules())
    assert set(plain.state_dict()) == {
        "body.1.weight",
        "body.1.bias",
        "body.3.weight",
        "body.3.bias",
        "heads.weight",
        "heads.bias",
    }


def test_the_log_variance_is_clamped_to_its_range_with_no_gradient_outside():
    encoder = DenseEncoder(3, IMAGE, logvar_range=[-6.0, 2.0])
    with torch.no_grad():
        encoder.heads.bias[3:] = torch.tensor([-50.0, 0.5, 50.0])  # the log-variance half of the heads
        encoder.heads.weight.zero_()
    _, logvar = encoder(torch.rand(2, *IMAGE))
    assert logvar[0].tolist() == [-6.0, 0.5, 2.0]
    logvar.sum().backward()
    assert encoder.heads.bias.grad[3:].tolist() == [0.0, 2.0, 0.0]
    assert DenseEncoder(3, IMAGE).logvar_range is None  # off by default: unclamped
    with pytest.raises(ValueError, match="low < high"):
        DenseEncoder(3, IMAGE, logvar_range=[2.0, -6.0])


def test_he_initialisation_draws_the_weights_from_n_0_2_over_fan_in_and_default_draws_nothing():
    torch.manual_seed(0)
    default = DenseEncoder(40, (1, 28, 28), hidden=[300, 300], gated=True)
    torch.manual_seed(0)
    again = DenseEncoder(40, (1, 28, 28), hidden=[300, 300], gated=True, init="default")
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), again.state_dict().values()))
    torch.manual_seed(0)
    he = DenseEncoder(40, (1, 28, 28), hidden=[300, 300], gated=True, init="he")
    linears = [m for m in he.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5  # h and g of both gated layers, and the heads
    for layer in linears:
        assert abs(layer.weight.std().item() / math.sqrt(2 / layer.in_features) - 1) < 0.03
        assert layer.bias.abs().max() <= 1 / math.sqrt(layer.in_features)  # PyTorch's bias, kept
    assert not torch.equal(he.heads.weight, default.heads.weight)
    decoder = DenseDecoder(40, (1, 28, 28), hidden=[300, 300], init="he")
    assert abs(decoder.body[-1].weight.std().item() / math.sqrt(2 / 300) - 1) < 0.03
    with pytest.raises(ValueError, match="init='xavier'"):
        DenseDecoder(40, (1, 28, 28), init="xavier")


def test_the_experiments_build_the_reference_networks_and_their_priors(compose):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    def built(overrides: list[str]) -> VAE:  # as vaelab.training.module.VAEModule builds it, without Lightning
        return VAE.from_settings(OmegaConf.to_container(compose(overrides).model, resolve=True), instantiate)

    standard, vamp = built(["experiment=fmnist_density"]), built(["experiment=fmnist_density_vamp"])
    # 784 -> 300 -> 300 gated, heads 300 -> 2 x 40; 40 -> 300 -> 300 gated, 300 -> 784: the reference's 1,116,864
    networks = 2 * (784 * 300 + 300) + 2 * (300 * 300 + 300) + 300 * 80 + 80 + 2 * (40 * 300 + 300) + 2 * (300 * 300 + 300)
    assert sum(p.numel() for p in standard.parameters()) == networks + 300 * 784 + 784 == 1_116_864
    assert isinstance(standard.prior, priors.StandardPrior) and standard.encoder.logvar_range == (-6.0, 2.0)
    assert isinstance(vamp.prior, priors.VampPrior) and vamp.prior.means.weight.shape == (784, 500)
    assert sum(p.numel() for p in vamp.parameters()) == 1_116_864 + 500 * 784
    # the default model is untouched: no prior parameters, the standard prior
    default = built([])
    assert isinstance(default.prior, priors.StandardPrior) and not any(k.startswith("prior.") for k in default.state_dict())


# --- checkpoints ----------------------------------------------------------------------------------------------------


def saved(tmp_path, vae: VAE, prior) -> str:
    """A checkpoint of `vae` as vaelab-train writes one (weights under vae., the model's settings with `prior`)."""
    path = tmp_path / "model.ckpt"
    weights = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    torch.save({"state_dict": weights, "hyper_parameters": settings_of(prior)}, path)
    return str(path)


def test_a_checkpoint_carries_the_prior_and_the_loader_rebuilds_it(tmp_path):
    from vaelab.runs.checkpoints import load_vae

    prior = {"name": "vamp", "components": 5, "pseudo_input_mean": 0.05, "pseudo_input_std": 0.01}
    vae = small_vae(prior, seed=7)
    with torch.no_grad():
        vae.prior.means.weight.uniform_(0, 1)  # "trained": not what a fresh prior would draw
    loaded = load_vae(saved(tmp_path, vae, prior))
    assert isinstance(loaded.prior, priors.VampPrior) and torch.equal(loaded.prior.means.weight, vae.prior.means.weight)
    z = torch.randn(7, 3)
    with torch.no_grad():
        assert torch.allclose(loaded.log_prior(z), vae.log_prior(z))


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        ("vamp", "hyper_parameters.prior='vamp' is not a mapping"),
        ({"name": "vamp", "components": 0}, "hyper_parameters.prior.components=0 is not a positive integer"),
        ({"name": "vamp", "components": 5, "_target_": "os.system"}, "refusing to build 'os.system'"),
        ({"name": "flow", "components": 5}, "hyper_parameters.prior.name='flow' is not one of standard, vamp, mog"),
        ({"name": "mog", "components": 5, "pseudo_input_std": 0.01}, "the mog prior has no setting 'pseudo_input_std'"),
    ],
)
def test_a_checkpoint_with_a_bad_prior_is_refused_in_one_line(tmp_path, prior, message):
    from vaelab.runs.checkpoints import load_vae

    vae = small_vae({"name": "vamp", "components": 5})
    with pytest.raises(UserError) as refused:
        load_vae(saved(tmp_path, vae, prior))
    assert message in str(refused.value) and "\n" not in str(refused.value)


# --- the settings -----------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (["model.prior=vamp"], "model.prior='vamp' is not allowed: the prior is a config group, chosen with model/prior=<name>"),
    (["model.prior.name=flow"], "model.prior.name='flow' is not allowed: model.prior.name must be one of standard, vamp, mog"),
    (["model/prior=vamp", "model.prior.components=0"], "model.prior.components=0 is not allowed"),
    (["model/prior=vamp", "model.prior.pseudo_input_mean=1.5"], "model.prior.pseudo_input_mean=1.5 is not allowed"),
    (["model/prior=vamp", "model.prior.pseudo_input_std=-1"], "model.prior.pseudo_input_std=-1 is not allowed"),
    (["model=mlp", "model.encoder.gated=maybe"], "model.encoder.gated='maybe' is not allowed"),
    (["model=mlp", "model.decoder.gated=1"], "model.decoder.gated=1 is not allowed"),
    (["model=mlp", "model.encoder.logvar_range=[2,-6]"], "model.encoder.logvar_range=[2, -6] is not allowed"),
    (
        ["model=mlp", "model.encoder.init=xavier"],
        "model.encoder.init='xavier' is not allowed: model.encoder.init must be one of default, he",
    ),
    (["model=mlp", "model.decoder.init=xavier"], "model.decoder.init='xavier' is not allowed"),
    (["model/prior=mog", "model.objective=notebook"], "model.objective='notebook' does not go with the mog prior"),
    (["model/prior=mog", "model.free_bits=0.5"], "model.free_bits=0.5 does not go with the mog prior"),
    (["model/prior=vamp", "model.epsilon_std=0.1"], "model.epsilon_std=0.1 does not go with the vamp prior"),
    (["model/prior=vamp", "model.conditional=true"], "model.conditional=true does not go with the vamp prior"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS)
def test_each_bad_value_of_the_new_settings_is_refused_in_one_line(compose, overrides, message):
    from vaelab.runs import settings

    with pytest.raises(UserError) as refused:
        settings.check(compose(overrides), "train")
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_bad_prior_settings_end_in_one_line_from_the_shell(tmp_path):
    for args, start in (
        (["model/prior=flow"], "vaelab-train: error: model/prior=flow is not a choice of model/prior"),
        (["model/prior=vamp", "model.prior.components=0"], "vaelab-train: error: model.prior.components=0 is not allowed"),
        (["model=mlp", "model.encoder.init=xavier"], "vaelab-train: error: model.encoder.init='xavier' is not allowed"),
    ):
        proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'never'}", check=False)
        one_line(proc, start)
        assert not (tmp_path / "never").exists()  # refused before anything was written
