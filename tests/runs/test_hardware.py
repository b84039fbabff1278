"""The CPU trainer's precision follows the CPU: bf16-mixed only with native bf16 instructions."""

from pathlib import Path

from vaelab.runs import hardware


def test_cpu_precision_follows_cpuinfo_flags(compose):
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert hardware.cpu_has_bf16() is native
    assert compose([]).trainer.precision == ("bf16-mixed" if native else "32-true")
    assert compose(["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert compose(["trainer.precision=32-true"]).trainer.precision == "32-true"
