"""What vaelab-train prints while it trains (conf/callbacks/default.yaml): one line on the model, one line per epoch,
and at the end (vaelab.commands.train) a small table of the final figures; the progress bar on a terminal only.

Lightning's clutter is silenced at its source: its model summary table (a FLOPs column of zeros without an example
input, a row for the internal eval_means metrics) is off (vaelab.commands.train.build_parts: Trainer(enable_model_summary=
False) unless trainer.enable_model_summary is set) and Console says the model in one line; six messages that say
nothing to a vaelab user are filtered by their own text (silence_clutter).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar

log = logging.getLogger(__name__)

NATS = "nats/image"
NOTEBOOK_UNIT = "the notebook's per-pixel loss"
# The rows of the final table, in this order: (metric key without its stage, label, unit); None: the run's unit.
ROWS = (
    ("loss", "loss (recon + beta KL)", None),
    ("nelbo", "-ELBO (recon + KL)", None),
    ("recon", "reconstruction", None),
    ("kl", "KL", None),
    ("noisy_recon", "noisy-input recon", None),
    ("nll_iwae", "-log p(x), IWAE", None),
    ("nelbo_bpd", "-ELBO", "bits/dim"),
    ("nll_iwae_bpd", "-log p(x), IWAE", "bits/dim"),
)


def silence_clutter() -> None:
    """Six messages of Lightning and torch that are noise in a vaelab run, each filtered by its own text."""
    # Lightning advertises its cloud logger to every run that does not use it.
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NotTheLitLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_NotTheLitLoggerTip())
    # torch 2.14 deprecates LeafSpec, which Lightning's own pytree helper still builds: nothing for a user to change.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning, module="pytorch_lightning"
    )
    # An epoch of fewer batches than log_every_n_steps: Lightning warns that the epoch logs nothing, but vaelab's module
    # logs train/loss every log_every_n_steps steps of the whole run (the global step), so small epochs log it too.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    # vaelab-resume continues a run in its own directory, whose checkpoints/ holds the run's checkpoints by design (a
    # new run never starts in a non-empty directory: vaelab.runs.rundir refuses it or moves it aside first).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty\.")
    # VAEModule.training_step takes Lightning's batch iterator (several optimizer steps a call), which Lightning calls
    # experimental, twice: the behaviour it relies on is pinned by vaelab's tests (tests/training/test_steps_per_call.py).
    warnings.filterwarnings("ignore", message=r"Found `dataloader_iter` argument in the `training_step`")
    warnings.filterwarnings("ignore", message=r"You are using the `dataloader_iter` step flavor")


class _NotTheLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


# At import: the callbacks below import this module in every process that trains, DDP's spawned workers included.
silence_clutter()


def unit_of(objective: str) -> str:
    return NOTEBOOK_UNIT if objective == "notebook" else NATS


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar (on stdout) when stdout is a terminal. In a log (CI, nohup, a pipe) none: its redraws would
    fill the log, and Console's line per epoch says what it would."""

    def __init__(self, refresh_rate: int = 10, **kwargs):
        super().__init__(refresh_rate=refresh_rate if sys.stdout.isatty() else 0, **kwargs)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        # A call of VAEModule's training_step makes several steps: redraw when the count passes a multiple of the
        # refresh rate, not only when it lands on one (Lightning's rule, which a count moving by several would skip).
        bar, done = self.train_progress_bar, batch_idx + 1
        if self.is_enabled and (done // self.refresh_rate > bar.n // self.refresh_rate or done == bar.total):
            bar.n = done
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class Console(Callback):
    """One line on the model when training starts, then per epoch: the mean training loss, the validation -ELBO and its
    bits/dim (the notebook's objective: its loss), and the epoch's seconds, validation included."""

    def __init__(self) -> None:
        self._started = 0.0
        self._loss_sum, self._batches, self._validated = None, 0, False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hp, parameters = pl_module.hparams, sum(p.numel() for p in pl_module.vae.parameters())
        if trainer.is_global_zero:
            what = f"{hp.name} VAE, latent {hp.latent_dim}, {hp.likelihood} likelihood, objective {hp.objective}"
            log.info("model: %s, %s parameters", what, f"{parameters:,}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._loss_sum, self._batches, self._validated = None, 0, False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        # VAEModule's training_step makes one or more steps a call: it returns their summed loss and count
        outputs = outputs if isinstance(outputs, dict) else {"loss": outputs}
        loss = outputs.get("loss_sum", outputs.get("loss"))
        if loss is not None:  # summed on the device: no host sync per step
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += int(outputs.get("steps", 1))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("%s", self.epoch_line(trainer, pl_module.vae.objective))

    def epoch_line(self, trainer: pl.Trainer, objective: str) -> str:
        parts = [f"epoch {trainer.current_epoch}"]
        if self._batches:
            parts.append(f"train loss {number(float(self._loss_sum) / self._batches)}")
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        if self._validated and "val/nelbo" in metrics:
            bpd = f", {metrics['val/nelbo_bpd']:.4f} bits/dim" if "val/nelbo_bpd" in metrics else ""
            parts.append(f"val -ELBO {number(metrics['val/nelbo'])} {NATS}{bpd}")
        elif self._validated and "val/loss" in metrics:
            parts.append(f"val loss {number(metrics['val/loss'])} ({unit_of(objective)})")
        parts.append(f"{time.perf_counter() - self._started:.1f} s")
        return " | ".join(parts)


def number(value: float) -> str:
    """A figure with the digits worth reading: 367.79, 0.6908."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def figure_rows(metrics: dict[str, float], objective: str) -> list[tuple[str, str, str, str]]:
    """The final val/* and test/* figures as rows (figure, val, test, unit), in ROWS' order, then any others: what the
    console's table and TensorBoard's TEXT table (vaelab.training.hparams) both show."""
    stages = ("val", "test")
    known = {key for key, _, _ in ROWS}
    rows = [(key, label, unit or unit_of(objective)) for key, label, unit in ROWS]
    others = sorted({k.split("/", 1)[1] for k in metrics if "/" in k and k.split("/", 1)[0] in stages} - known)
    rows += [(key, key, "") for key in others]
    shown = []
    for key, label, unit in rows:
        values = [metrics.get(f"{stage}/{key}") for stage in stages]
        if any(v is not None for v in values):
            cells = [("-" if v is None else f"{v:.4f}" if unit == "bits/dim" else number(v)) for v in values]
            shown.append((label, cells[0], cells[1], unit))
    return shown


def figures_table(metrics: dict[str, float], figures: str, objective: str) -> str:
    """The final figures for the console; metrics.json keeps them in full."""
    what = figures.removeprefix("nats per image; ")  # the unit column says it, beside bits/dim
    lines = [
        f"final figures ({what}); val: the last epoch, test: the best checkpoint",
        f"  {'':22}{'val':>10}{'test':>10}  unit",
    ]
    lines += [f"  {label:22}{val:>10}{test:>10}  {unit}".rstrip() for label, val, test, unit in figure_rows(metrics, objective)]
    return "\n".join(lines)
