"""vaelab as a package: a wheel built from the repository, installed into a fresh virtualenv, runs from any directory.

The fresh virtualenv reuses this environment's installed packages (torch, Lightning, Hydra, ...) through a .pth
file, so the install takes seconds and downloads nothing; vaelab itself, its configs included, comes from the wheel
alone (built from a copy of the repository that is deleted before anything runs).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, default_signals, one_line

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run(command: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """A command with none of this checkout's settings: no PYTHONPATH, no VAELAB_* (unless given)."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VAELAB_")}
    proc = subprocess.run(
        command,
        cwd=cwd,
        env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        preexec_fn=default_signals,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with vaelab installed from a wheel built from a copy of the repository."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(source)], cwd=tmp)
    [wheel] = (tmp / "dist").glob("vaelab-*.whl")
    shutil.rmtree(source)  # the installed package must not need the repository

    env = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=tmp)
    [own] = (env / "lib").glob("python*/site-packages")
    (own / "reuse_installed.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # torch & co., not vaelab
    run([*pip, "--python", str(env / "bin" / "python"), "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    return env


def test_the_wheel_carries_the_configs(venv):
    proc = run([str(venv / "bin" / "python"), "-c", "import vaelab; print(vaelab.__file__); print(vaelab.CONF_DIR)"], cwd=venv)
    module, conf = proc.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(conf) == Path(module).parent / "conf"
    shipped = {p.relative_to(conf).as_posix() for p in Path(conf).rglob("*.yaml")}
    assert shipped == {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}


SUB_PACKAGES = ("model", "data", "pictures", "evaluation", "training", "runs", "commands")


def test_the_wheel_carries_every_module_of_every_sub_package(venv):
    """Every module of src/vaelab is in the wheel, in its sub-package, and imports from the installed copy."""
    python = str(venv / "bin" / "python")
    installed = Path(run([python, "-c", "import vaelab; print(vaelab.__file__)"], cwd=venv).stdout.strip()).parent
    source = REPO / "src" / "vaelab"
    shipped = {p.relative_to(installed).as_posix() for p in installed.rglob("*.py")}
    assert shipped == {p.relative_to(source).as_posix() for p in source.rglob("*.py")}
    assert {f"{name}/__init__.py" for name in SUB_PACKAGES} <= shipped
    modules = sorted("vaelab." + p.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for p in shipped)
    assert {"vaelab.model.vae", "vaelab.training.module", "vaelab.runs.settings", "vaelab.commands.cli"} <= set(modules)
    imports = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(importlib.import_module(name).__file__)"
    found = run([python, "-c", imports, *modules], cwd=venv).stdout.split()
    assert len(found) == len(modules) and all(Path(path).is_relative_to(installed) for path in found)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist (make data)")
def test_installed_commands_run_from_any_directory(venv, tmp_path):
    """docs/install.md, Install with pip: outputs under the directory it is started from (or VAELAB_ROOT), the data
    cache in its data/ (or VAELAB_DATA_DIR), Debian's Fashion-MNIST found from anywhere."""
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    run([str(venv / "bin" / "vaelab-train"), *FAST, "epochs=1", "latent_dim=4"], cwd=anywhere)
    [run_dir] = (anywhere / "outputs").glob("*/*")  # outputs/<date>/<time>
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "tensorboard").is_dir()
    assert json.loads((run_dir / "metrics.json").read_text())["test/loss"] > 0
    raw = anywhere / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.stem for p in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"))
    assert sorted(p.name for p in anywhere.iterdir()) == ["data", "outputs"]

    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    elsewhere.mkdir()
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    env = {"VAELAB_ROOT": str(root), "VAELAB_DATA_DIR": str(anywhere / "data")}
    args = [f"ckpt_path={checkpoint}", "num_images=100", "num_importance_samples=2", "noise_levels=[0]"]
    args += ["linear_probe.train_images=1000", "frechet.num_samples=100", "classifier.train_images=1000", "classifier.epochs=1"]
    run([str(venv / "bin" / "vaelab-eval"), *args], cwd=elsewhere, env=env)
    [eval_dir] = (root / "outputs" / "eval").glob("*/*")
    assert json.loads((eval_dir / "eval.json").read_text())["nll_iwae"] > 0
    assert json.loads((eval_dir / "eval.json").read_text())["frechet_distance"] > 0  # torchmetrics, with the classifier
    assert list(elsewhere.iterdir()) == []  # nothing in the directory it ran from, no second data cache
    assert sorted(p.name for p in root.iterdir()) == ["outputs"]


def test_installed_train_finds_a_users_config_dir_beside_its_own(venv, tmp_path):
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "wide.yaml").write_text("defaults:\n  - mlp\n  - _self_\n\nname: wide\n")
    proc = run([str(venv / "bin" / "vaelab-train"), "--config-dir", "my_conf", "model=wide", "--cfg", "job"], cwd=tmp_path)
    assert "name: wide" in proc.stdout and "vaelab.model.networks.DenseEncoder" in proc.stdout and "hidden:" in proc.stdout
    bad = run([str(venv / "bin" / "vaelab-train"), "--config-dir", "my_conf", "model=tall"], cwd=tmp_path, check=False)
    assert "wide" in one_line(bad, "vaelab-train: error: model=tall is not a choice of model: choose one of ")
