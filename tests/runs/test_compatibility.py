"""A run made by vaelab at 4c48284 (before the redesign: flat modules, the LightningModule as the VAE, its weights at
the top level of the checkpoint) still loads, evaluates, generates and resumes. tests/fixtures/run-4c48284 was made by
that commit's vaelab-train (mlp 784-16-4, 2 epochs of 5 batches of 32, noise_factor 0.2): its checkpoints, saved
config (.hydra/), metrics.json and train.log."""

from __future__ import annotations

import json
import shutil

import torch

from conftest import REPO, read_metrics, run_cli
from vaelab.model.vae import VAE
from vaelab.runs.checkpoints import load_vae, read_checkpoint
from vaelab.runs.renames import RENAMED, current_name

FIXTURE = REPO / "tests" / "fixtures" / "run-4c48284"
CHECKPOINT = FIXTURE / "checkpoints" / "last.ckpt"


def test_the_fixture_is_of_the_old_format():
    raw = torch.load(CHECKPOINT, weights_only=True)
    assert raw["hyper_parameters"]["encoder"]["_target_"] == "vaelab.networks.DenseEncoder"
    assert sorted(raw["state_dict"])[0] == "decoder.body.0.bias"  # weights at the top level, not under vae.
    assert "_target_: vaelab.module.VAE" in (FIXTURE / ".hydra" / "config.yaml").read_text()


def test_an_old_checkpoint_loads_as_the_plain_vae_with_its_own_weights():
    vae = load_vae(CHECKPOINT)
    raw = torch.load(CHECKPOINT, weights_only=True)["state_dict"]
    assert isinstance(vae, VAE) and vae.latent_dim == 4 and not vae.training
    assert type(vae.encoder).__module__ == "vaelab.model.networks"
    for name, tensor in vae.state_dict().items():
        assert torch.equal(tensor, raw[name]), name
    assert vae.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)


def test_old_class_names_are_read_through_one_table():
    hparams = read_checkpoint(CHECKPOINT, "ckpt_path")["hyper_parameters"]
    assert hparams["encoder"]["_target_"] == "vaelab.model.networks.DenseEncoder"
    assert current_name("vaelab.module.VAE") == "vaelab.training.module.VAEModule"
    assert current_name("vaelab.callbacks.Samples") == "vaelab.pictures.grids.Samples"
    assert current_name("mypkg.nets.Encoder") == "mypkg.nets.Encoder"  # a user's own class keeps its name
    from hydra.utils import get_class

    for new in RENAMED.values():  # every name the table gives exists
        assert isinstance(get_class(new), type), new


def test_an_old_checkpoint_evaluates_and_generates(tmp_path):
    run_cli(
        f"ckpt_path={CHECKPOINT}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        "num_images=200",
        "linear_probe.enabled=false",
        "frechet.enabled=false",
        tool="vaelab-eval",
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"]["latent_dim"] == 4 and result["model"]["name"] == "mlp" and result["num_images"] == 200
    assert result["nll_iwae"] <= result["neg_elbo"] < 600  # the trained weights, not fresh ones (~545 nats)
    run_cli(f"ckpt_path={CHECKPOINT}", f"hydra.run.dir={tmp_path / 'gen'}", "interpolate=true", tool="vaelab-generate")
    assert (tmp_path / "gen" / "samples.png").stat().st_size > 0 and (tmp_path / "gen" / "interpolation.png").exists()


def test_an_old_run_resumes_in_place(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    before = read_metrics(run)
    proc = run_cli(str(run), "epochs=3", "~callbacks.progress_bar", tool="vaelab-resume")
    assert "Restoring states from the checkpoint path" in proc.stdout + proc.stderr
    after = read_metrics(run)
    assert after["val/loss"] < before["val/loss"]  # a third epoch trained on from the old weights
    new = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert new["epoch"] == 2 and all(key.startswith("vae.") for key in new["state_dict"])
    assert new["global_step"] == 15  # written under automatic optimisation, its 10 steps counted on under manual
    assert new["hyper_parameters"]["encoder"]["_target_"] == "vaelab.model.networks.DenseEncoder"
