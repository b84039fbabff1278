"""A user's own configs and networks beside vaelab's (docs/configs.md, Your own configs): `--config-dir` adds a model file
that reuses `dense` and names an encoder class of the user's own module; it trains, resumes, and its checkpoints
load in vaelab-eval and vaelab-generate only when the user allows the class."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import FAST, one_line, run_cli

# The example of docs/configs.md, word for word.
MODULE = '''\
import math

from torch import nn


class TinyEncoder(nn.Module):
    """One hidden layer, then the mean and the log-variance."""

    def __init__(self, latent_dim, image_shape=(1, 28, 28), hidden=64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), hidden), nn.ReLU())
        self.heads = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x):
        mu, logvar = self.heads(self.body(x)).chunk(2, dim=-1)
        return mu, logvar
'''
MODEL = """\
# my_conf/model/tiny.yaml: vaelab's dense model with my encoder
defaults:
  - dense
  - _self_

name: tiny
encoder:
  _target_: mynets.TinyEncoder
  hidden: 64
"""


@pytest.fixture
def user_dir(tmp_path) -> Path:
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "mynets.py").write_text(MODULE + "\n\nclass NotANetwork:\n    pass\n")
    (tmp_path / "my_conf" / "model" / "tiny.yaml").write_text(MODEL)
    (tmp_path / "my_conf" / "model" / "broken.yaml").write_text(
        "defaults:\n  - dense\nencoder: {_target_: mynets.TinyEncoder\n  hidden: 3\n"
    )
    return tmp_path


def with_module(user_dir: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(user_dir), os.environ.get("PYTHONPATH")) if p)}


def test_a_users_model_trains_resumes_and_loads_only_when_allowed(user_dir):
    env = with_module(user_dir)
    run_cli(
        "--config-dir",
        "my_conf",
        "model=tiny",
        *FAST,
        "epochs=1",
        "latent_dim=4",
        "hydra.run.dir=runs/tiny",
        cwd=user_dir,
        env=env,
    )
    run_dir = user_dir / "runs" / "tiny"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert weights["hyper_parameters"]["encoder"]["_target_"] == "mynets.TinyEncoder"
    assert weights["state_dict"]["vae.encoder.body.1.weight"].shape == (64, 784)  # the user's own hidden layer

    refused = run_cli(f"ckpt_path={checkpoint}", tool="vaelab-eval", cwd=user_dir, env=env, check=False)
    line = one_line(refused, "vaelab-eval: error: refusing to build 'mynets.TinyEncoder': a checkpoint may only build ")
    assert "allow_networks=[<module or class>]" in line
    run_cli(
        f"ckpt_path={checkpoint}", "allow_networks=[mynets]", "hydra.run.dir=gen", tool="vaelab-generate", cwd=user_dir, env=env
    )
    assert (user_dir / "gen" / "samples.png").is_file()

    run_cli(str(run_dir), "epochs=2", tool="vaelab-resume", cwd=user_dir, env=env)  # the run's own config names the class
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 1
    gone = run_cli(str(run_dir), "epochs=3", tool="vaelab-resume", cwd=user_dir, check=False)  # the module is not on the path
    line = one_line(gone, "vaelab-resume: error: model.encoder._target_=mynets.TinyEncoder: cannot build 'mynets.TinyEncoder': ")
    assert "mynets cannot be imported (ModuleNotFoundError" in line and "PYTHONPATH" in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.encoder._target_=mynets.TinyEncodr", "cannot build 'mynets.TinyEncodr': the module mynets ("),
        ("model.encoder._target_=mynet.TinyEncoder", "cannot build 'mynet.TinyEncoder': mynet cannot be imported"),
        ("model.encoder._target_=mynets.NotANetwork", "it is the class NotANetwork, not a network (a torch.nn.Module"),
        ("model=broken", "broken.yaml is not valid YAML: expected ',' or '}', but got ':'"),
    ],
)
def test_a_bad_user_config_is_one_line(user_dir, override, message):
    proc = run_cli(
        "--config-dir",
        "my_conf",
        "model=tiny",
        override,
        "hydra.run.dir=run",
        cwd=user_dir,
        env=with_module(user_dir),
        check=False,
    )
    assert message in one_line(proc, "vaelab-train: error: ")
    assert not (user_dir / "run" / "checkpoints").exists()


def test_a_config_dir_that_is_not_a_folder_is_one_line_naming_the_fix(tmp_path):
    proc = run_cli("--config-dir", str(tmp_path / "nowhere"), "hydra.run.dir=run", cwd=tmp_path, check=False)
    line = one_line(proc, f"vaelab-train: error: Additional config directory '{tmp_path / 'nowhere'}' not found: ")
    assert "--config-dir (-cd) takes an existing folder of your own configs" in line
    assert sorted(tmp_path.iterdir()) == []  # nothing written
