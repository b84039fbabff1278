"""Every config group and preset composes, and the headline settings reach the parts."""

import pytest
from hydra.utils import instantiate

CONF_GROUPS = {
    "data": [
        "fashion_mnist",
        "mnist",
        "kmnist",
        "cifar10",
        "cifar100",
        "svhn",
    ],  # image_folder, torchvision: test_image_folder, test_torchvision_data
    "model": ["dense", "mlp", "conv"],
    "trainer": ["cpu", "gpu", "ddp"],
    "experiment": ["notebook", "latent2", "conv32"],
}


def test_defaults(compose):
    cfg = compose([])
    assert (cfg.latent_dim, cfg.epochs, cfg.noise_factor, cfg.batch_size, cfg.lr, cfg.beta) == (256, 10, 0.1, 128, 1e-3, 1.0)
    assert cfg.model.name == "dense" and cfg.data.dataset == "FashionMNIST" and cfg.trainer.accelerator == "cpu"


def test_headline_settings_reach_the_parts(compose):
    cfg = compose(["latent_dim=16", "epochs=5", "noise_factor=0.3", "batch_size=32", "lr=0.01", "seed=7", "beta=2"])
    assert cfg.model.latent_dim == cfg.model.encoder.latent_dim == cfg.model.decoder.latent_dim == 16
    assert cfg.trainer.max_epochs == 5
    assert cfg.model.noise_factor == 0.3
    assert cfg.data.batch_size == 32 and cfg.data.seed == 7
    assert cfg.model.optimizer.lr == 0.01 and cfg.model.beta == 2


def test_nested_forms_work(compose):
    cfg = compose(["model.latent_dim=16", "trainer.max_epochs=5"])
    assert cfg.model.encoder.latent_dim == cfg.model.decoder.latent_dim == 16
    assert cfg.trainer.max_epochs == 5


@pytest.mark.parametrize("group,choice", [(g, c) for g, cs in CONF_GROUPS.items() for c in cs])
def test_every_choice_composes_and_builds(compose, group, choice):
    cfg = compose([f"{group}={choice}"])
    instantiate(cfg.model)
    instantiate(cfg.data)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


def test_notebook_preset_is_the_notebook(compose):
    cfg = compose(["experiment=notebook"])
    assert cfg.model.name == "dense" and cfg.model.objective == "notebook" and cfg.model.epsilon_std == 0.1
    assert (
        cfg.model.latent_dim,
        cfg.trainer.max_epochs,
        cfg.data.batch_size,
        cfg.model.optimizer.lr,
        cfg.model.noise_factor,
    ) == (256, 10, 32, 1e-3, 0.1)


def test_ddp_trainer_builds_on_cpu(compose):
    cfg = compose(["trainer=ddp"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.world_size == 2


def test_the_density_estimation_preset_is_the_published_setting(compose):
    cfg = compose(["experiment=fmnist_density"])
    assert cfg.data.binarize == "dynamic" and cfg.model.name == "mlp" and cfg.model.likelihood == "bernoulli"
    assert list(cfg.model.encoder.hidden) == [300, 300] and list(cfg.model.decoder.hidden) == [300, 300]
    assert (cfg.model.latent_dim, cfg.data.batch_size, cfg.model.optimizer.lr, cfg.trainer.max_epochs) == (40, 100, 5e-4, 2000)
    assert cfg.model.kl_warmup_epochs == 100 and cfg.model.binarize == "dynamic"
    stop = cfg.callbacks.early_stopping
    assert stop._target_.endswith("EarlyStopping") and (stop.monitor, stop.mode, stop.patience) == ("val/loss", "min", 50)
