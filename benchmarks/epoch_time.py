"""Seconds per training epoch: vaelab against a hand-written PyTorch loop and that loop with vaelab's levers,
alternated epoch by epoch in one process, with vaelab's epoch broken into its parts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/epoch_time.py [--batch-sizes 128 32] [--repeats 5] [--threads 1]
        [--run [--run-repeats 3]] [--default-run [--default-runs 2]] [--no-loops] [--train-batches N] [--quick]

The loops train the default model (conf/model/dense.yaml, its networks built from the config) on the same 55,000
Fashion-MNIST training images, then validate on the same 5,000, every epoch:
- hand-written: pytorch/examples' VAE loop (vae/main.py) around those networks: torchvision's FashionMNIST through a
  shuffled DataLoader (ToTensor per image), Adam with its defaults, fp32, loss.item() every step, a line printed every
  10 batches, validation in batches of the training size, and its two pictures saved every epoch;
- same-levers: that loop with the levers vaelab pulls: vaelab's in-memory tensors gathered into batches
  (index_select), the configured optimizer (fused Adam), vaelab's Bernoulli NLL (BCE-with-logits without torch's slow
  CPU log1p), vaelab's precision (bf16 autocast where the CPU has bf16 instructions), no host sync per step,
  inference mode, validation in data.eval_batch_size batches computing what vaelab's does (the loss, its parts, the
  noisy-input error); no pictures, checkpoints or logging;
- vaelab: vaelab.commands.train.train() on the default config, its parts built by vaelab-train's own build_parts
  (every default callback, picture, checkpoint, the TensorBoard logger), in this process. Its output goes to
  /dev/null, so its progress bar is off, as in any run whose output goes to a file or a pipe.
They alternate A B C A B C ...: the other two run their epoch k at the start of vaelab's epoch k, in time charged to
none of vaelab's epochs (EpochTiming.paused). Epoch 0 warms each loop up and is not counted. All run on --threads
torch threads, with no GPU visible, as vaelab-train trains on the CPU (vaelab.runs.hardware.gpus_hidden; a loop without
Lightning does not pay the per-step CUDA check that Lightning's PYTORCH_NVML_BASED_CUDA_CHECK makes slow either).
vaelab.training.timing.EpochTiming, first among the trainer's callbacks, breaks vaelab's epochs into parts; the
same-levers and hand-written loops time the same parts of theirs (forward, backward, optimizer, batch fetch,
validation) with perf_counter.

--train-batches N: each loop trains N batches an epoch (vaelab: trainer.limit_train_batches=N), validating in full: the
turns are shorter, so a burst of load on a shared machine falls on fewer of them and the per-step figures steady (the
epoch-end shares are then of the shorter epoch).

vaelab validates every epoch here (trainer.check_val_every_n_epoch=1), as the other two loops do, so the three epochs
hold the same work. vaelab-train's default validates every 5 epochs and in the last: --default-run measures that.

--default-run: vaelab-train's default run itself (10 epochs of batch 128, validation in epochs 5 and 10), in this
process with EpochTiming, --default-runs times: what its epoch ends (validation, pictures, checkpoints, TensorBoard
writes) cost over the whole run, as a share of its epochs (issue 21, point 2).

--run: a whole run, alternated: `vaelab-train epochs=1` (with and without its test stage) against importing what it
imports and against one epoch of the same-levers loop in a fresh process (issue 21, point 4).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from vaelab import CONF_DIR
from vaelab.data.tensors import seeded_order
from vaelab.model.likelihoods import bernoulli_nll
from vaelab.runs.hardware import gpus_hidden
from vaelab.training.timing import BACKWARD, BETWEEN, EPOCH_END, FORWARD, OPTIMIZER, STEPS, VALIDATION, EpochTiming

REPO = Path(__file__).resolve().parents[1]
LOOPS = ("hand-written", "same-levers", "vaelab")
QUICK = {"train": 20, "val": 2, "test": 1}  # --quick: batches per epoch of each stage
HAND_PICTURES = f"{EPOCH_END}/pictures: save_image (hand-written)"
OUT = sys.stdout  # the report (vaelab's own output goes to /dev/null while it trains)


def say(*lines: str) -> None:
    print(*lines, sep="\n", file=OUT, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(threads: int) -> str:
    from pytorch_lightning import __version__ as pl_version

    from vaelab.runs.hardware import cpu_has_bf16, cpu_precision

    names = [
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
    ]
    return (
        f"machine: {names[0] if names else '?'}, {os.cpu_count()} cores, bf16 instructions: {'yes' if cpu_has_bf16() else 'no'} "
        f"(vaelab's CPU precision: {cpu_precision()}); torch {torch.__version__}, pytorch-lightning {pl_version}; "
        f"{threads} torch thread(s); load average {load()}"
    )


def compose_train(overrides: list[str], output_dir: Path):
    import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers the configs use

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


def quick_overrides(quick: bool, train_batches: int | None = None) -> list[str]:
    """vaelab's batch limits: --quick's, and --train-batches' (which also sets --quick's training batches)."""
    limits = {**(QUICK if quick else {}), **({"train": train_batches} if train_batches else {})}
    return [f"trainer.limit_{stage}_batches={n}" for stage, n in limits.items()]


@dataclass
class Epoch:
    """One epoch of one loop: wall seconds by "<group>/<part>", CPU seconds (the process's) by group, training steps."""

    parts: dict[str, float]
    cpu_parts: dict[str, float]
    steps: int

    def seconds(self, kind: str = "wall", group: str | None = None) -> float:
        values = self.parts if kind == "wall" else self.cpu_parts
        return sum(v for k, v in values.items() if group is None or k.split("/")[0] == group)


class BareLoop:
    """What the two hand-made loops share: the config's networks, seeded; an epoch timed part by part."""

    def __init__(self, cfg, batch_size: int, quick: bool, train_batches: int | None = None):
        torch.manual_seed(cfg.seed)
        network = lambda key: instantiate(OmegaConf.to_container(cfg.model[key], resolve=True))  # noqa: E731
        self.encoder, self.decoder = network("encoder"), network("decoder")
        self.params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.batch_size, self.latent = batch_size, int(cfg.model.latent_dim)
        self.max_batches = train_batches or (QUICK["train"] if quick else None)
        self.val_images = QUICK["val"] * int(cfg.data.eval_batch_size) if quick else int(cfg.data.val_size)

    def lap(self, part: str) -> None:
        """Charge the time since the last lap to `part`."""
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now

    def epoch(self) -> Epoch:
        self.parts, self.last, start = {}, time.perf_counter(), time.process_time()
        self.encoder.train(), self.decoder.train()
        steps = self.train_steps()
        middle = time.process_time()
        self.encoder.eval(), self.decoder.eval()
        self.validate()
        return Epoch(self.parts, {STEPS: middle - start, EPOCH_END: time.process_time() - middle}, steps)


class HandWritten(BareLoop):
    """pytorch/examples' vae/main.py, around the config's networks, on vaelab's split of the training images."""

    def __init__(self, cfg, batch_size: int, quick: bool, picture_dir: Path, train_batches: int | None = None):
        super().__init__(cfg, batch_size, quick, train_batches)
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        dataset = datasets.FashionMNIST(str(REPO / "data"), train=True, transform=transforms.ToTensor())
        order = seeded_order(len(dataset), int(cfg.data.split_seed)).tolist()  # as vaelab.data.mnist splits it
        train_set, val_set = Subset(dataset, order[int(cfg.data.val_size) :]), Subset(dataset, order[: self.val_images])
        self.train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
        self.val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False)
        self.optimizer = torch.optim.Adam(self.params, lr=1e-3)
        self.picture_dir, self.count, self.sink = picture_dir, 0, open(os.devnull, "w")  # noqa: SIM115

    def forward(self, data):
        mu, logvar = self.encoder(data)
        logits = self.decoder(mu + torch.randn_like(mu) * torch.exp(0.5 * logvar))
        bce = F.binary_cross_entropy_with_logits(logits, data, reduction="sum")
        return logits, bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    def train_steps(self) -> int:
        self.count += 1
        train_loss, steps = 0.0, 0
        for batch_idx, (data, _) in enumerate(self.train_loader):
            self.lap(f"{STEPS}/{BETWEEN}")
            self.optimizer.zero_grad()
            _, loss = self.forward(data)
            self.lap(f"{STEPS}/{FORWARD}")
            loss.backward()
            train_loss += loss.item()
            self.lap(f"{STEPS}/{BACKWARD}")
            self.optimizer.step()
            self.lap(f"{STEPS}/{OPTIMIZER}")
            if batch_idx % 10 == 0:
                print(f"Train Epoch: {self.count} [{batch_idx * len(data)}]\tLoss: {loss.item() / len(data):.6f}", file=self.sink)
            steps += 1
            if steps == self.max_batches:
                break
        self.lap(f"{STEPS}/{BETWEEN}")
        return steps

    def validate(self) -> None:
        from torchvision.utils import save_image

        test_loss = 0.0
        with torch.no_grad():
            for i, (data, _) in enumerate(self.val_loader):
                logits, loss = self.forward(data)
                test_loss += loss.item()
                self.lap(f"{EPOCH_END}/{VALIDATION}")
                if i == 0:
                    n = min(data.size(0), 8)
                    comparison = torch.cat([data[:n], torch.sigmoid(logits)[:n]])
                    save_image(comparison, self.picture_dir / f"reconstruction_{self.count}.png", nrow=n)
                    self.lap(HAND_PICTURES)
            sample = torch.sigmoid(self.decoder(torch.randn(64, self.latent)))
            save_image(sample.view(64, 1, 28, 28), self.picture_dir / f"sample_{self.count}.png")
        self.lap(HAND_PICTURES)


