"""The Lightning module (vaelab.training.module.VAEModule) built from every model config: the plain VAE's interface
through it, its hyperparameters, validation's per-image means, conditional models, the KL warm-up."""

import math

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import dense_vae
from vaelab.data.tensors import TensorBatches
from vaelab.model.vae import add_noise
from vaelab.training.module import VAEModule


@pytest.mark.parametrize("model", ["dense", "mlp", "conv"])
@pytest.mark.parametrize("latent_dim", [2, 16])
def test_every_model_has_the_interface(compose, model, latent_dim):
    cfg = compose([f"model={model}", f"latent_dim={latent_dim}"])
    module: VAEModule = instantiate(cfg.model)
    vae = module.vae  # the plain torch.nn.Module the module trains
    assert isinstance(module, VAEModule) and vae.latent_dim == latent_dim and vae.settings["name"] == model
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
    assert {name for name, _ in module.named_parameters()} == {f"vae.{name}" for name, _ in vae.named_parameters()}


def test_notebook_sampling_uses_exp_log_sigma_and_small_eps(compose):
    cfg = compose(["experiment=notebook"])
    vae = instantiate(cfg.model).vae
    mu = torch.zeros(20000, 1)
    log_sigma = torch.full((20000, 1), math.log(2.0))
    z = vae.reparameterize(mu, log_sigma)
    assert z.std().item() == pytest.approx(2.0 * 0.1, rel=0.05)  # exp(log_sigma) * N(0, 0.1^2)
    cfg = compose([])
    z = instantiate(cfg.model).vae.reparameterize(mu, log_sigma)
    assert z.std().item() == pytest.approx(math.sqrt(2.0), rel=0.05)  # exp(logvar / 2) * N(0, 1)


def test_checkpoint_hparams_are_plain(compose):
    module = instantiate(compose([]).model)
    assert type(module.hparams["encoder"]) is dict and type(module.hparams["optimizer"]) is dict
    assert module.vae.settings == dict(module.hparams)  # the plain VAE keeps what it was built from


def test_unknown_objective_is_refused(compose):
    with pytest.raises(InstantiationException, match="model.objective='mse'"):
        instantiate(compose(["model.objective=mse"]).model)


def test_a_nan_batch_reaches_the_validation_mean(compose):
    """The per-image means keep a NaN (torchmetrics would drop it by default): the guard then stops the run."""
    module = instantiate(compose(["latent_dim=2"]).model)
    x = torch.rand(4, 1, 28, 28)
    module._eval_step(x, "val")
    module.eval_means["val_loss"].update(torch.tensor(float("nan")), weight=4)
    assert torch.isnan(module.eval_means["val_loss"].compute())


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.mark.parametrize("model", ["dense", "mlp", "conv"])
def test_every_model_can_be_conditional_with_labels_through_every_figure(compose, model):
    """model.conditional=true: the labels reach the loss, the IWAE bound and the samples, and change them; the class
    names are plain hyperparameters (what a checkpoint rebuilds the networks from)."""
    from vaelab.model.vae import bounds

    module = instantiate(compose([f"model={model}", "latent_dim=4", "model.conditional=true"]).model, class_names=FASHION)
    vae = module.vae
    assert vae.conditional and vae.num_classes == 10 and module.hparams["class_names"] == FASHION
    assert type(module.hparams["class_names"]) is list and vae.class_names == FASHION
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
    module._eval_step(x, "val", y)  # validation and test take the batch's labels


def test_a_conditional_model_without_class_names_is_refused(compose):
    with pytest.raises(InstantiationException, match="needs class_names"):
        instantiate(compose(["model.conditional=true"]).model)


def test_the_default_model_is_unconditional_and_ignores_labels(compose):
    module = instantiate(compose(["latent_dim=2"]).model)
    vae = module.vae
    assert not vae.conditional and module.hparams["conditional"] is False and module.hparams["class_names"] is None
    assert vae.class_names is None and vae.num_classes == 0
    assert vae.encoder.num_classes == 0 and vae.decoder.num_classes == 0
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(vae.encode(x, torch.tensor([1, 2, 3]))[0], vae.encode(x)[0])


# --- the KL warm-up -----------------------------------------------------------------------------


class RecordWeight(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, pl_module.kl_weight()))


def test_kl_warm_up_rises_linearly_to_beta_and_never_reaches_the_reported_figures(tmp_path):
    model = dense_vae(beta=2.0, kl_warmup_epochs=2)
    x = torch.rand(40, 1, 4, 4)
    data = lambda: TensorBatches(x, torch.zeros(40), batch_size=10, shuffle=False)  # noqa: E731
    recorder = RecordWeight()
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=data(), val_dataloaders=data())
    expected = [2.0 * min(1.0, (epoch + batch / 4) / 2) for epoch in range(3) for batch in range(4)]
    assert [w for _, _, w in recorder.seen] == pytest.approx(expected)
    assert expected[0] == 0 and expected[5] == pytest.approx(1.25) and expected[-1] == 2.0
    # validation reports the true objective at beta = 2 (what the best checkpoint is chosen by), not the warmed-up one
    metrics = trainer.callback_metrics
    assert metrics["val/loss"].item() == pytest.approx((metrics["val/recon"] + 2.0 * metrics["val/kl"]).item(), rel=1e-5)
    assert metrics["val/nelbo"].item() == pytest.approx((metrics["val/recon"] + metrics["val/kl"]).item(), rel=1e-5)
    # the progress bar shows the validation loss (train/loss too, once a window of log_every_n_steps steps is done)
    assert trainer.progress_bar_metrics == {"val/loss": pytest.approx(metrics["val/loss"].item())}


