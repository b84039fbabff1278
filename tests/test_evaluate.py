"""vaelab-eval: the IWAE estimate against hand and quadrature computations and against the ELBO on a trained
model, the denoising VAE against a plain one, and the CLI from the shell."""

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import DATA_DIR, REPO, dense_vae, read_metrics, run_cli
from vaelab.commands.evaluate import active_units, evaluate, likelihood, noisy_input_errors
from vaelab.data.mnist import MNISTLike
from vaelab.model.networks import DenseDecoder
from vaelab.model.vae import VAE, bernoulli_nll

# The linear probe and the Fréchet distance on few images (the eval defaults: all 60,000 training images, and a
# classifier trained on them for 3 epochs, about 50 s once).
QUICK_MEASURES = [
    "linear_probe.train_images=2000",
    "frechet.num_samples=1000",
    "classifier.train_images=3000",
    "classifier.epochs=2",
]
TRAIN_STEPS = 150  # batches of 64: enough for the denoising effect to stand far above the noise (~20 nats at 0.3)


def tiny_vae(latent_dim: int, image_shape, enc_bias, dec_weight, dec_bias, objective: str = "elbo") -> VAE:
    """A dense VAE with hand-set weights: the encoder ignores x (mu, logvar = enc_bias), the decoder's logits
    are dec_weight @ z + dec_bias."""
    vae = VAE(
        encoder={"_target_": "vaelab.model.networks.DenseEncoder", "latent_dim": latent_dim, "image_shape": image_shape},
        decoder={"_target_": "vaelab.model.networks.DenseDecoder", "latent_dim": latent_dim, "image_shape": image_shape},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True},
        latent_dim=latent_dim,
        objective=objective,
    )
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
            datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
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
            trainer.fit(model, datamodule=datamodule)
            models["denoise" if denoise else "plain"] = model.eval()
    return models, datamodule.test_set[0][:500]


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


def test_vaelab_eval_from_the_shell(tmp_path, trained_run):
    best = next((trained_run / "checkpoints").glob("best-epoch*.ckpt"))
    proc = run_cli(
        f"ckpt_path={best}",
        f"paths.root_dir={tmp_path}",
        "num_images=256",
        "num_importance_samples=20",
        "noise_levels=[0,0.1,0.3]",
        *QUICK_MEASURES,
        f"classifier.cache_dir={tmp_path / 'classifier'}",
        tool="vaelab-eval",
    )
    [run_dir] = list((tmp_path / "outputs" / "eval").glob("*/*"))  # its own run directory: outputs/eval/<date>/<time>
    result = json.loads((run_dir / "eval.json").read_text())
    for key in [
        "neg_elbo",
        "recon",
        "kl",
        "nll_iwae",
        "active_units",
        "noisy_inputs",
        "num_importance_samples",
        "posterior",
        "model",
    ]:
        assert key in result
    assert result["num_images"] == 256 and result["num_importance_samples"] == 20 and result["dataset"] == "FashionMNIST"
    assert result["model"]["latent_dim"] == 16 and result["model"]["objective"] == "elbo"
    assert result["neg_elbo"] == pytest.approx(result["recon"] + result["kl"], rel=1e-9)
    assert 0 < result["nll_iwae"] <= result["neg_elbo"]
    assert 0 <= result["active_units"] <= 16
    assert [r["noise_level"] for r in result["noisy_inputs"]] == [0.0, 0.1, 0.3]
    assert all(r["recon_nats"] > 0 and 0 < r["mse"] < 1 for r in result["noisy_inputs"])
    # the same checkpoint and test images as vaelab-train's test step (4 batches of 64): the same negative ELBO,
    # up to its one-sample reconstruction noise
    assert result["neg_elbo"] == pytest.approx(read_metrics(trained_run)["test/loss"], rel=5e-3)
    with Image.open(run_dir / "noise_error.png") as png:
        assert png.size == (1000, 400)
    assert "-log p(x) IWAE" in proc.stdout + proc.stderr and (run_dir / "eval.log").exists()
    # the linear probe of the posterior means beside the raw pixels' and chance (2 epochs of 20 batches of 64: the
    # code keeps much of the class information already; measured 0.76 against the pixels' 0.80, chance 0.14)
    probe = result["linear_probe"]
    assert probe["train_images"] == 2000 and probe["test_images"] == 256 and probe["max_iter"] == 100
    test_labels = MNISTLike(data_dir=str(DATA_DIR), system_dir="/usr/share/datasets/fashion-mnist").load()[2][1][:256]
    assert probe["chance"] == torch.bincount(test_labels).max().item() / 256  # the most common class's share
    assert result["linear_probe_accuracy"] > probe["chance"] + 0.3 and probe["raw_pixels_accuracy"] > probe["chance"] + 0.3
    # the Fréchet distance of prior samples, the reconstructions and the training images (the floor)
    frechet = result["frechet"]
    assert frechet["num_samples"] == 256 and frechet["classifier_train_images"] == 3000
    assert frechet["classifier_test_accuracy"] > 0.65 and frechet["seconds"] > 0
    # measured: samples 358, reconstructions 334 (40 steps of training), training images 5.2 (256 images a side)
    assert frechet["train_vs_test"] < 0.1 * min(frechet["reconstructions"], result["frechet_distance"])
    assert "linear probe" in proc.stdout + proc.stderr and "Fréchet dist." in proc.stdout + proc.stderr


