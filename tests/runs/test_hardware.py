"""What this machine has: the CPU trainer's precision follows the CPU (bf16-mixed only with native bf16 instructions),
and a logger whose package is not installed is refused before work starts."""

import json
import os
from pathlib import Path

import pytest

from conftest import FAST, PAUSING_ENV, run_cli
from vaelab.errors import UserError
from vaelab.runs import hardware


def test_cpu_precision_follows_cpuinfo_flags(compose):
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert hardware.cpu_has_bf16() is native
    assert compose([]).trainer.precision == ("bf16-mixed" if native else "32-true")
    assert compose(["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert compose(["trainer.precision=32-true"]).trainer.precision == "32-true"


def test_a_logger_whose_package_is_not_installed_is_one_line_naming_the_extra(compose, monkeypatch):
    import importlib.metadata as metadata

    def version(name):  # as if no distribution were installed
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    hardware.check_loggers(compose([]))  # TensorBoard ships with vaelab
    with pytest.raises(UserError) as refused:
        hardware.check_loggers(compose(["logger=[tensorboard,wandb]"]))
    assert str(refused.value) == (
        "logger.wandb (pytorch_lightning.loggers.WandbLogger) needs Weights & Biases (wandb), which is not installed: "
        "pip install 'vaelab[wandb]' (or choose loggers without it, e.g. logger=tensorboard)"
    )


def test_threads_sets_torchs_cpu_threads_and_null_leaves_them():
    import torch

    before = torch.get_num_threads()
    try:
        hardware.use_threads(None)
        assert torch.get_num_threads() == before
        hardware.use_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("before", [None, "0,1"])
def test_gpus_hidden_empties_cuda_visible_devices_for_the_duration_only(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
    with hardware.gpus_hidden(True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    with pytest.raises(KeyboardInterrupt), hardware.gpus_hidden(True):
        raise KeyboardInterrupt  # restored however the training ends
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    with hardware.gpus_hidden(False):
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def test_adam_steps_with_the_gpus_hidden_never_load_nvml(monkeypatch):
    """torch's Adam asks at every step whether CUDA is usable; under Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1,
    with CUDA not initialized, each answer goes through NVML (a library load), unless no device is visible."""
    import torch

    if not torch.cuda._is_compiled() or torch.cuda.is_initialized():
        pytest.skip("torch without CUDA, or CUDA initialized: torch answers without NVML anyway")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as importing Lightning sets it
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    loads = []
    for name in ("_raw_device_count_nvml", "_raw_device_uuid_nvml"):
        real = getattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, lambda real=real, name=name: loads.append(name) or real())
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight])

    def steps() -> None:
        for _ in range(5):
            weight.grad = torch.ones(3)
            optimizer.step()

    steps()
    assert len(loads) >= 5  # what the hiding saves: at least one NVML load a step
    loads.clear()
    with hardware.gpus_hidden(True):
        steps()
    assert loads == []


def test_vaelab_train_on_the_cpu_fits_and_tests_with_the_gpus_hidden(tmp_path):
    probe = tmp_path / "seen.json"
    overrides = ["+callbacks.probe._target_=probes.Environment", f"+callbacks.probe.out={probe}"]
    run = [*FAST, "epochs=1", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    run_cli(*run, env={**PAUSING_ENV, "CUDA_VISIBLE_DEVICES": "0"})  # tests/ on its path, and a GPU asked for
    assert json.loads(probe.read_text()) == {"train": "", "test": ""}
