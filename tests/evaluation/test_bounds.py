"""The bounds vaelab-eval reports (vaelab.evaluation.bounds, measures): the IWAE estimate against hand and quadrature
computations and against the ELBO on a trained model, the denoising VAE against a plain one, the Fréchet distance."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from conftest import DATA_DIR, REPO, SYSTEM_DIR, dense_vae
from vaelab.commands.evaluate import evaluate
from vaelab.evaluation.bounds import active_units, likelihood, noisy_input_errors
from vaelab.model.networks import DenseDecoder
from vaelab.model.vae import VAE, bernoulli_nll
from vaelab.training.data import LightningData
from vaelab.training.module import VAEModule

TRAIN_STEPS = 150  # batches of 64: enough for the denoising effect to stand far above the noise (~20 nats at 0.3)


def tiny_vae(latent_dim: int, image_shape, enc_bias, dec_weight, dec_bias, objective: str = "elbo") -> VAE:
    """A dense VAE with hand-set weights: the encoder ignores x (mu, logvar = enc_bias), the decoder's logits
    are dec_weight @ z + dec_bias."""
    vae = VAEModule(
        encoder={"_target_": "vaelab.model.networks.DenseEncoder", "latent_dim": latent_dim, "image_shape": image_shape},
        decoder={"_target_": "vaelab.model.networks.DenseDecoder", "latent_dim": latent_dim, "image_shape": image_shape},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True},
        latent_dim=latent_dim,
        objective=objective,
    ).vae
    with torch.no_grad():
        vae.encoder.heads.weight.zero_()
        vae.encoder.heads.bias.copy_(torch.as_tensor(enc_bias, dtype=torch.float32))
        vae.decoder.body[-1].weight.copy_(torch.as_tensor(dec_weight, dtype=torch.float32))
        vae.decoder.body[-1].bias.copy_(torch.as_tensor(dec_bias, dtype=torch.float32))
    return vae.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A plain and a denoising dense VAE (latent 16, noise_factor 0.3), the same steps and seed, trained in-process
    on the real Fashion-MNIST; and the first 500 test images."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers, as vaelab-train does

    root = tmp_path_factory.mktemp("denoise")
    models = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for denoise in (False, True):
            cfg = compose(
                "train",
                overrides=[
                    f"paths.root_dir={root}",
                    f"paths.data_dir={DATA_DIR}",
                    f"paths.output_dir={root}",
                    "latent_dim=16",
                    "noise_factor=0.3",
                    f"denoise={denoise}",
                    "batch_size=64",
                ],
            )
            pl.seed_everything(0)
            data, module = instantiate(cfg.data), instantiate(cfg.model)
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=TRAIN_STEPS,
                limit_val_batches=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
            )
            trainer.fit(module, datamodule=LightningData(data))
            models["denoise" if denoise else "plain"] = module.vae.eval()
    return models, data.test_set[0][:500]


def test_iwae_is_exact_when_the_posterior_is_the_prior_and_the_decoder_ignores_z():
    # q(z|x) = N(0, I) = p(z) and p(x|z) = p(x) for every z: every importance weight is p(x), so the estimate is
    # -log p(x) exactly for any K, the KL is 0 and the negative ELBO equals it too.
    torch.manual_seed(0)
    logits = torch.randn(4)
    vae = tiny_vae(3, (1, 2, 2), torch.zeros(6), torch.zeros(4, 3), logits)
    images = torch.rand(5, 1, 2, 2)
    p = torch.sigmoid(logits).tolist()
    by_hand = [-sum(t * math.log(pi) + (1 - t) * math.log(1 - pi) for pi, t in zip(p, x.flatten().tolist())) for x in images]
    # pairs_per_pass=3 < K=7: one image per pass and its samples split 3 + 3 + 1
    out = likelihood(vae, images, num_samples=7, pairs_per_pass=3, generator=torch.Generator().manual_seed(1))
    assert out["nll_iwae"].tolist() == pytest.approx(by_hand, rel=1e-5)
    assert out["neg_elbo"].tolist() == pytest.approx(by_hand, rel=1e-5)
    assert out["kl"].tolist() == [0.0] * 5
    assert active_units(out["mu"]) == 0


def test_the_iwae_bound_of_a_batch_is_the_same_whatever_its_passes():
    """vaelab.model.vae.bounds decodes a batch in passes of PAIRS_PER_PASS (image, sample) pairs (the test stage's
    speed); the samples are drawn pass by pass in the order of one draw of all K, so the figures are the same bit for
    bit whatever the pass size (on the CPU, for batch x latent a multiple of 16, as every default run's)."""
    from vaelab.model.vae import bounds

    torch.manual_seed(0)
    vae = dense_vae(latent_dim=16, image_shape=(1, 6, 6)).vae.eval()
    images = torch.rand(50, 1, 6, 6)
    with torch.no_grad():
        mu, logvar = vae.encode(images)
        figures = [
            bounds(vae, images, mu, logvar, 10, pairs, torch.Generator().manual_seed(3))
            for pairs in (20000, 150, 1)  # samples a pass: all 10; 3, 3, 3 and 1; one
        ]
    for other in figures[1:]:
        assert all(torch.equal(figures[0][key], other[key]) for key in ("recon", "kl", "nll_iwae"))


def test_vaelab_eval_figures_are_those_of_one_pass_a_chunk():
    """likelihood (vaelab-eval's bounds) chunks the images by pairs_per_pass and decodes each chunk in smaller passes:
    the figures are those of decoding each chunk at once, bit for bit (the same draws in the same order)."""
    from vaelab.model.vae import bounds

    torch.manual_seed(0)
    vae = dense_vae(latent_dim=16, image_shape=(1, 6, 6)).vae.eval()
    images = torch.rand(300, 1, 6, 6)
    out = likelihood(vae, images, 100, pairs_per_pass=20000, generator=torch.Generator().manual_seed(5))
    generator, by_chunk = torch.Generator().manual_seed(5), []
    with torch.no_grad():
        for x in images.split(200):  # 20,000 pairs // K = 100: chunks of 200 images, each decoded at once
            mu, logvar = vae.encode(x)
            by_chunk.append(bounds(vae, x, mu, logvar, 100, 10**9, generator)["nll_iwae"])
    assert torch.equal(out["nll_iwae"], torch.cat(by_chunk))


def test_iwae_converges_to_the_likelihood_by_quadrature():
    # One pixel, one latent: p(x) = int Bern(x | sigmoid(w z + b)) N(z; 0, 1) dz by quadrature, with a posterior
    # q = N(0.3, e^0.5) that is not the prior (wider, so the weights have finite variance).
    w, b, x = 2.0, -0.5, 0.8
    mu, logvar = 0.3, 0.5
    vae = tiny_vae(1, (1, 1, 1), [mu, logvar], [[w]], [b])
    z = np.linspace(-12, 12, 200_001)
    log_lik = x * -np.logaddexp(0, -(w * z + b)) + (1 - x) * -np.logaddexp(0, w * z + b)
    prior = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    q = np.exp(-0.5 * (z - mu) ** 2 / math.exp(logvar)) / math.sqrt(2 * math.pi * math.exp(logvar))
    nll_exact = -math.log(np.trapezoid(np.exp(log_lik) * prior, z))
    recon_exact = -np.trapezoid(log_lik * q, z)
    kl_exact = 0.5 * (mu**2 + math.exp(logvar) - 1 - logvar)

    out = likelihood(
        vae, torch.full((2, 1, 1, 1), x), num_samples=50_000, pairs_per_pass=20_000, generator=torch.Generator().manual_seed(0)
    )
    assert out["nll_iwae"].tolist() == pytest.approx([nll_exact] * 2, abs=2e-3)
    assert out["recon"].tolist() == pytest.approx([recon_exact] * 2, abs=1e-2)
    assert out["kl"].tolist() == pytest.approx([kl_exact] * 2, rel=1e-5)
    # the ELBO's gap is KL(q || p(z|x)) > 0: well above the estimator's error here
    assert recon_exact + kl_exact - nll_exact > 0.05


def test_a_notebook_objective_model_is_evaluated_under_the_proper_posterior_and_says_so():
    # q(z|x) = N(0, e^-1) with exp(logvar) as the variance, not the notebook's sampling std 0.1 * exp(logvar)
    vae = tiny_vae(2, (1, 2, 2), [0.0, 0.0, -1.0, -1.0], torch.zeros(4, 2), torch.zeros(4), objective="notebook")
    cfg = OmegaConf.create(
        {
            "ckpt_path": "nb.ckpt",
            "data": {"dataset": "FashionMNIST"},
            "num_importance_samples": 5,
            "pairs_per_pass": 100,
            "batch_size": 10,
            "noise_levels": [0.0],
            "active_unit_threshold": 0.01,
            "seed": 0,
        }
    )
    result = evaluate(vae, torch.rand(3, 1, 2, 2), cfg, torch.device("cpu"))
    assert result["posterior"] == "N(mu, exp(logvar))" and result["model"]["objective"] == "notebook"
    assert any("objective=notebook" in note and "N(mu, exp(logvar))" in note for note in result["notes"])
    assert result["kl"] == pytest.approx(0.5 * 2 * (math.exp(-1.0) - 1 + 1), rel=1e-6)
    assert result["recon"] == pytest.approx(4 * math.log(2), rel=1e-6)  # logits 0: every pixel costs ln 2 whatever z is
    assert result["neg_elbo"] == pytest.approx(4 * math.log(2) + math.exp(-1.0), rel=1e-6)


def test_active_units_count_posterior_mean_variance_above_threshold():
    torch.manual_seed(0)
    spread = torch.tensor([0.0, 0.05, 0.2, 1.0])  # variances 0, 0.0025, 0.04, 1
    mu = torch.randn(20_000, 4) * spread
    assert active_units(mu, threshold=0.01) == 2
    assert active_units(mu, threshold=0.001) == 3


def test_iwae_is_below_the_negative_elbo_and_tightens_with_k(trained):
    models, images = trained
    vae, x = models["plain"], images[:200]
    by_k = {k: likelihood(vae, x, num_samples=k, generator=torch.Generator().manual_seed(0)) for k in (1, 10, 100)}
    nll = {k: out["nll_iwae"].mean().item() for k, out in by_k.items()}
    neg_elbo = by_k[100]["neg_elbo"].mean().item()
    # K = 1 is the ELBO itself, up to sampling noise (~1 nat here: the KL is sampled, there exact); a wrong
    # log K or log q would be off by the KL (tens of nats)
    assert nll[1] == pytest.approx(neg_elbo, rel=1e-2)
    assert nll[100] < nll[10] < nll[1]
    assert nll[10] <= neg_elbo and nll[100] <= neg_elbo
    assert 0 < active_units(by_k[100]["mu"]) <= 16


def test_denoising_training_reduces_noisy_input_error(trained):
    models, images = trained
    errors = {
        name: noisy_input_errors(vae, images, [0.0, 0.3], generator=torch.Generator().manual_seed(0))
        for name, vae in models.items()
    }
    plain = {row["noise_level"]: row for row in errors["plain"]}
    denoise = {row["noise_level"]: row for row in errors["denoise"]}
    # the notebook's weakness: noise makes the plain model's reconstructions worse ...
    assert plain[0.3]["recon_nats"] > plain[0.0]["recon_nats"] + 5
    # ... and the denoising model, trained on that noise against clean targets, does clearly better on it
    assert denoise[0.3]["recon_nats"] < plain[0.3]["recon_nats"] - 5
    assert denoise[0.3]["mse"] < plain[0.3]["mse"]
    # noise level 0 is the plain reconstruction of the posterior mean
    vae = models["plain"]
    with torch.no_grad():
        clean = bernoulli_nll(vae.decode(vae.encode(images)[0]), images).mean().item()
    assert plain[0.0]["recon_nats"] == pytest.approx(clean, rel=1e-5)


@pytest.mark.slow  # 12 s: K = 5000 over 80 images
def test_memory_stays_flat_over_many_images_at_large_k():
    """K = 5000 decodes 20,000 (image, sample) pairs a pass; the per-image results are written into tensors allocated
    once. (Kept as small tensors per chunk, they pinned freed activations in glibc's heap: with the fmnist_density
    preset's MLP, resident memory grew ~7.5 MB per image and the OOM killer stopped vaelab-eval on the 10,000 test
    images; here the old code grew 549 MiB over 160 images, 3.4 MiB an image: past 150 MiB by 45 images.)"""
    from vaelab.data.mnist import MNISTLike
    from vaelab.model.networks import DenseEncoder

    def resident_mib() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    data = MNISTLike(data_dir=str(DATA_DIR), system_dir=SYSTEM_DIR, binarize="dynamic")
    data.setup()
    torch.manual_seed(0)
    vae = dense_vae(latent_dim=40, image_shape=(1, 28, 28)).vae.eval()
    vae.encoder = DenseEncoder(40, (1, 28, 28), hidden=(300, 300))  # the fmnist_density preset's networks
    vae.decoder = DenseDecoder(40, (1, 28, 28), hidden=(300, 300))
    images = data.test_set[0][:80]
    generator = torch.Generator().manual_seed(0)
    likelihood(vae, images[:8], 5000, generator=generator)  # the allocator's steady state
    before = resident_mib()
    result = likelihood(vae, images, 5000, generator=generator)
    grown = resident_mib() - before
    assert result["nll_iwae"].shape == (80,) and torch.isfinite(result["nll_iwae"]).all()
    assert grown < 150, f"resident memory grew {grown:.0f} MiB over 80 images"


@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory):
    """The classifier of the Fréchet distance, trained on 3,000 training images for 2 epochs (test accuracy about
    0.74; the real one, all 60,000 for 3 epochs, 0.895), and the Fashion-MNIST data module."""
    from vaelab.data.mnist import MNISTLike
    from vaelab.evaluation.classifier import load_or_train_classifier

    datamodule = MNISTLike(data_dir=str(DATA_DIR), system_dir=SYSTEM_DIR)
    model, _ = load_or_train_classifier(datamodule, epochs=2, train_size=3000, cache_dir=tmp_path_factory.mktemp("classifier"))
    return model, datamodule