def test_vaelab_eval_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    proc = run_cli(f"ckpt_path={missing}", f"paths.root_dir={tmp_path}", tool="vaelab-eval", check=False)
    assert proc.returncode != 0
    assert (
        proc.stderr.strip() == f"vaelab-eval: error: checkpoint {missing} not found; "
        "pass ckpt_path=<run dir>/checkpoints/last.ckpt (or best-epochNNN.ckpt) from a vaelab-train run"
    )
    assert not list(tmp_path.rglob("eval.json"))


def test_vaelab_eval_requires_ckpt_path(tmp_path):
    proc = run_cli(f"paths.root_dir={tmp_path}", tool="vaelab-eval", check=False)
    assert proc.returncode != 0 and "ckpt_path is required" in proc.stderr


def test_vaelab_eval_prepares_the_data_as_the_checkpoint_was_trained(tmp_path):
    run = tmp_path / "binary"
    from conftest import train_run

    train_run(run, "epochs=1", "latent_dim=8", "data.binarize=dynamic", "model.eval_iwae_samples=2")
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "num_images=200", "num_importance_samples=10", "noise_levels=[0]"]
    measures = [*QUICK_MEASURES, f"classifier.cache_dir={tmp_path / 'classifier'}"]
    proc = run_cli(*common, *measures, f"hydra.run.dir={tmp_path / 'as-trained'}", tool="vaelab-eval")
    result = json.loads((tmp_path / "as-trained" / "eval.json").read_text())
    # the probe sees binary images, as the model did; the classifier and the Fréchet distance's real side see grey levels
    assert result["linear_probe_accuracy"] > result["linear_probe"]["chance"] + 0.2
    assert result["frechet"]["train_vs_test"] < 0.1 * result["frechet_distance"]
    assert result["binarize"] == "dynamic" and result["likelihood"] == "bernoulli" and result["trained_binarize"] == "dynamic"
    assert result["data_preparation"] == "binarize=dynamic, as the model was trained (the checkpoint records it)"
    assert result["figures"] == result["notes"][0]
    printed = proc.stdout + proc.stderr
    assert "200 images, binarize=dynamic, as the model was trained (the checkpoint records it); nats/image:" in printed
    assert result["notes"][0] == "nats per image; bernoulli likelihood of the binarized pixels (binarize=dynamic)"
    assert not any("although the model was trained" in note for note in result["notes"])
    assert result["nll_iwae_bpd"] == pytest.approx(result["nll_iwae"] / (784 * math.log(2)))
    off = ["linear_probe.enabled=false", "frechet.enabled=false"]
    proc = run_cli(*common, *off, "data.binarize=none", f"hydra.run.dir={tmp_path / 'grey'}", tool="vaelab-eval")
    grey = json.loads((tmp_path / "grey" / "eval.json").read_text())
    assert grey["binarize"] == "none" and grey["notes"][0].startswith("nats per image; Bernoulli on grey levels, not a density")
    assert grey["figures"].startswith("nats per image; Bernoulli on grey levels, not a density")
    says = "binarize=none as asked, although the model was trained on binarize=dynamic"
    assert grey["data_preparation"] == says and grey["trained_binarize"] == "dynamic"
    assert f"200 images, {says}; nats/image:" in proc.stdout + proc.stderr
    assert "Bernoulli on grey levels, not a density" in proc.stdout + proc.stderr
    assert "evaluated on data.binarize=none as asked, although the model was trained on dynamic" in grey["notes"]
    # other test images: grey levels, not the fixed binary draws (their reconstruction error differs)
    assert grey["noisy_inputs"][0]["mse"] != pytest.approx(result["noisy_inputs"][0]["mse"], rel=1e-2)


