"""Each command's settings, in-process: the range rules of vaelab.runs.settings and the structured configs' types
(the same cases from the shell: test_battery)."""

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from vaelab import CONF_DIR
from vaelab.errors import UserError, hydra_message
from vaelab.runs.settings import check

# (override, the line's start): every headline rule on both sides, and the nested forms named as typed.
BAD = [
    ("latent_dim=0", "latent_dim=0 is not allowed: latent_dim must be a positive integer, e.g. latent_dim=16"),
    ("latent_dim=-3", "latent_dim=-3 is not allowed"),
    ("epochs=0", "epochs=0 is not allowed: epochs must be a positive integer, e.g. epochs=10"),
    ("batch_size=-64", "batch_size=-64 is not allowed: batch_size must be a positive integer, e.g. batch_size=128"),
    ("noise_factor=1.5", "noise_factor=1.5 is not allowed: noise_factor must be a number in [0, 1], e.g. noise_factor=0.1"),
    ("noise_factor=-0.1", "noise_factor=-0.1 is not allowed"),
    ("noise_factor=nan", "noise_factor=nan is not allowed"),
    ("lr=0", "lr=0 is not allowed: lr must be a number > 0, e.g. lr=1e-3"),
    ("lr=-0.001", "lr=-0.001 is not allowed"),
    ("lr=inf", "lr=inf is not allowed"),
    ("beta=-1", "beta=-1 is not allowed: beta must be a number >= 0, e.g. beta=1.0"),
    ("threads=0", "threads=0 is not allowed: threads must be a positive integer or null"),
    ("model.latent_dim=0", "model.latent_dim=0 is not allowed: model.latent_dim must be a positive integer"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 is not allowed"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed"),
    ("model.noise_factor=2", "model.noise_factor=2 is not allowed"),
    ("model.optimizer.lr=0", "model.optimizer.lr=0 is not allowed"),
    ("model.beta=-0.5", "model.beta=-0.5 is not allowed"),
    ("model.objective=mse", "model.objective='mse' is not allowed: model.objective must be one of elbo, iwae, notebook"),
    ("data.val_size=0", "data.val_size=0 is not allowed: data.val_size must be an integer between 1 and 59999"),
    ("data.val_size=60000", "data.val_size=60000 is not allowed"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0 is not allowed"),
    ("data.image_shape=[1,28]", "data.image_shape=[1, 28] is not allowed: data.image_shape must be three positive integers"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is not allowed"),
    (
        "trainer.check_val_every_n_epoch=0",
        "trainer.check_val_every_n_epoch=0 is not allowed: trainer.check_val_every_n_epoch must be a positive integer or null",
    ),
    ("trainer.check_val_every_n_epoch=2.5", "trainer.check_val_every_n_epoch=2.5 is not allowed"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches=1.5 is not allowed"),
    ("trainer.accelerator=tpu", "trainer.accelerator='tpu' is not allowed: trainer.accelerator must be one of cpu, gpu"),
    ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is not allowed: trainer.accumulate_grad_batches"),
    ("+trainer.accumulate_grad_batches=1.5", "trainer.accumulate_grad_batches=1.5 is not allowed"),
    ("steps_per_call=0", "steps_per_call=0 is not allowed: steps_per_call"),
    ("+trainer.gradient_clip_algorithm=bogus", "trainer.gradient_clip_algorithm='bogus' is not allowed: trainer.gradient_clip"),
    (
        "callbacks.samples.num_samples=0",
        "callbacks.samples.num_samples=0 is not allowed: callbacks.samples.num_samples must be a positive integer",
    ),
    (
        "callbacks.interpolation.method=cubic",
        "callbacks.interpolation.method='cubic' is not allowed: callbacks.interpolation.method must be one of linear, spherical",
    ),
    ("callbacks.interpolation.steps=1", "callbacks.interpolation.steps=1 is not allowed"),
    ("callbacks.latent_map.quantile_range=[0.5,0.2]", "callbacks.latent_map.quantile_range=[0.5, 0.2] is not allowed"),
    ("callbacks.reconstructions.every_n_epochs=0", "callbacks.reconstructions.every_n_epochs=0 is not allowed"),
    ("callbacks.noisy_reconstructions.noise_factor=-1", "callbacks.noisy_reconstructions.noise_factor=-1 is not allowed"),
    ("callbacks.samples.temperature=0", "callbacks.samples.temperature=0 is not allowed"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_value_is_named_with_what_is_allowed(compose, override, message):
    with pytest.raises(UserError) as err:
        check(compose([override]), "train")
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["noise_factor=0", "beta=0"],
        ["noise_factor=1", "lr=10", "latent_dim=1", "epochs=1", "batch_size=1"],
        ["experiment=notebook"],
        ["experiment=latent2"],
        ["experiment=conv32"],
        ["model=conv", "data=mnist"],
        ["trainer=ddp"],
        ["trainer=gpu"],
        ["trainer.check_val_every_n_epoch=1"],
        ["trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=100"],  # validation by batches
        ["~callbacks.samples"],
        ["callbacks=[progress_bar]"],
    ],
)
def test_good_values_and_presets_pass(compose, overrides):
    check(compose(overrides), "train")


def test_the_first_bad_value_in_rule_order_is_reported(compose):
    with pytest.raises(UserError, match=r"^latent_dim=0 "):
        check(compose(["lr=0", "latent_dim=0"]), "train")


def compose_command(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(name, overrides=["paths.root_dir=/tmp", *overrides])


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("eval", "ckpt_path=x", None),
        ("eval", "ckpt_path=''", "ckpt_path='' is not allowed: ckpt_path must be a non-empty string"),
        ("eval", "num_importance_samples=0", "num_importance_samples=0 is not allowed"),
        ("eval", "pairs_per_pass=0", "pairs_per_pass=0 is not allowed"),
        ("eval", "num_images=0", "num_images=0 is not allowed"),
        ("eval", "noise_levels=[]", "noise_levels=[] is not allowed: noise_levels must be a non-empty list"),
        ("eval", "noise_levels=[0,-0.1]", "noise_levels=[0, -0.1] is not allowed"),
        ("eval", "active_unit_threshold=-1", "active_unit_threshold=-1 is not allowed"),
        ("eval", "device=tpu", "device='tpu' is not allowed: device must be auto, cpu, cuda, cuda:<index> or mps"),
        ("eval", "batch_size=0", "batch_size=0 is not allowed"),
        ("eval", "threads=0", "threads=0 is not allowed: threads must be a positive integer or null, e.g. threads=null"),
        ("generate", "threads=0", "threads=0 is not allowed: threads must be a positive integer or null, e.g. threads=null"),
        ("eval", "linear_probe.max_iter=0", "linear_probe.max_iter=0 is not allowed: linear_probe.max_iter must be a positive"),
        ("eval", "linear_probe.train_images=1", "linear_probe.train_images=1 is not allowed: linear_probe.train_images must be"),
        ("eval", "linear_probe.weight_decay=-1", "linear_probe.weight_decay=-1 is not allowed"),
        ("eval", "frechet.num_samples=1", "frechet.num_samples=1 is not allowed: frechet.num_samples must be an integer >= 2"),
        ("eval", "classifier.epochs=0", "classifier.epochs=0 is not allowed"),
        ("eval", "classifier.train_images=0", "classifier.train_images=0 is not allowed"),
        (
            "eval",
            "classifier.cache_dir=''",
            "classifier.cache_dir='' is not allowed: classifier.cache_dir must be a folder or null",
        ),
        ("generate", "ckpt_path=x", None),
        ("generate", "num_samples=0", "num_samples=0 is not allowed"),
        ("generate", "nrow=0", "nrow=0 is not allowed"),
        ("generate", "temperature=0", "temperature=0 is not allowed: temperature must be a number > 0"),
        ("generate", "num_pairs=0", "num_pairs=0 is not allowed"),
        ("generate", "num_pairs=6000", "num_pairs=6000 is not allowed"),
        ("generate", "num_steps=1", "num_steps=1 is not allowed: num_steps must be an integer >= 2"),
    ],
)
def test_eval_and_generate_settings(name, override, message):
    overrides = [override] if override.startswith("ckpt_path") else ["ckpt_path=x", override]
    cfg = compose_command(name, overrides)
    if message is None:
        check(cfg, name)
        return
    with pytest.raises(UserError) as err:
        check(cfg, name)
    assert str(err.value).startswith(message)


def test_a_missing_ckpt_path_is_required():
    with pytest.raises(UserError, match=r"^ckpt_path is required, e.g. ckpt_path=outputs/"):
        check(compose_command("eval", []), "eval")


@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=abc", "seed=abc is not allowed: seed must be an integer, e.g. seed=42"),
        ("latent_dim=2.5", "latent_dim=2.5 is not allowed: latent_dim must be a positive integer, e.g. latent_dim=16"),
        ("latent_dim=true", "latent_dim=true is not allowed"),
        ("lr=fast", "lr=fast is not allowed: lr must be a number > 0"),
        ("threads=abc", "threads=abc is not allowed"),
        ("denoise=maybe", "denoise=maybe is not allowed: denoise must be true or false"),
        ("epochs=null", "epochs=null is not allowed"),
    ],
)
def test_types_are_checked_by_the_structured_config(override, message, monkeypatch):
    """Hydra refuses these while composing (vaelab.runs.settings.Train); the error becomes the same kind of line."""
    monkeypatch.setattr("sys.argv", ["vaelab-train", override])
    with pytest.raises(Exception) as err:
        compose_command("train", [override])
    assert hydra_message(err.value) == message or hydra_message(err.value).startswith(message)


