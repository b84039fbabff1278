"""Seconds per training epoch: vaelab's default configuration against bare PyTorch loops, in one run.

    .venv/bin/python benchmarks/epoch_time.py [--batch-sizes 128 32] [--repeats 2]

All loops train the dense model (latent 256) on the same 55,000 in-memory Fashion-MNIST images with
the same loss (negative ELBO), and each epoch includes one validation pass over the 5,000 validation
images (Lightning runs it inside the epoch), in batches of vaelab's data.eval_batch_size for all loops. Each is timed on its second epoch (the first warms up).
- hand-written: what a user writes by hand: fp32, torch.optim.Adam with its defaults;
- same-levers: a bare loop with vaelab's optimizer (fused Adam) and precision;
- vaelab: `train()` with the default config (TensorBoard logger, checkpointing, progress bar on).
Also: the wall time of `vaelab-train trainer.fast_dev_run=true` against the bare import time.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from vaelab import CONF_DIR
from vaelab.commands.train import train
from vaelab.data.mnist import MNISTLike
from vaelab.model.networks import DenseDecoder, DenseEncoder
from vaelab.model.vae import elbo_loss

REPO = Path(__file__).resolve().parents[1]
LATENT = 256


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (training batches, validation pass and checkpoint save).

    Built by train() from the config, so the times go to a class-level list the benchmark reads."""

    times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        EpochTimer.times.append(time.perf_counter() - self._start)


def compose_train(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.root_dir={output_dir}", f"paths.data_dir={REPO / 'data'}", *overrides],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            del cfg["hydra"]
    return cfg


def vaelab_epoch(batch_size: int) -> tuple[float, str, str, int]:
    """Second-epoch time of vaelab's default configuration; also its optimizer, precision and eval batch size."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(
            [
                f"batch_size={batch_size}",
                "epochs=2",
                "test_after_fit=false",
                "+callbacks.epoch_timer._target_=__main__.EpochTimer",
            ],
            Path(tmp),
        )
        EpochTimer.times.clear()
        train(cfg)
        fused = bool(cfg.model.optimizer.get("fused", False))
        return EpochTimer.times[-1], ("fused" if fused else "default"), str(cfg.trainer.precision), int(cfg.data.eval_batch_size)


def bare_epoch(images, val_images, batch_size: int, eval_batch_size: int, fused: bool, bf16: bool, seed: int = 0) -> float:
    """A hand-written loop over the same tensors, same model and loss; second-epoch time."""
    torch.manual_seed(seed)
    encoder, decoder = DenseEncoder(LATENT), DenseDecoder(LATENT)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True) if fused else torch.optim.Adam(params, lr=1e-3)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for idx in torch.randperm(len(images), generator=generator).split(batch_size):
            x = images[idx]
            with autocast():
                mu, logvar = encoder(x)
                z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
                loss = elbo_loss(decoder(z).float(), x, mu.float(), logvar.float())["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad(), autocast():
            for x in val_images.split(eval_batch_size):
                mu, logvar = encoder(x)
                elbo_loss(decoder(mu).float(), x, mu.float(), logvar.float())
        times.append(time.perf_counter() - start)
    return times[-1]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    dm = MNISTLike(data_dir=str(REPO / "data"), system_dir="/usr/share/datasets/fashion-mnist")
    dm.prepare_data()
    dm.setup()
    images, val_images = dm.train_set[0], dm.val_set[0]
    print(f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, {torch.get_num_threads()} threads")

    rows = []
    for batch_size in args.batch_sizes:
        for repeat in range(args.repeats):
            vaelab_s, optimizer, precision, eval_batch_size = vaelab_epoch(batch_size)
            bf16 = precision.startswith("bf16")
            hand_s = bare_epoch(images, val_images, batch_size, eval_batch_size, fused=False, bf16=False)
            same_s = bare_epoch(images, val_images, batch_size, eval_batch_size, fused=optimizer == "fused", bf16=bf16)
            rows.append((batch_size, repeat, hand_s, same_s, vaelab_s))
            print(
                f"batch {batch_size:4d} #{repeat}: hand-written {hand_s:.2f} s  same-levers ({optimizer} Adam, {precision}) "
                f"{same_s:.2f} s  vaelab {vaelab_s:.2f} s  ->  vaelab/hand {vaelab_s / hand_s:.2f}x  "
                f"vaelab/same {vaelab_s / same_s:.2f}x",
                flush=True,
            )

    print(
        "\n| batch | hand-written loop (s/epoch) | same-levers loop (s/epoch) | vaelab (s/epoch) | vaelab / hand-written | vaelab / same-levers |"
    )
    print("|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        picked = [r for r in rows if r[0] == batch_size]
        best = lambda i, picked=picked: min(r[i] for r in picked)  # noqa: E731 - the least-disturbed repeat of each loop
        print(
            f"| {batch_size} | {best(2):.2f} | {best(3):.2f} | {best(4):.2f} | {best(4) / best(2):.2f}x | {best(4) / best(3):.2f}x |"
        )

    bin_dir = Path(sys.executable).parent
    imports = min(
        wall([sys.executable, "-c", "import torch, torchvision, pytorch_lightning, hydra, tensorboard"]) for _ in range(2)
    )
    with tempfile.TemporaryDirectory() as tmp:
        dev_run = min(
            wall([str(bin_dir / "vaelab-train"), "trainer.fast_dev_run=true", f"hydra.run.dir={tmp}/{i}"]) for i in range(2)
        )
    print(
        f"\nvaelab-train trainer.fast_dev_run=true: {dev_run:.1f} s wall; importing torch, torchvision, "
        f"pytorch_lightning, hydra, tensorboard alone: {imports:.1f} s"
    )


if __name__ == "__main__":
    main()