def test_memory_stays_flat_over_many_images_at_large_k():
    """K = 5000 decodes 20,000 (image, sample) pairs a pass; the per-image results are written into tensors allocated
    once. (Kept as small tensors per chunk, they pinned freed activations in glibc's heap: with the fmnist_density
    preset's MLP, resident memory grew ~7.5 MB per image and the OOM killer stopped vaelab-eval on the 10,000 test
    images; here the old code grew 549 MiB over these 160 images.)"""
    from vaelab.data.mnist import MNISTLike
    from vaelab.model.networks import DenseEncoder

    def resident_mib() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    data = MNISTLike(data_dir=str(DATA_DIR), system_dir="/usr/share/datasets/fashion-mnist", binarize="dynamic")
    data.setup()
    torch.manual_seed(0)
    vae = dense_vae(latent_dim=40, image_shape=(1, 28, 28)).eval()
    vae.encoder = DenseEncoder(40, (1, 28, 28), hidden=(300, 300))  # the fmnist_density preset's networks
    vae.decoder = DenseDecoder(40, (1, 28, 28), hidden=(300, 300))
    images = data.test_set[0][:160]
    generator = torch.Generator().manual_seed(0)
    likelihood(vae, images[:8], 5000, generator=generator)  # the allocator's steady state
    before = resident_mib()
    result = likelihood(vae, images, 5000, generator=generator)
    grown = resident_mib() - before
    assert result["nll_iwae"].shape == (160,) and torch.isfinite(result["nll_iwae"]).all()
    assert grown < 150, f"resident memory grew {grown:.0f} MiB over 160 images"