# --- a training step: the plain VAE's objective with the module's settings -----------------------------------

STEP_SETTINGS = {  # the module's settings -> the same objective asked of the plain VAE directly
    "free bits": ({"free_bits": 0.5}, lambda vae, x: vae.training_loss(x, x, free_bits=0.5)),
    "iwae": ({"objective": "iwae", "num_samples": 7}, lambda vae, x: vae.training_loss(x, x, num_samples=7)),
    "denoising": ({"denoise": True, "noise_factor": 0.3}, lambda vae, x: vae.training_loss(add_noise(x, 0.3), x)),
}


@pytest.mark.parametrize("case", list(STEP_SETTINGS))
def test_a_training_step_asks_the_vae_for_the_objective_of_the_modules_settings(tmp_path, case):
    settings, by_hand = STEP_SETTINGS[case]
    torch.manual_seed(0)
    module = dense_vae(**settings)
    quiet = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # clipping at a norm never reached: Lightning's automatic optimisation, so training_step only computes the loss
    module.trainer = pl.Trainer(logger=False, log_every_n_steps=50, gradient_clip_val=1e9, default_root_dir=tmp_path, **quiet)
    x = torch.bernoulli(torch.rand(8, 1, 4, 4))
    torch.manual_seed(1)
    step = module.training_step(iter([((x, torch.zeros(8, dtype=torch.long)), 0, 0)]))["loss"]  # Lightning's batch iterator
    torch.manual_seed(1)
    direct = by_hand(module.vae, x)
    torch.manual_seed(1)
    plain = module.vae.training_loss(x, x)  # the setting matters: without it the loss is another number
    assert step.item() == pytest.approx(direct.item(), rel=1e-6)
    assert step.item() != pytest.approx(plain.item(), rel=1e-3)


# --- manual optimisation: the same steps as Lightning's automatic one ------------------------------------------


def fit_twelve_steps(tmp_path, **trainer_settings):
    torch.manual_seed(0)
    module = dense_vae(kl_warmup_epochs=1)
    x = torch.bernoulli(torch.rand(48, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    data = TensorBatches(x, torch.zeros(48), batch_size=8, shuffle=True)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=4, default_root_dir=tmp_path, **quiet, **trainer_settings)
    trainer.fit(module, train_dataloaders=data)
    return module, trainer


def test_manual_optimisation_makes_the_steps_of_lightnings_automatic_one(tmp_path):
    manual, trainer = fit_twelve_steps(tmp_path)
    automatic, clipping = fit_twelve_steps(tmp_path, gradient_clip_val=1e9)  # clipping never reached: automatic
    assert not manual.automatic_optimization and automatic.automatic_optimization
    assert trainer.global_step == clipping.global_step == 12
    for mine, lightnings in zip(manual.parameters(), automatic.parameters(), strict=True):
        torch.testing.assert_close(mine, lightnings, rtol=0, atol=0)
    assert trainer.callback_metrics["train/loss"].item() == clipping.callback_metrics["train/loss"].item()
    torch.manual_seed(0)
    assert not torch.equal(manual.vae.encoder.heads.weight, dense_vae().vae.encoder.heads.weight)  # it trained


@pytest.mark.parametrize("written_under", ["automatic", "manual"])
def test_a_checkpoint_keeps_its_step_count_under_either_optimisation(written_under):
    done = {"total": {"ready": 10, "completed": 10}, "current": {"ready": 5, "completed": 5}}
    none = {"total": {"ready": 0, "completed": 0}, "current": {"ready": 0, "completed": 0}}
    automatic, manual = (done, none) if written_under == "automatic" else (none, done)
    loop = {
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {"step": automatic, "zero_grad": {}}},
        "epoch_loop.manual_optimization.optim_step_progress": manual,
    }
    checkpoint = {"state_dict": {}, "loops": {"fit_loop": loop}}
    dense_vae().on_load_checkpoint(checkpoint)
    assert loop["epoch_loop.manual_optimization.optim_step_progress"] == done
    assert loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] == done


class GradientNorms(pl.Callback):
    """The gradients' total norm each optimizer step used (after Lightning's clipping; read once the step is made,
    since under automatic optimisation the step computes them itself)."""

    def __init__(self):
        self.norms = []

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        trainer.optimizers[0].register_step_post_hook(record)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_trains_with_the_fused_optimizer_of_the_configs(tmp_path, precision):
    """conf/model/*.yaml ask for a fused Adam, which Lightning refuses to clip under mixed precision: a run that clips
    gets the per-tensor Adam (the same update) and its steps see clipped gradients."""
    x = torch.bernoulli(torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    for clip in (None, 0.01):
        torch.manual_seed(0)
        module, norms = dense_vae(), GradientNorms()
        module.hparams.optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2, "fused": True}
        trainer = pl.Trainer(
            max_steps=3, precision=precision, gradient_clip_val=clip, callbacks=[norms], default_root_dir=tmp_path, **quiet
        )
        trainer.fit(module, train_dataloaders=TensorBatches(x, torch.zeros(16), batch_size=8, shuffle=False))
        assert trainer.global_step == 3 and module.automatic_optimization == (clip is not None)
        assert trainer.optimizers[0].defaults["fused"] == (clip is None) and len(norms.norms) == 3
        if clip is None:
            assert min(norms.norms) > 1.0  # what clipping at 0.01 has to bring down
        else:
            assert max(norms.norms) <= clip * 1.001
