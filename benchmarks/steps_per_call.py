"""What several optimizer steps per Lightning call save (conf/train.yaml's steps_per_call), in short alternated turns.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/steps_per_call.py [--batch-size 8] [--steps 300] [--rounds 12] [--quick]

Five loops train the default model (conf/model/dense.yaml) on vaelab's in-memory training images, taking turns of
--steps training steps each (no validation), --rounds times, in one process on one torch thread:
- plain: vaelab's VAE and its loss (VAE.training_loss), the config's optimizer (fused Adam) and precision (bf16
  autocast where the CPU has it), batches gathered from the in-memory tensors: no Lightning;
- bare Trainer, N a call: the same VAEModule in a Trainer with no callback, logger or checkpoint, N steps a call (N:
  conf/train.yaml's steps_per_call, the default);
- vaelab, N a call and vaelab, 1 a call: vaelab-train's own trainer (vaelab.commands.train.build_parts: every default
  callback, the TensorBoard logger, checkpoints) with steps_per_call N and 1;
- vaelab, N a call, step hooks: the same with one more callback that has an (empty) on_after_backward, so each step
  goes through Lightning's manual_backward and optimizer step and their hook dispatches (VAEModule's direct steps off).
A Lightning turn is one fit of one epoch of --steps batches on a trainer built for it (the build is not timed). It
prints each loop's CPU milliseconds per step and, per loop, the median (and range) over the rounds after the first
of its difference from the plain loop's turn in the same round: turns this short keep a burst of load on a shared
machine to few of them. docs/performance.md has the figures.
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
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_time import compose_train  # noqa: E402  the config, as epoch_time builds it

from vaelab.runs.hardware import gpus_hidden  # noqa: E402


class EpochClock(pl.Callback):
    """CPU milliseconds per step of each training epoch."""

    def __init__(self, steps: int):
        self.steps, self.ms = steps, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ms.append((time.process_time() - self.started) / self.steps * 1e3)


class StepHook(pl.Callback):
    """A callback with its own (empty) step hook: Lightning's backward and optimizer step then dispatch every step hook
    to every callback, as they do for any run with such a callback (VAEModule's direct steps are off)."""

    def on_after_backward(self, trainer, pl_module) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="5 steps a turn, 2 rounds: for the tests")
    args = parser.parse_args()
    # Every loop as vaelab-train trains on the CPU: with no GPU visible (vaelab.runs.hardware.gpus_hidden).
    with tempfile.TemporaryDirectory() as folder, gpus_hidden(True):  # the turns' run directories: removed at the end
        measure(args, Path(folder))


def measure(args, tmp: Path) -> None:
    """The alternated turns, their run directories under tmp, and the report."""
    steps, rounds = (5, 2) if args.quick else (args.steps, args.rounds)
    torch.set_num_threads(1)
    import vaelab.commands.train as command
    from vaelab.runs.resume import Start
    from vaelab.training.data import LightningData

    limits = [f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"]
    cfg = compose_train([f"batch_size={args.batch_size}", "threads=1", "epochs=1", *limits], tmp / "run")
    cfg.callbacks.training_budget.min_steps = None  # a turn is a few hundred steps by design

    def vaelab_trainer(steps_per_call: int, turn: int):
        datamodule, model, trainer = command.build_parts(Start(cfg, tmp / f"vaelab{steps_per_call}-{turn}"))
        model.steps_per_call = steps_per_call
        return datamodule, model, trainer

    def bare_trainer(steps_per_call: int, turn: int):
        model = instantiate(cfg.model)
        model.steps_per_call = steps_per_call
        quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer = pl.Trainer(
            max_epochs=1, limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0,
            precision=cfg.trainer.precision, default_root_dir=str(tmp / f"bare-{turn}"), **quiet,
        )  # fmt: skip
        return LightningData(instantiate(cfg.data)), model, trainer

    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup()
    images, vae = data.train_set[0], instantiate(cfg.model).vae
    optimizer = instantiate(cfg.model.optimizer)(params=vae.parameters())
    bf16 = str(cfg.trainer.precision) == "bf16-mixed"

    def plain_turn() -> float:
        order = torch.randperm(len(images))[: steps * args.batch_size].split(args.batch_size)
        started = time.process_time()
        for index in order:
            x = images.index_select(0, index)  # as vaelab.data.tensors.TensorBatches gathers
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                target = vae.target(x)  # as VAEModule: one target for input and reconstruction
                loss = vae.training_loss(target, target)
            loss.backward()
            optimizer.step()
        return (time.process_time() - started) / len(order) * 1e3

    def lightning_turn(build, turn: int, *extra: pl.Callback) -> float:
        datamodule, model, trainer = build(turn)
        clock = EpochClock(steps)
        trainer.callbacks[:0] = [clock, *extra]
        trainer.fit(model, datamodule=datamodule)
        if trainer.global_step != steps:
            raise SystemExit(f"a turn made {trainer.global_step} optimizer steps, not {steps}")
        return clock.ms[-1]

    n = int(cfg.steps_per_call)  # the default
    loops = {
        f"bare Trainer, {n} a call": lambda turn: lightning_turn(lambda t: bare_trainer(n, t), turn),
        f"vaelab, {n} a call": lambda turn: lightning_turn(lambda t: vaelab_trainer(n, t), turn),
        f"vaelab, {n} a call, step hooks": lambda turn: lightning_turn(lambda t: vaelab_trainer(n, t), turn, StepHook()),
        "vaelab, 1 a call": lambda turn: lightning_turn(lambda t: vaelab_trainer(1, t), turn),
    }
    ms = {name: [] for name in ["plain", *loops]}
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # Lightning's lines, not the figures
        for turn in range(rounds):
            ms["plain"].append(plain_turn())
            for name, run in loops.items():
                ms[name].append(run(turn))
            print(f"round {turn + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in ms.items()), file=sys.__stdout__)
    counted = slice(1, None) if rounds > 1 else slice(None)  # the first round warms each loop up
    print(f"batch {args.batch_size}, {steps} steps a turn, {rounds} rounds; CPU ms per step, median (min-max):")
    for name, values in ms.items():
        values = values[counted]
        line = f"{name}: {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        if name != "plain":
            over = [a - b for a, b in zip(values, ms["plain"][counted])]
            line += f"; over plain {statistics.median(over):.3f} ({min(over):.3f}-{max(over):.3f})"
        print(line)


if __name__ == "__main__":
    main()