class SameLevers(BareLoop):
    """The hand-written loop with vaelab's levers, on vaelab's own in-memory tensors."""

    def __init__(self, cfg, batch_size: int, quick: bool, train_batches: int | None = None):
        super().__init__(cfg, batch_size, quick, train_batches)
        data = instantiate(cfg.data)
        data.prepare_data()
        data.setup()
        self.images, self.val = data.train_set[0], data.val_set[0][: self.val_images]
        self.eval_batch_size, self.noise = int(cfg.data.eval_batch_size), float(cfg.model.noise_factor)
        self.optimizer = instantiate(cfg.model.optimizer)(params=self.params)  # the config's: fused Adam
        if str(cfg.trainer.precision) not in ("bf16-mixed", "32-true", "32"):
            raise ValueError(f"trainer.precision={cfg.trainer.precision}: this benchmark knows bf16-mixed and 32-true")
        bf16 = str(cfg.trainer.precision) == "bf16-mixed"  # Lightning's CPU bf16-mixed: this autocast around the steps
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.generator = torch.Generator().manual_seed(int(cfg.seed))

    def losses(self, x_in, target):
        """vaelab's -ELBO and its parts: batch means, in fp32 from the decoder's logits."""
        mu, logvar = self.encoder(x_in)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        logits, mu, logvar = self.decoder(z).float(), mu.float(), logvar.float()
        recon = bernoulli_nll(logits, target).mean()  # vaelab's (a lever too: BCE-with-logits without log1p)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()
        return recon + kl, recon, kl

    def train_steps(self) -> int:
        batches = torch.randperm(len(self.images), generator=self.generator).split(self.batch_size)[: self.max_batches]
        for index in batches:
            x = self.images.index_select(0, index)  # as vaelab.data.tensors.TensorBatches gathers
            self.lap(f"{STEPS}/{BETWEEN}")
            self.optimizer.zero_grad()
            with self.autocast():
                loss = self.losses(x, x)[0]
            self.lap(f"{STEPS}/{FORWARD}")
            loss.backward()
            self.lap(f"{STEPS}/{BACKWARD}")
            self.optimizer.step()
            self.lap(f"{STEPS}/{OPTIMIZER}")
        return len(batches)

    def validate(self) -> None:
        sums = torch.zeros(4)
        with torch.inference_mode(), self.autocast():
            for x in self.val.split(self.eval_batch_size):
                loss, recon, kl = self.losses(x, x)
                noisy = (x + self.noise * torch.randn_like(x)).clamp_(0.0, 1.0)
                sums += torch.stack([loss, recon, kl, self.losses(noisy, x)[1]]) * len(x)
        (sums / len(self.val)).tolist()  # the epoch's figures, as vaelab's MeanMetrics compute them
        self.lap(f"{EPOCH_END}/{VALIDATION}")


