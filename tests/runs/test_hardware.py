"""What this machine has: the CPU trainer's precision follows the CPU (bf16-mixed only with native bf16 instructions),
and a logger whose package is not installed is refused before work starts."""

from pathlib import Path

import pytest

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
