"""The config schema and the output-directory check, in-process (the same cases from the shell: test_reliability)."""

import pytest

from vaelab.validate import ConfigError, OutputDirError, check_output_dir, validate

# (override, the line's start): every headline rule on both sides, odd types, and a nested form.
BAD = [
    ("latent_dim=0", "latent_dim=0 is not allowed: latent_dim must be a positive integer, e.g. latent_dim=16"),
    ("latent_dim=-3", "latent_dim=-3 is not allowed"),
    ("latent_dim=2.5", "latent_dim=2.5 is not allowed"),
    ("latent_dim=abc", "latent_dim='abc' is not allowed"),
    ("latent_dim=true", "latent_dim=true is not allowed"),
    ("epochs=0", "epochs=0 is not allowed: epochs must be a positive integer, e.g. epochs=10"),
    ("epochs=null", "epochs=null is not allowed"),
    ("batch_size=-64", "batch_size=-64 is not allowed: batch_size must be a positive integer, e.g. batch_size=128"),
    ("noise_factor=1.5", "noise_factor=1.5 is not allowed: noise_factor must be a number in [0, 1], e.g. noise_factor=0.1"),
    ("noise_factor=-0.1", "noise_factor=-0.1 is not allowed"),
    ("noise_factor=nan", "noise_factor=nan is not allowed"),
    ("lr=0", "lr=0 is not allowed: lr must be a number > 0, e.g. lr=1e-3"),
    ("lr=-0.001", "lr=-0.001 is not allowed"),
    ("lr=inf", "lr=inf is not allowed"),
    ("beta=-1", "beta=-1 is not allowed: beta must be a number >= 0, e.g. beta=1.0"),
    ("beta='1'", "beta='1' is not allowed"),
    # nested overrides are read where they finally live and named as typed
    ("model.latent_dim=0", "model.latent_dim=0 is not allowed: model.latent_dim must be a positive integer"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 is not allowed"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed"),
    ("model.noise_factor=2", "model.noise_factor=2 is not allowed"),
    ("model.optimizer.lr=0", "model.optimizer.lr=0 is not allowed"),
    ("model.beta=-0.5", "model.beta=-0.5 is not allowed"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_value_is_named_with_what_is_allowed(compose, override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [[], ["noise_factor=0", "beta=0"], ["noise_factor=1", "lr=10", "latent_dim=1", "epochs=1", "batch_size=1"],
                                       ["experiment=notebook"], ["experiment=latent2"], ["experiment=conv32"], ["model=conv", "data=mnist"]])
def test_good_values_and_presets_pass(compose, overrides):
    validate(compose(overrides))


def test_the_first_bad_value_in_rule_order_is_reported(compose):
    with pytest.raises(ConfigError, match=r"^latent_dim=0 "):
        validate(compose(["lr=0", "latent_dim=0"]))


def test_output_dir_is_created_and_probed(tmp_path):
    target = check_output_dir(tmp_path / "a" / "b")
    assert target.is_dir() and list(target.iterdir()) == []  # the probe file is gone


def test_a_file_where_the_output_dir_should_be(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=r"cannot write the output directory .*/file/run: a file is in the way"):
        check_output_dir(tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "x"


def test_a_location_nothing_can_be_created_in():
    # Tests run as root, where file modes stop nothing; /proc refuses new entries for everyone.
    with pytest.raises(OutputDirError, match=r"cannot write the output directory /proc/vaelab-test/run"):
        check_output_dir("/proc/vaelab-test/run")