class Alternate(EpochTiming):
    """vaelab's timing; at the start of each of vaelab's epochs, paused, an epoch of each other loop."""

    def __init__(self, loops: dict, batch_size: int):
        super().__init__()
        self.loops, self.batch_size = loops, batch_size
        self.results: dict[str, list[Epoch]] = {name: [] for name in LOOPS}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        with self.paused():
            self.collect(len(self.epochs) - 1)
            for name, loop in self.loops.items():
                with torch.random.fork_rng(devices=[]):  # vaelab's draws stay as they would be without these loops
                    self.results[name].append(loop.epoch())

    def collect(self, finished: int) -> None:
        """vaelab's epochs before `finished` into the results, with a line for each round."""
        for k in range(len(self.results["vaelab"]), finished):
            self.results["vaelab"].append(Epoch(self.epochs[k], self.cpu[k], self.steps[k]))
            wall = {name: self.results[name][k].seconds() for name in LOOPS}
            say(
                f"batch {self.batch_size}, {'warm-up' if k == 0 else f'repeat {k}'}: "
                + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in wall.items())
                + f" (vaelab / hand-written {wall['vaelab'] / wall['hand-written']:.2f}x, "
                f"vaelab / same-levers {wall['vaelab'] / wall['same-levers']:.2f}x); load {load()}"
            )


