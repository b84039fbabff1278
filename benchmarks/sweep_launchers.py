"""Wall time of the same 4-job sweep with Hydra's basic launcher (one job after another; torch's default
threads, and 1 thread) and with joblib (parallel jobs, torch threads shared out), alternated so all see the
same machine load.

    python benchmarks/sweep_launchers.py            # 2 rounds, 1 epoch of the real data per job
    python benchmarks/sweep_launchers.py --rounds 3 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["latent_dim=2,16", "noise_factor=0.1,0.3"]


VARIANTS = {
    "basic": ["hydra/launcher=basic"],
    "basic threads=1": ["hydra/launcher=basic", "threads=1"],
    "joblib": ["hydra/launcher=joblib"],
}


def run(variant: list[str], epochs: int, sweep_dir: Path) -> float:
    cmd = [
        str(Path(sys.executable).parent / "vaelab-train"),
        "-m",
        *variant,
        *SWEEP,
        f"epochs={epochs}",
        "~callbacks.progress_bar",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; sweep: {' '.join(SWEEP)} epochs={args.epochs}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for j, (name, variant) in enumerate(VARIANTS.items()):
                load = os.getloadavg()[0]
                wall = run(variant, args.epochs, Path(tmp) / f"{i}_{j}")
                times[name].append(wall)
                print(f"round {i + 1}: {name:16s} {wall:6.1f} s  (load average before: {load:.1f})", flush=True)
    best = {name: min(walls) for name, walls in times.items()}
    print(
        f"best of {args.rounds}: "
        + ", ".join(f"{name} {wall:.1f} s" for name, wall in best.items())
        + f"; joblib / basic = {best['joblib'] / best['basic']:.2f}"
    )


if __name__ == "__main__":
    main()
