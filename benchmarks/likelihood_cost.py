"""What each observation likelihood costs per training epoch, against the Bernoulli (not a timed test).

    .venv/bin/python benchmarks/likelihood_cost.py [--model dense] [--batches 100] [--repeats 5] [--threads 1]

Each likelihood's VAE is built from vaelab's own config (`model=<model> model.likelihood=<name>`; the Gaussian
with its default global scale and with `+model.likelihood_kwargs.scale=pixel`), all from the same seed, and trained
on the same fixed `--batches` batches of Fashion-MNIST training images with the training step vaelab runs
(`VAE.target`: the dequantisation of the densities included; `VAE.train_loss`; backward; fused Adam; bf16
autocast where vaelab's CPU trainer uses it), then one validation pass over the 5,000 validation images in
batches of 1,000 (`VAE._loss` without gradients, as the validation step computes -ELBO). The likelihoods take
turns within each repeat (so a busy moment of a shared machine falls on all of them), after one warm-up round;
the figure is the median over repeats. Seconds per epoch = the step time x the 430 steps of an epoch of 55,000
images at batch 128 + the validation pass. Lightning's own per-step cost (about 1 ms, docs/performance.md) is the
same for every likelihood and is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers
from vaelab import CONF_DIR
from vaelab.data.mnist import MNISTLike
from vaelab.runs.hardware import cpu_precision

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, VAL_IMAGES = 55000, 5000
LIKELIHOODS = {  # label: overrides
    "bernoulli": ["model.likelihood=bernoulli"],
    "continuous_bernoulli": ["model.likelihood=continuous_bernoulli"],
    "discretized_logistic": ["model.likelihood=discretized_logistic"],
    "gaussian (global scale)": ["model.likelihood=gaussian"],
    "gaussian (per-pixel scale)": ["model.likelihood=gaussian", "+model.likelihood_kwargs.scale=pixel"],
}


def build(model: str, overrides: list[str], batch_size: int, seed: int = 0):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"model={model}", f"batch_size={batch_size}", f"paths.root_dir={REPO}", *overrides],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    torch.manual_seed(seed)
    vae = instantiate(cfg.model)
    return vae, instantiate(cfg.model.optimizer)(params=vae.parameters())


class Timed:
    """One likelihood's model, optimizer and measured times (seconds per training step, per validation pass)."""

    def __init__(self, vae, optimizer):
        self.vae, self.optimizer = vae, optimizer
        self.step_s: list[float] = []
        self.val_s: list[float] = []

    def run(self, batches: list[torch.Tensor], val_batches: list[torch.Tensor], autocast) -> None:
        vae = self.vae
        vae.train()
        start = time.perf_counter()
        for x in batches:
            target = vae.target(x)
            with autocast():
                loss = vae.train_loss(target, target)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.step_s.append((time.perf_counter() - start) / len(batches))
        vae.eval()
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad(), autocast():
            for x in val_batches:
                target = vae.target(x, generator)
                vae._loss(target, target)
        self.val_s.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dense", help="vaelab's model config: dense (the default) or mlp")
    parser.add_argument("--batches", type=int, default=100, help="training batches timed per repeat")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = os.environ.get("VAELAB_DATA_DIR") or str(REPO / "data")  # where vaelab-train reads it (conf/paths)
    dm = MNISTLike(data_dir=data_dir, system_dir="/usr/share/datasets/fashion-mnist")
    dm.prepare_data()
    dm.setup()
    batches = list(dm.train_set[0][: args.batches * args.batch_size].split(args.batch_size))
    val_batches = list(dm.val_set[0].split(1000))
    precision = cpu_precision()
    bf16 = precision.startswith("bf16")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    timed = {label: Timed(*build(args.model, overrides, args.batch_size)) for label, overrides in LIKELIHOODS.items()}
    print(
        f"model={args.model}, {args.batches} batches of {args.batch_size}, {args.threads} thread(s), {precision}, "
        f"torch {torch.__version__}; median of {args.repeats} repeats after one warm-up",
        flush=True,
    )
    for repeat in range(args.repeats + 1):
        for label, t in timed.items():
            t.run(batches, val_batches, autocast)
            if repeat:
                print(f"  #{repeat} {label}: {1000 * t.step_s[-1]:.2f} ms/step, validation {t.val_s[-1]:.3f} s", flush=True)

    steps = math.ceil(TRAIN_IMAGES / args.batch_size)
    per_epoch = {}
    for label, t in timed.items():
        step, val = statistics.median(t.step_s[1:]), statistics.median(t.val_s[1:])
        per_epoch[label] = (step, val, step * steps + val)
    base = per_epoch["bernoulli"][2]
    print(
        f"\n| likelihood | ms per training step | validation pass (s) | s per epoch ({steps} steps + validation) | vs Bernoulli |"
    )
    print("|---|---|---|---|---|")
    for label, (step, val, epoch) in per_epoch.items():
        print(f"| {label} | {1000 * step:.2f} | {val:.3f} | {epoch:.2f} | {epoch / base:.2f}x |")


if __name__ == "__main__":
    main()
