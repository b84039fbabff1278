"""What the reliability guards cost, as ratios measured in one run.

    .venv/bin/python benchmarks/reliability_overhead.py [--steps 300] [--batch-size 128] [--saves 20] [--threads 1]

- The non-finite-loss guard (vaelab.runs.guards.FiniteLoss.on_train_batch_end, called every training step; it
  reads the logged loss once per logging window) against a whole training step of the default model (dense,
  latent 256: forward, loss, backward, fused Adam), interleaved so machine noise hits both alike.
- AtomicCheckpointIO (temporary file, fsync, rename) against Lightning's TorchCheckpointIO, saving the
  same checkpoint of the default model (its weights and Adam state).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from vaelab.model.networks import DenseDecoder, DenseEncoder
from vaelab.model.vae import elbo_loss
from vaelab.runs.checkpoints import AtomicCheckpointIO
from vaelab.runs.guards import FiniteLoss


class _Trainer:  # what the guard reads: a window of 50 steps, the loss logged at its end
    log_every_n_steps = 50
    current_epoch = 0

    def __init__(self):
        self.global_step, self.callback_metrics = 0, {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    guard = FiniteLoss()

    encoder, decoder = DenseEncoder(256, (1, 28, 28)), DenseDecoder(256, (1, 28, 28))
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    x = torch.rand(args.batch_size, 1, 28, 28)
    trainer = _Trainer()

    step_times, check_times = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        mu, logvar = encoder(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        loss = elbo_loss(decoder(z), x, mu, logvar)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trainer.global_step += 1
        if trainer.global_step % trainer.log_every_n_steps == 0:
            trainer.callback_metrics["train/loss"] = loss.detach()
        checked = time.perf_counter()
        guard.on_train_batch_end(trainer, None, None, None, 0)
        check_times.append(time.perf_counter() - checked)
        step_times.append(time.perf_counter() - start)
    step, check = statistics.median(step_times[10:]), statistics.median(check_times[10:])
    print(f"training step (batch {args.batch_size}, incl. the check): median {step * 1e3:.2f} ms")
    print(
        f"FiniteLoss per step: median {check * 1e6:.2f} us = {check / step:.3%} of a step "
        f"(mean {statistics.mean(check_times[10:]) * 1e6:.2f} us, with the window's one read of the loss)"
    )

    checkpoint = {"state_dict": {**encoder.state_dict(), **decoder.state_dict()}, "optimizer_states": [optimizer.state_dict()]}
    with tempfile.TemporaryDirectory() as folder:
        times = {"TorchCheckpointIO (Lightning)": [], "AtomicCheckpointIO (vaelab)": []}
        plugins = {"TorchCheckpointIO (Lightning)": TorchCheckpointIO(), "AtomicCheckpointIO (vaelab)": AtomicCheckpointIO()}
        for _ in range(args.saves):  # alternated, so both see the same disk and page cache conditions
            for name, plugin in plugins.items():
                start = time.perf_counter()
                plugin.save_checkpoint(checkpoint, Path(folder) / "last.ckpt")
                times[name].append(time.perf_counter() - start)
        size = (Path(folder) / "last.ckpt").stat().st_size
    base = statistics.median(times["TorchCheckpointIO (Lightning)"])
    for name, values in times.items():
        print(
            f"{name}: median {statistics.median(values) * 1e3:.1f} ms per {size / 1e6:.1f} MB checkpoint "
            f"({statistics.median(values) / base:.2f}x Lightning's)"
        )


if __name__ == "__main__":
    main()
