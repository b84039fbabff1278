"""What the start-up checks cost: every setting of a command checked (vaelab.runs.settings.check) and its run
directory claimed and locked (vaelab.runs.rundir), in-process, against the whole refusal from the shell.

    .venv/bin/python benchmarks/startup_checks.py [--repeats 200] [--shell 5]

The in-process figures are the checks alone (the config already composed). The shell figure is what a user
waits for `vaelab-train latent_dim=0`: Python's start, Hydra's import and composition, the checks, the line.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers
from vaelab import CONF_DIR
from vaelab.runs.rundir import claim, lock
from vaelab.runs.settings import check


def per_call(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--shell", type=int, default=5, help="runs of the whole refusal from the shell")
    args = parser.parse_args()
    configs = {}
    ckpt = Path(tempfile.mkdtemp()) / "x.ckpt"  # the checks see that ckpt_path names a file (its contents are read later)
    ckpt.touch()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name, extra in (("train", []), ("eval", [f"ckpt_path={ckpt}"]), ("generate", [f"ckpt_path={ckpt}"])):
            configs[name] = compose(name, overrides=["paths.root_dir=/tmp", *extra])
    for name, cfg in configs.items():
        print(f"schema.check({name}): median {per_call(lambda cfg=cfg, name=name: check(cfg, name), args.repeats) * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "2026-12-01" / "12-00-00"
        print(
            f"claim (exclusive mkdir) + lock: median {per_call(lambda: lock(claim(base, True, 'x')), args.repeats) * 1e3:.2f} ms"
        )
        bad = [str(Path(sys.executable).parent / "vaelab-train"), "latent_dim=0", f"hydra.run.dir={folder}/r"]
        imports = [sys.executable, "-c", "import hydra, omegaconf, hydra.utils"]
        walls = {"vaelab-train latent_dim=0 (the whole refusal)": bad, "python -c 'import hydra, omegaconf'": imports}
        for label, command in walls.items():
            times = []
            for _ in range(args.shell):
                start = time.perf_counter()
                subprocess.run(command, capture_output=True, check=False)
                times.append(time.perf_counter() - start)
            print(f"{label}: median {statistics.median(times):.2f} s of {args.shell}")


if __name__ == "__main__":
    main()