@pytest.mark.slow  # 10 s: trains its classifier
def test_frechet_distance_floor_trained_untrained_and_seeded(trained, small_classifier):
    from vaelab.evaluation.measures import frechet_distances, prior_samples

    models, _ = trained
    classifier, datamodule = small_classifier
    n = 1000
    real, train = datamodule.test_set[0][:n], datamodule.train_set[0][:n]
    torch.manual_seed(0)
    untrained = dense_vae(latent_dim=16, image_shape=(1, 28, 28)).vae.eval()

    def samples(vae, seed):
        return prior_samples(vae, n, generator=torch.Generator().manual_seed(seed))

    fid = frechet_distances(
        classifier,
        real,
        {
            "floor": train,
            "trained": samples(models["plain"], 0),
            "again": samples(models["plain"], 0),
            "other_seed": samples(models["plain"], 1),
            "untrained": samples(untrained, 0),
        },
    )
    # Measured: floor 0.51, trained 273, untrained 377. The untrained decoder draws near-constant grey images (the
    # FID of one constant image is about the real features' mean distance plus their total variance); 150 steps of
    # batch 64 already bring the samples far below it, and the default model (10 epochs) reaches 225-228 against its
    # untrained twin's 480 (5,000 and 10,000 samples, the full classifier).
    assert fid["floor"] < 0.01 * fid["trained"]
    assert fid["trained"] < 0.8 * fid["untrained"] and fid["untrained"] - fid["trained"] > 50
    assert fid["again"] == fid["trained"] and fid["other_seed"] != fid["trained"]