def test_vaelab_eval_on_a_colour_image_folder_checkpoint(tmp_path, rgb_run):
    from conftest import one_line, rgb_data

    run, folder = rgb_run
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    classifiers = tmp_path / "classifier"
    run_cli(
        f"ckpt_path={ckpt}",
        *rgb_data(folder),
        "num_importance_samples=5",
        f"classifier.cache_dir={classifiers}",
        f"hydra.run.dir={out}",
        tool="vaelab-eval",
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["dataset"] == "ImageFolder" and result["num_images"] == 21  # the folder's 10% test split
    assert result["likelihood"] == "discretized_logistic" and result["model"]["name"] == "conv"
    assert math.isfinite(result["neg_elbo"]) and result["nll_iwae"] <= result["neg_elbo"] + 1.0
    assert result["neg_elbo_bpd"] == pytest.approx(result["neg_elbo"] / (3 * 32 * 32 * math.log(2)))  # D = 3072
    assert all(math.isfinite(r["mse"]) and 0 <= r["mse"] <= 1 for r in result["noisy_inputs"])
    with Image.open(out / "noise_error.png") as png:
        assert png.size == (1000, 400)
    # the probe and the Fréchet distance on the folder's own classes: its classifier is trained on its training split
    assert result["linear_probe"]["train_images"] == 189 and result["linear_probe"]["test_images"] == 21
    assert 0 <= result["linear_probe_accuracy"] <= 1 and math.isfinite(result["frechet_distance"])
    assert result["frechet"]["num_samples"] == 21 and result["frechet"]["classifier_train_images"] == 189
    [cached] = classifiers.glob("ImageFolder-3x32x32-*.pt")
    assert torch.load(cached, weights_only=True)["classes"] == sorted(["blue_triangles", "green_squares", "red_discs"])
    # the same checkpoint with the default data: one line naming the data it needs
    proc = run_cli(f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'wrong'}", tool="vaelab-eval", check=False)
    line = one_line(
        proc, "vaelab-eval: error: the checkpoint's model takes (3, 32, 32) images but data=FashionMNIST has (1, 28, 28)"
    )
    assert line.endswith("e.g. data=image_folder data.path=<dir> data.channels=3 data.image_size=32")


@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory):
    """The classifier of the Fréchet distance, trained on 3,000 training images for 2 epochs (test accuracy about
    0.74; the real one, all 60,000 for 3 epochs, 0.895), and the Fashion-MNIST data module."""
    from vaelab.data.mnist import MNISTLike
    from vaelab.evaluation.classifier import load_or_train_classifier

    datamodule = MNISTLike(data_dir=str(DATA_DIR), system_dir="/usr/share/datasets/fashion-mnist")
    model, _ = load_or_train_classifier(datamodule, epochs=2, train_size=3000, cache_dir=tmp_path_factory.mktemp("classifier"))
    return model, datamodule


def test_frechet_distance_floor_trained_untrained_and_seeded(trained, small_classifier):
    from vaelab.evaluation.measures import frechet_distances, prior_samples

    models, _ = trained
    classifier, datamodule = small_classifier
    n = 1000
    real, train = datamodule.test_set[0][:n], datamodule.train_set[0][:n]
    torch.manual_seed(0)
    untrained = dense_vae(latent_dim=16, image_shape=(1, 28, 28)).eval()

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


def test_vaelab_eval_conditions_a_conditional_model_on_the_true_labels_and_says_so(tmp_path, conditional_run):
    """eval.json and the summary say the figures are conditioned on the true test labels, and they are: the same
    images under the wrong labels are less likely."""
    from vaelab.data.mnist import MNISTLike
    from vaelab.runs.checkpoints import load_vae

    ckpt = conditional_run / "checkpoints" / "last.ckpt"
    proc = run_cli(
        f"ckpt_path={ckpt}",
        "num_images=200",
        "num_importance_samples=10",
        f"hydra.run.dir={tmp_path / 'eval'}",
        *QUICK_MEASURES,
        f"classifier.cache_dir={tmp_path / 'classifier'}",
        tool="vaelab-eval",
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["conditioned_on"] == "the true test labels" and result["model"]["conditional"] is True
    # the probe and the Fréchet distance give the conditional networks each image's label (they would refuse none)
    assert 0.1 < result["linear_probe_accuracy"] <= 1 and result["frechet_distance"] > 0
    said = "conditional VAE: every figure is conditioned on the true test labels"
    assert any(note.startswith(said) for note in result["notes"]) and said in proc.stdout + proc.stderr
    vae = load_vae(ckpt)
    datamodule = MNISTLike(data_dir=str(DATA_DIR))
    datamodule.setup("test")
    images, labels = (t[:200] for t in datamodule.test_set)
    with torch.no_grad():
        nll = {
            name: likelihood(vae, images, 10, generator=torch.Generator().manual_seed(0), labels=y)["nll_iwae"].mean().item()
            for name, y in (("true", labels), ("wrong", (labels + 5) % 10))
        }
    assert nll["true"] == pytest.approx(result["nll_iwae"], rel=1e-3)
    assert nll["wrong"] > nll["true"] + 5, nll