def test_unknown_keys_and_choices_become_one_line():
    for override, message in [
        ("latent_dimm=3", "there is no setting latent_dimm: did you mean latent_dim?"),
        ("model.latent_dimm=3", "there is no setting model.latent_dimm: did you mean model.latent_dim?"),
        ("model=foo", "model=foo is not a choice of model: choose one of conv, dense, mlp"),
        ("latent_dim=[1", "cannot parse the override 'latent_dim=[1'"),
    ]:
        with pytest.raises(Exception) as err:
            compose_command("train", [override])
        assert hydra_message(err.value).startswith(message), hydra_message(err.value)
        assert "\n" not in hydra_message(err.value)


def test_the_schemas_leave_the_config_groups_open(compose):
    """A user's own model or data config may add keys: only the top-level settings are typed."""
    cfg = compose(["+model.my_setting=3", "+data.my_path=x"])
    assert cfg.model.my_setting == 3 and OmegaConf.get_type(cfg).__name__ == "Train"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.objective=notebook", "model.likelihood=gaussian"], "model.objective=notebook is the notebook's Bernoulli loss"),
        (["model.objective=iwae", "model.free_bits=0.5"], "model.free_bits=0.5 applies to the ELBO objective"),
        (["data.binarize=yes"], "data.binarize='yes' is not allowed: data.binarize must be one of none, dynamic, static"),
        (["model.likelihood=poisson"], "model.likelihood='poisson' is not allowed"),
        (["model.kl_warmup_epochs=-1"], "model.kl_warmup_epochs=-1 is not allowed"),
        (["model.num_samples=0"], "model.num_samples=0 is not allowed"),
        (
            ["model.binarize=dynamic"],
            "model.binarize=dynamic is recorded in the checkpoint as how the data was prepared, so it must be "
            "data.binarize (none); set data.binarize=dynamic instead",
        ),
    ],
)
def test_objective_and_likelihood_settings(compose, overrides, message):
    with pytest.raises(UserError) as err:
        check(compose(overrides), "train")
    assert str(err.value).startswith(message)


