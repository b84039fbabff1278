"""Defaults that depend on the machine, offered to the configs as OmegaConf resolvers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf


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