def train_timed(cfg, timing: EpochTiming) -> None:
    """vaelab.commands.train.train(cfg) in this process, its output to /dev/null, with `timing` first among the
    callbacks of the trainer vaelab-train builds (its own build_parts)."""
    import vaelab.commands.train as command

    build_parts = command.build_parts

    def timed_parts(start):
        datamodule, model, trainer = build_parts(start)
        trainer.callbacks.insert(0, timing)
        return datamodule, model, trainer

    command.build_parts = timed_parts
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            command.train(cfg)
    finally:
        command.build_parts = build_parts


def measure(batch_size: int, args) -> tuple[dict[str, list[Epoch]], dict[str, float]]:
    """The three loops alternated, repeats + 1 epochs each (the first, a warm-up, dropped); vaelab's time outside
    its epochs."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"batch_size={batch_size}", f"epochs={args.repeats + 1}", f"threads={args.threads}"]
        overrides.append("trainer.check_val_every_n_epoch=1")  # every epoch, as the other loops: the same work
        cfg = compose_train(overrides + quick_overrides(args.quick, args.train_batches), Path(tmp) / "run")
        (Path(tmp) / "hand").mkdir()
        loops = {
            "hand-written": HandWritten(cfg, batch_size, args.quick, Path(tmp) / "hand", args.train_batches),
            "same-levers": SameLevers(cfg, batch_size, args.quick, args.train_batches),
        }
        timing = Alternate(loops, batch_size)
        started = time.perf_counter()
        train_timed(cfg, timing)
        ended = time.perf_counter()
        timing.collect(len(timing.epochs))
    outside = {
        "before the first epoch (data, model, trainer, sanity check)": timing.started_at - started,
        "after the last epoch (end of training, the test stage, metrics.json)": ended - timing.ended_at,
    }
    outside["the timing's own cost per epoch, in vaelab's figures (about)"] = statistics.median(
        map(timing.overhead, range(1, len(timing.epochs)))
    )
    return {name: epochs[1:] for name, epochs in timing.results.items()}, outside


# --- the report ---------------------------------------------------------------------------------------------------
PART_ORDER = (FORWARD, BACKWARD, OPTIMIZER, BETWEEN, VALIDATION, "pictures", "checkpoint", "logging", "progress", "callback")
# (figure, its value from one repeat's hand-written, same-levers and vaelab epochs for "wall" or "cpu"; digits, unit, target)
RATIOS = (
    ("vaelab / hand-written", lambda h, s, v, t: v.seconds(t) / h.seconds(t), 2, "x", "<= 1.00x"),
    ("vaelab / same-levers", lambda h, s, v, t: v.seconds(t) / s.seconds(t), 2, "x", "<= 1.10x"),
    ("framework cost per step, whole epoch: (vaelab - same-levers) / steps", lambda h, s, v, t: step_ms(s, v, t), 3, " ms", ""),
    ("framework cost per step, training steps only", lambda h, s, v, t: step_ms(s, v, t, STEPS), 3, " ms", "<= 0.3 ms"),
)


def step_ms(same: Epoch, vaelab: Epoch, kind: str, group: str | None = None) -> float:
    return 1e3 * (vaelab.seconds(kind, group) - same.seconds(kind, group)) / vaelab.steps


def spread(values, digits: int = 2, unit: str = "") -> str:
    """The median and, in brackets, the least and the largest."""
    values = list(values)
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def per_repeat(results: dict[str, list[Epoch]], fn) -> list[float]:
    """fn(hand-written, same-levers, vaelab) of each repeat's three epochs."""
    return [fn(*epochs) for epochs in zip(*(results[name] for name in LOOPS))]