def test_the_structured_configs_type_exactly_the_declared_keys():
    """The schemas are derived from the declarations: each typed key once, with its declared type; groups open."""
    from dataclasses import fields
    from typing import Any, Optional

    from vaelab.runs import settings

    train = {f.name: f.type for f in fields(settings.Train)}
    assert set(train) == {
        *("paths", "latent_dim", "epochs", "noise_factor", "denoise", "batch_size", "lr", "beta", "seed", "overwrite"),
        *("threads", "ckpt_path", "test_after_fit", "steps_per_call", "data", "model", "trainer", "logger", "callbacks"),
    }
    assert (train["latent_dim"], train["lr"], train["denoise"], train["threads"], train["model"]) == (
        int,
        float,
        bool,
        Optional[int],
        Any,
    )
    shared = {"paths", "data", "seed", "overwrite", "threads", "ckpt_path", "device", "allow_networks", "batch_size"}
    assert {f.name for f in fields(settings.Eval)} == shared | {
        *("num_importance_samples", "pairs_per_pass", "num_images", "noise_levels", "active_unit_threshold"),
        *("linear_probe", "frechet", "classifier"),
    }
    assert {f.name for f in fields(settings.Generate)} == shared | {
        *("num_samples", "nrow", "temperature", "interpolate", "num_pairs", "num_steps", "label"),
    }
    assert {f.name: f.type for f in fields(settings.LinearProbe)}["train_images"] == Optional[int]
    assert settings.Paths is OmegaConf.get_type(compose_command("eval", ["ckpt_path=x"]).paths)  # one class, shared


def test_each_choice_is_spelled_once_and_every_name_in_it_is_implemented():
    """vaelab.choices holds each vocabulary; the settings' words and the parts that implement the choices read it."""
    import torch

    from vaelab import choices
    from vaelab.data import tensors
    from vaelab.model import latent, likelihoods, networks, priors, vae
    from vaelab.runs import settings

    assert vae.OBJECTIVES is choices.OBJECTIVES and networks.INITS is choices.INITS and tensors.BINARIZE is choices.BINARIZE
    assert likelihoods.NAMES is choices.LIKELIHOODS and tuple(likelihoods.LIKELIHOODS) == choices.LIKELIHOODS
    assert tuple(priors.PRIORS) == choices.PRIORS
    for key, names in [
        ("model.objective", choices.OBJECTIVES),
        ("model.likelihood", choices.LIKELIHOODS),
        ("model.prior.name", choices.PRIORS),
        ("model.encoder.init", choices.INITS),
        ("data.binarize", choices.BINARIZE),
    ]:
        assert settings.TRAIN[key].allowed == f"one of {', '.join(names)}"
    assert settings.CALLBACKS["vaelab.pictures.grids.Interpolation"]["method"].allowed == "one of linear, spherical"
    for name in choices.LIKELIHOODS:
        assert likelihoods.build(name, 1).name == name
    for name in choices.PRIORS:
        assert priors.build({"name": name}, 2).name == name
    for name in choices.BINARIZE:
        assert tensors.TensorData(binarize=name).binarize == name
    for name in choices.INITS:
        networks.initialise(torch.nn.Linear(2, 2), name)
    a, b = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    paths = [latent.interpolate(a + torch.tensor([[0.0, 1.0]]), b, 3, method) for method in choices.INTERPOLATIONS]
    assert not torch.equal(*paths)  # the two methods are two paths (the spherical one keeps the norm)
    with pytest.raises(ValueError):
        tensors.TensorData(binarize="sometimes")
    with pytest.raises(ValueError):
        networks.initialise(torch.nn.Linear(2, 2), "xavier")
