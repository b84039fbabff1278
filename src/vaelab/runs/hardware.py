"""What this machine has: the defaults that depend on it (OmegaConf resolvers the configs use), and whether what the
settings ask for is here (an accelerator, a device, a logger's package), checked before any work starts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vaelab.errors import UserError


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 instructions (AVX512-BF16 or AMX): there bf16 autocast is faster.
    Elsewhere bf16 is emulated and slower, so the CPU trainer stays in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def cpu_precision() -> str:
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


OmegaConf.register_new_resolver("vaelab.cpu_precision", cpu_precision, replace=True)


def check_accelerator(accelerator: str, key: str, fix: str) -> None:
    """UserError when the accelerator asked for is not on this machine (before any data is read)."""
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"{key}={accelerator}: this machine has no GPU that torch can use (torch.cuda.is_available() "
            f"is False, torch {torch.__version__}); {fix}"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}=mps: this machine has no Apple GPU that torch can use; {fix}")


def use_threads(threads: int | None) -> None:
    """threads=<n>, in every command: torch's CPU threads for this process (null: torch's default, one a core)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def gpus_hidden(hide: bool) -> Iterator[None]:
    """With `hide`: no GPU visible to this process for the duration (CUDA_VISIBLE_DEVICES empty), the variable as it
    was after; for a trainer on the CPU. torch's Adam asks at every step whether CUDA is usable (its graph-capture
    check), and under Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 torch works that out afresh through NVML each time
    until CUDA is initialized: 0.23 ms a step at batch 32 and 0.37 ms at batch 128 of CPU time on a 2-core AMD EPYC
    without a GPU, 7-9% of the step. With no device visible it answers from the variable. Once CUDA is initialized
    torch keeps the count: nothing to do then."""
    import torch

    if not hide or torch.cuda.is_initialized():
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def resolve_device(name: str):
    """`auto`: the GPU when there is one, else the CPU; `cuda:<i>` must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    check_device(name)
    return device


def check_device(name: str) -> None:
    """vaelab-eval's and vaelab-generate's device=: UserError when it is not on this machine."""
    if name in ("auto", "cpu"):
        return
    import torch

    device = torch.device(name)
    check_accelerator(device.type, "device", "use device=cpu (or device=auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} GPU(s); use device=cuda:0 or device=auto")


# The loggers that need a package vaelab does not install by itself: the class -> (what it is called, the
# distributions that provide it, the pyproject extra that installs it).
LOGGER_EXTRAS = {
    "MLFlowLogger": ("MLflow", ("mlflow", "mlflow-skinny"), "mlflow"),
    "WandbLogger": ("Weights & Biases (wandb)", ("wandb",), "wandb"),
}


def check_loggers(cfg: DictConfig) -> None:
    """Every logger's package is installed (read from the installed distributions: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> bool:
        try:
            return bool(version(name))
        except PackageNotFoundError:
            return False

    for name, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        needs = LOGGER_EXTRAS.get(target.rpartition(".")[2])
        if needs and not any(installed(dist) for dist in needs[1]):
            raise UserError(
                f"logger.{name} ({target}) needs {needs[0]}, which is not installed: pip install 'vaelab[{needs[2]}]' "
                f"(or choose loggers without it, e.g. logger=tensorboard)"
            )