def report_loops(measured: dict[int, tuple]) -> None:
    say("", "| batch | loop | steps | s/epoch, wall | s/epoch, CPU | training steps, wall s | training steps, CPU s |")
    say("|---|---|---|---|---|---|---|")
    for batch, (results, _) in measured.items():
        for loop in LOOPS:
            cells = [spread(e.seconds(kind, group) for e in results[loop]) for group in (None, STEPS) for kind in ("wall", "cpu")]
            say(f"| {batch} | {loop} | {results[loop][0].steps} | " + " | ".join(cells) + " |")
    say("", "| batch | figure | wall | CPU | issue 21 target |", "|---|---|---|---|---|")
    for batch, (results, _) in measured.items():
        for name, fn, digits, unit, target in RATIOS:
            cells = [
                spread(per_repeat(results, lambda h, s, v, t=t, fn=fn: fn(h, s, v, t)), digits, unit) for t in ("wall", "cpu")
            ]
            say(f"| {batch} | {name} | {cells[0]} | {cells[1]} | {target} |")


def row_order(key: str) -> tuple:
    group, part = key.split("/", 1)
    return group != STEPS, next((i for i, start in enumerate(PART_ORDER) if part.startswith(start)), len(PART_ORDER)), part


def report_breakdown(batch: int, results: dict[str, list[Epoch]], outside: dict[str, float]) -> None:
    """vaelab's epoch by part (medians over the repeats), beside the same parts of the other two loops; a subtotal after
    the parts of each kind (pictures, logging), and the parts under half a millisecond in every loop named below."""
    keys = sorted({key for epochs in results.values() for e in epochs for key in e.parts}, key=row_order)
    epoch = statistics.median(e.seconds() for e in results["vaelab"])
    say("", f"vaelab's epoch at batch {batch} by part: wall seconds per epoch, medians of {len(results['vaelab'])} repeats")
    say("| part | vaelab s/epoch | share of vaelab's epoch | same-levers s/epoch | hand-written s/epoch |\n|---|---|---|---|---|")
    rows, small, kinds = [], [], [key.split(":")[0] for key in keys]
    for i, key in enumerate(keys):
        rows.append((key, lambda e, key=key: e.parts.get(key, 0.0)))
        if ":" in key and kinds.count(kinds[i]) > 1 and kinds[i + 1 : i + 2] != [kinds[i]]:  # the last of its kind
            kind = kinds[i]
            rows.append((f"**{kind}: all**", lambda e, kind=kind: sum(v for k, v in e.parts.items() if k.startswith(kind))))
    rows += [
        (f"**{STEPS}: all**", lambda e: e.seconds("wall", STEPS)),
        (f"**{EPOCH_END}: all**", lambda e: e.seconds("wall", EPOCH_END)),
        ("**whole epoch**", lambda e: e.seconds()),
    ]
    for name, fn in rows:
        values = [statistics.median(map(fn, results[loop])) for loop in ("vaelab", "same-levers", "hand-written")]
        if max(values) < 5e-4:
            small.append(name)
        else:
            say(f"| {name} | {values[0]:.3f} | {100 * values[0] / epoch:.1f}% | {values[1]:.3f} | {values[2]:.3f} |")
    share = per_repeat(results, lambda h, s, v: 100 * v.seconds("wall", EPOCH_END) / v.seconds())
    beyond = per_repeat(
        results, lambda h, s, v: 100 * (v.seconds("wall", EPOCH_END) - s.seconds("wall", EPOCH_END)) / v.seconds()
    )
    say(
        "under 0.5 ms an epoch in every loop: " + ", ".join(name.strip("*") for name in small),
        f"vaelab's epoch end (validation, pictures, checkpoint writes, TensorBoard writes, Lightning): {spread(share, 1, '%')} of "
        f"its epoch (issue 21 point 2: <= 3%); beyond the same-levers loop's validation: {spread(beyond, 1, '%')}",
        "vaelab outside its epochs: " + "; ".join(f"{what} {seconds:.3f} s" for what, seconds in outside.items()),
    )


