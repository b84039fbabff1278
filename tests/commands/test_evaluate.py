"""vaelab-eval from the shell: its figures, its notes, the data prepared as the checkpoint was trained, colour
folders and conditional models (the bounds themselves, in-process: tests/evaluation/test_bounds.py)."""

import json
import math
import re

import pytest
import torch
from PIL import Image

from conftest import DATA_DIR, read_metrics, run_cli
from vaelab.data.mnist import MNISTLike
from vaelab.evaluation.bounds import likelihood

# The linear probe and the Fréchet distance on few images (the eval defaults: all 60,000 training images, and a
# classifier trained on them for 3 epochs, about 50 s once).
QUICK_MEASURES = [
    "linear_probe.train_images=2000",
    "frechet.num_samples=1000",
    "classifier.train_images=3000",
    "classifier.epochs=2",
]


def test_vaelab_eval_from_the_shell(tmp_path, trained_run):
    best = next((trained_run / "checkpoints").glob("best-epoch*.ckpt"))
    proc = run_cli(
        f"ckpt_path={best}",
        f"paths.root_dir={tmp_path}",
        "num_images=256",
        "threads=1",  # as in every command (vaelab-eval refused it: there was no such setting)
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
    # each phase said when it started and how long it took (stderr is no terminal here: lines, not a live bar)
    said = re.sub(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ", "", proc.stdout, flags=re.MULTILINE)
    for phase, amount in [
        ("IWAE bound (K = 20)", "256 images"),
        ("noisy inputs (3 noise levels)", "768 images"),
        ("linear probe (2,000 training images)", "3 steps"),
        ("Fréchet feature classifier", "48 batches"),  # 2 epochs of 3,000 images in batches of 128
        ("Fréchet distance (256 images a side)", "6 steps"),
    ]:
        assert f"\n{phase}: {amount} ...\n" in said and re.search(rf"\n{re.escape(phase)}: done in \d+\.\d s\n", said), phase
    # the classifier, trained once: where its cache goes, and how long it takes, timed on its first batches
    cache = next((tmp_path / "classifier").glob("FashionMNIST-1x28x28-*.pt"))
    assert (
        f"trained now, once (2 epochs over 3,000 images; an estimate of the time follows its first batches), and cached in {cache}"
        in said
    )
    assert re.search(r"\nFréchet feature classifier: about \d+ (s|min) in all \(timed on its first 10 of 48 batches\)\n", said)


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
