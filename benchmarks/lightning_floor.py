"""Lightning's own cost per training step, with nothing of vaelab's around it (issue 21, point 3).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lightning_floor.py [--batch-size 32] [--steps 1600] [--repeats 5]
        [--chunk 8] [--callbacks 14] [--quick]

Three loops train the default model's networks (conf/model/dense.yaml) on vaelab's in-memory training images with
the same -ELBO, fused Adam and precision (bf16 autocast where the CPU has it), taking turns (A B C A B C ...):
- same-levers: benchmarks/epoch_time.py's plain loop;
- Lightning, automatic: the same loss as a bare LightningModule's training_step under Lightning's automatic
  optimisation: no callbacks, no logger, no checkpoints, no progress bar;
- Lightning, manual, --chunk steps a call: the same module under manual optimisation, each training_step taking
  --chunk batches and making one optimizer step for each (the route issue 21 names).
--callbacks N adds a fourth loop: the automatic one with N callbacks that do nothing (vaelab's default trainer has
14), whose every hook Lightning still calls each step.
It prints the CPU milliseconds per optimizer step of each (median and range of the repeats) and each Lightning
loop's cost over the plain loop: the floor under vaelab's framework cost per step, before any of vaelab's work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_time import SameLevers, compose_train  # noqa: E402  the plain loop and the config, as epoch_time builds them


class Bare(pl.LightningModule):
    """The plain loop's networks and its loss (SameLevers.losses) alone; chunk 0: automatic optimisation, else manual,
    one step per batch of a chunk."""

    def __init__(self, same: SameLevers, chunk: int):
        super().__init__()
        self.encoder, self.decoder, self.chunk = same.encoder, same.decoder, chunk  # registered: the optimizer's
        self.elbo = lambda x: same.losses(x, x)[0]
        self.automatic_optimization = chunk == 0

    def training_step(self, batch, batch_idx):
        if self.chunk == 0:
            return self.elbo(batch)
        optimizer = self.optimizers()
        for x in batch:
            optimizer.zero_grad()
            self.manual_backward(self.elbo(x))
            optimizer.step()
        return None

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


class Batches:
    """`steps` shuffled batches of the images, one at a time (chunk 0) or in lists of `chunk`."""

    def __init__(self, images: torch.Tensor, batch_size: int, steps: int, chunk: int):
        self.images, self.batch_size, self.steps, self.chunk = images, batch_size, steps, chunk

    def __len__(self) -> int:
        return -(-self.steps // max(1, self.chunk))

    def __iter__(self):
        index = torch.randperm(len(self.images)).split(self.batch_size)[: self.steps]
        if self.chunk == 0:
            yield from (self.images[i] for i in index)
        else:
            for start in range(0, len(index), self.chunk):
                yield [self.images[i] for i in index[start : start + self.chunk]]


class EpochCPU(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.process_time() - self.started


def lightning_ms(same: SameLevers, precision: str, args, chunk: int, idle_callbacks: int = 0) -> float:
    timer = EpochCPU()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *(pl.Callback() for _ in range(idle_callbacks))],
        precision=precision,
        accelerator="cpu",
        devices=1,
    )
    batches = Batches(same.images, args.batch_size, args.steps, chunk)
    trainer.fit(Bare(same, chunk), train_dataloaders=batches)
    if trainer.global_step != args.steps:  # Lightning counts optimizer steps: one per batch in both modes
        raise SystemExit(f"chunk {chunk}: {trainer.global_step} optimizer steps, not {args.steps}")
    return timer.seconds / args.steps * 1e3


def plain_ms(same: SameLevers, args) -> float:
    same.max_batches, same.batch_size = args.steps, args.batch_size
    epoch = same.epoch()
    return epoch.cpu_parts["steps"] / epoch.steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--callbacks", type=int, default=0, help="also the automatic loop with this many idle callbacks")
    parser.add_argument("--quick", action="store_true", help="a few steps, one repeat: for the tests")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 16, 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train([f"batch_size={args.batch_size}"], Path(tmp) / "run")
        same = SameLevers(cfg, args.batch_size, quick=False)
        loops = {
            "same-levers": lambda: plain_ms(same, args),
            "Lightning, automatic": lambda: lightning_ms(same, str(cfg.trainer.precision), args, 0),
            f"Lightning, manual, {args.chunk} steps a call": lambda: lightning_ms(
                same, str(cfg.trainer.precision), args, args.chunk
            ),
        }
        if args.callbacks:
            loops[f"Lightning, automatic, {args.callbacks} idle callbacks"] = lambda: lightning_ms(
                same, str(cfg.trainer.precision), args, 0, args.callbacks
            )
        times: dict[str, list[float]] = {name: [] for name in loops}
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            for _ in range(args.repeats + 1):  # the first round warms up and is dropped
                for name, loop in loops.items():
                    times[name].append(loop())
    print(f"batch {args.batch_size}, {args.steps} steps, {args.repeats} repeats, precision {cfg.trainer.precision}, one thread")
    plain = times["same-levers"][1:]
    for name, values in times.items():
        values = values[1:]
        line = f"{name}: {statistics.median(values):.3f} ms/step CPU ({min(values):.3f}-{max(values):.3f})"
        if name != "same-levers":
            over = [v - p for v, p in zip(values, plain)]
            line += f"; over same-levers {statistics.median(over):.3f} ms ({min(over):.3f}-{max(over):.3f})"
        print(line)


if __name__ == "__main__":
    main()