# --- the default run (--default-run) ---------------------------------------------------------------------------
def default_run(args) -> None:
    """vaelab-train with its defaults (at --threads), --default-runs times, each epoch timed by EpochTiming: the epoch
    ends over the whole run against its epochs, in all and by part."""
    runs = []
    for repeat in range(args.default_runs):
        timing = EpochTiming()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_train([f"threads={args.threads}", *quick_overrides(args.quick, args.train_batches)], Path(tmp) / "run")
            train_timed(cfg, timing)
        epochs = [Epoch(parts, cpu, steps) for parts, cpu, steps in zip(timing.epochs, timing.cpu, timing.steps, strict=True)]
        runs.append(epochs)
        validated = [k for k, e in enumerate(epochs) if e.parts.get(f"{EPOCH_END}/{VALIDATION}", 0.0) > 0]
        end, whole = sum(e.seconds("wall", EPOCH_END) for e in epochs), sum(e.seconds() for e in epochs)
        say(
            f"default run {repeat + 1}: {len(epochs)} epochs of {epochs[0].steps} steps in {whole:.2f} s, validation in "
            f"epochs {', '.join(str(k + 1) for k in validated)} (from 1); epoch ends {end:.3f} s, {100 * end / whole:.1f}% of "
            f"the epochs (issue 21 point 2: <= 3%); load {load()}"
        )
    keys = sorted({key for epochs in runs for e in epochs for key in e.parts if key.startswith(EPOCH_END)}, key=row_order)
    say("", f"the default run's epoch end by part: seconds an epoch (the run's sum over its epochs), medians of {len(runs)} runs")
    say("| part | s an epoch | share of the run's epochs |", "|---|---|---|")
    whole = statistics.median(sum(e.seconds() for e in epochs) / len(epochs) for epochs in runs)
    for name, fn in [
        *((key, lambda e, key=key: e.parts.get(key, 0.0)) for key in keys),
        (f"**{EPOCH_END}: all**", lambda e: e.seconds("wall", EPOCH_END)),
        ("**whole epoch**", lambda e: e.seconds()),
    ]:
        value = statistics.median(sum(map(fn, epochs)) / len(epochs) for epochs in runs)
        if value >= 5e-4:
            say(f"| {name} | {value:.3f} | {100 * value / whole:.1f}% |")


# --- a whole run (--run) ----------------------------------------------------------------------------------------
ENTRY_MODULES = ("vaelab.commands.cli", "vaelab.commands.train", "vaelab.runs.rundir", "vaelab.runs.sweep", "vaelab.runs.guards")


def import_statement(cfg) -> str:
    """What vaelab-train imports for the default run: its entry modules and the module of every _target_ in the config."""
    modules = {*ENTRY_MODULES, "vaelab.training.data", "torch.utils.tensorboard"}

    def walk(node) -> None:
        if isinstance(node, dict):
            modules.update([str(node["_target_"]).rpartition(".")[0]] if "_target_" in node else [])
            node = list(node.values())
        for value in node if isinstance(node, list) else ():
            walk(value)

    walk(OmegaConf.to_container(cfg, resolve=False))
    return "import " + ", ".join(sorted(modules))


def timed_process(command: list[str], threads: int) -> tuple[float, float, str]:
    """Wall and CPU seconds (its own and its children's) of a command, and its stdout."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), done.stdout


def run_costs(args) -> None:
    """Whole processes, alternated: the imports, one same-levers epoch, vaelab-train epochs=1 with and without its test."""
    batch, threads, quick = args.batch_sizes[0], args.threads, ["--quick"] * args.quick
    with tempfile.TemporaryDirectory() as tmp:
        statement = import_statement(compose_train([], Path(tmp)))
        train = [str(Path(sys.executable).parent / "vaelab-train"), "epochs=1", f"batch_size={batch}", f"threads={threads}"]
        train += quick_overrides(args.quick)
        commands = {
            "imports (python -c 'import <what vaelab-train imports>')": [sys.executable, "-c", statement],
            "one same-levers epoch, the first in its process (the epoch alone)": [
                *(sys.executable, __file__, "--same-levers-epoch", f"--batch-sizes={batch}", f"--threads={threads}", *quick)
            ],
            "vaelab-train epochs=1 (whole process)": train,
            "vaelab-train epochs=1 test_after_fit=false (whole process)": [*train, "test_after_fit=false"],
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for repeat in range(args.run_repeats):
            for i, (name, command) in enumerate(commands.items()):
                wall, cpu, stdout = timed_process(command + [f"hydra.run.dir={tmp}/run-{repeat}-{i}"] * (i >= 2), threads)
                if i == 1:  # the epoch's own figures
                    wall, cpu = (json.loads(stdout.strip().splitlines()[-1])[key] for key in ("wall", "cpu"))
                times[name].append((wall, cpu))
            say(f"per run, round {repeat + 1}: " + ", ".join(f"{n.split(' (')[0]} {t[-1][0]:.1f} s" for n, t in times.items()))
    say("", f"`{statement}`", "", f"| per run, batch {batch} | wall s | CPU s |", "|---|---|---|")
    for name, values in times.items():
        say(f"| {name} | {spread((w for w, _ in values), 1)} | {spread((c for _, c in values), 1)} |")
    imports, epoch, run, untested = times.values()
    for name, fn in (
        (
            "vaelab-train epochs=1 beyond imports + one epoch (issue 21 point 4: <= 3 s)",
            lambda k, t: run[k][t] - imports[k][t] - epoch[k][t],
        ),
        ("of which the test stage (with it - without it)", lambda k, t: run[k][t] - untested[k][t]),
    ):
        say(f"| {name} | " + " | ".join(spread((fn(k, t) for k in range(len(run))), 1) for t in (0, 1)) + " |")


def same_levers_epoch(args) -> None:
    """--same-levers-epoch (for --run): one epoch of the same-levers loop, its wall and CPU seconds as a JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train([f"batch_size={args.batch_sizes[0]}", f"threads={args.threads}"], Path(tmp))
    with gpus_hidden(True):  # as without Lightning's PYTORCH_NVML_BASED_CUDA_CHECK (vaelab-train hides them on the CPU)
        epoch = SameLevers(cfg, args.batch_sizes[0], args.quick).epoch()
    print(json.dumps({"wall": epoch.seconds("wall"), "cpu": epoch.seconds("cpu")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--repeats", type=int, default=None, help="measured epochs of each loop (default 5; --quick: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every loop (default 1: stable ratios)")
    parser.add_argument("--run", action="store_true", help="also the cost of a whole run (slow: minutes)")
    parser.add_argument("--run-repeats", type=int, default=None, help="rounds of --run (default 3; --quick: 1)")
    parser.add_argument("--default-run", action="store_true", help="also vaelab-train's default run, its epoch ends timed")
    parser.add_argument("--default-runs", type=int, default=2, help="runs of --default-run (default 2)")
    parser.add_argument("--no-loops", action="store_true", help="skip the alternated loops (with --run or --default-run)")
    parser.add_argument(
        "--train-batches",
        type=int,
        default=None,
        help="train this many batches an epoch in every loop: shorter turns, steadier step figures on a noisy machine",
    )
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK['train']} training batches an epoch")
    parser.add_argument("--same-levers-epoch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.run_repeats = args.run_repeats or (1 if args.quick else 3)
    if min(args.batch_sizes) < 1 or min(args.repeats, args.threads, args.run_repeats, args.default_runs) < 1:
        parser.error("--batch-sizes, --repeats, --run-repeats, --default-runs and --threads take positive numbers")
    torch.set_num_threads(args.threads)
    if args.same_levers_epoch:
        return same_levers_epoch(args)
    import logging

    for name in ("pytorch_lightning", "lightning_fabric"):  # their start-up lines, not the report
        logging.getLogger(name).setLevel(logging.WARNING)
    say(machine(args.threads), "")
    if not args.no_loops:
        measured = {batch: measure(batch, args) for batch in args.batch_sizes}
        report_loops(measured)
        for batch, (results, outside) in measured.items():
            report_breakdown(batch, results, outside)
    if args.default_run:
        say("")
        default_run(args)
    if args.run:
        say("")
        run_costs(args)
    say("", f"load average at the end: {load()}")


if __name__ == "__main__":
    main()
