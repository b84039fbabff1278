"""What vaelab-train prints (vaelab.training.console), in-process: the line per epoch against the figures it reports,
the final table against hand-written rows, Lightning's clutter silenced by its own text only, the bar on a terminal only.
(The whole console of a run from the shell: tests/commands/test_train.py.)"""

import io
import logging
import math
import re
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from conftest import dense_vae
from vaelab.data.tensors import TensorBatches
from vaelab.training.console import Console, ProgressBar, figures_table, silence_clutter


class Record(pl.Callback):
    """Each training step's loss, and the validation -ELBO each epoch ends with."""

    def __init__(self):
        self.losses, self.nelbo = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[-1].append(outputs["loss"].item())

    def on_train_epoch_end(self, trainer, pl_module):
        self.nelbo.append((trainer.callback_metrics["val/nelbo"].item(), trainer.callback_metrics["val/nelbo_bpd"].item()))


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def listen(name: str) -> Lines:
    """The messages of one logger (a handler on it: Lightning's loggers may not propagate to the root)."""
    handler = Lines()
    logging.getLogger(name).addHandler(handler)
    logging.getLogger(name).setLevel(logging.INFO)
    return handler


def test_a_line_per_epoch_says_the_mean_training_loss_and_the_validation_figures_and_no_clutter(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(40, 1, 4, 4)
    data = lambda: TensorBatches(x, torch.zeros(40), batch_size=10, shuffle=False)  # noqa: E731
    console, lightning, record = listen("vaelab.training.console"), listen("pytorch_lightning"), Record()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path),  # a logger, and epochs of 4 batches under log_every_n_steps=50: Lightning would warn
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Console(), record],
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_clutter()
        module = dense_vae()
        trainer.fit(module, train_dataloaders=data(), val_dataloaders=data())
    logging.getLogger("vaelab.training.console").removeHandler(console)
    logging.getLogger("pytorch_lightning").removeHandler(lightning)
    model, *epochs = console.lines
    parameters = sum(p.numel() for p in module.vae.parameters())
    assert model == f"model: custom VAE, latent 3, bernoulli likelihood, objective elbo, {parameters} parameters"
    assert len(epochs) == 2
    for epoch, (line, losses, (nelbo, bpd)) in enumerate(zip(epochs, record.losses, record.nelbo)):
        assert bpd == pytest.approx(nelbo / (16 * math.log(2)), rel=1e-6)  # 16 pixels
        said = re.fullmatch(
            rf"epoch {epoch} \| train loss (\S+) \| val -ELBO (\S+) nats/image, (\S+) bits/dim \| \d+\.\d s", line
        )
        assert said, line
        assert [float(v) for v in said.groups()] == pytest.approx([sum(losses) / 4, nelbo, bpd], abs=6e-3)
    messages = [str(w.message) for w in seen] + lightning.lines
    assert not [m for m in messages if "log_every_n_steps" in m or "LeafSpec" in m or "litlogger" in m], messages
    assert any(m.startswith("GPU available") for m in lightning.lines)  # Lightning's other lines are not silenced


def test_the_filters_name_their_messages_and_nothing_else():
    from pytorch_lightning.utilities._pytree import _tree_flatten
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    fit_loop = {"category": PossibleUserWarning, "filename": "fit_loop.py", "module": "pytorch_lightning.loops.fit_loop"}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_clutter()
        _tree_flatten(1)  # Lightning builds a LeafSpec: torch's deprecation warning, silenced
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "mine.py", 1, module="mine")
        warnings.warn_explicit("The number of training batches (3) is smaller than the logging interval", lineno=1, **fit_loop)
        warnings.warn_explicit("The 'train_dataloader' does not have many workers", lineno=2, **fit_loop)
        checkpoint = {"category": UserWarning, "filename": "model_checkpoint.py", "module": "pytorch_lightning.callbacks"}
        warnings.warn_explicit("Checkpoint directory /r/checkpoints exists and is not empty.", lineno=3, **checkpoint)
        warnings.warn_explicit("Checkpoint directory /r/checkpoints is not writable.", lineno=4, **checkpoint)
    assert [(w.category, w.filename, w.lineno) for w in seen] == [
        (FutureWarning, "mine.py", 1),
        (PossibleUserWarning, "fit_loop.py", 2),
        (UserWarning, "model_checkpoint.py", 4),
    ]


def test_the_final_table_has_the_figures_with_their_units():
    metrics = {
        "val/loss": 367.787,
        "val/nelbo": 367.787,
        "val/nelbo_bpd": 0.676791,
        "test/nelbo": 369.4917,
        "test/nelbo_bpd": 0.679928,
        "test/nll_iwae": 351.596,
        "test/nll_iwae_bpd": 0.646997,
        "test/loss": 369.4917,
        "val/new_figure": 1.5,
    }
    table = figures_table(metrics, "nats per image; Bernoulli on grey levels, not a density", "elbo")
    assert table.splitlines() == [
        "final figures (Bernoulli on grey levels, not a density); val: the last epoch, test: the best checkpoint",
        "                               val      test  unit",
        "  loss (recon + beta KL)    367.79    369.49  nats/image",
        "  -ELBO (recon + KL)        367.79    369.49  nats/image",
        "  -log p(x), IWAE                -    351.60  nats/image",
        "  -ELBO                     0.6768    0.6799  bits/dim",
        "  -log p(x), IWAE                -    0.6470  bits/dim",
        "  new_figure                1.5000         -",
    ]
    notebook = figures_table({"val/loss": 0.690806, "test/loss": 0.690907}, "nats per image; notebook", "notebook")
    assert notebook.splitlines()[-1] == "  loss (recon + beta KL)    0.6908    0.6909  the notebook's per-pixel loss"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a pipe, a log file
    assert ProgressBar().is_disabled
    monkeypatch.setattr(sys, "stdout", Terminal())
    bar = ProgressBar(refresh_rate=10)
    assert bar.is_enabled and bar.refresh_rate == 10


def test_the_bar_is_redrawn_whenever_its_count_passes_a_multiple_of_the_refresh_rate(monkeypatch, tmp_path):
    """A call of several steps moves the count by several batches: Lightning's rule (a count landing on a multiple)
    would redraw a bar of 30 batches in calls of 7 only at its end."""
    monkeypatch.setattr(sys, "stdout", Terminal())

    class Drawn(ProgressBar):
        counts: list[int] = []

        def on_train_batch_end(self, *args):
            before = self.train_progress_bar.n
            super().on_train_batch_end(*args)
            if self.train_progress_bar.n != before:
                self.counts.append(self.train_progress_bar.n)

    bar = Drawn(refresh_rate=10)
    module = dense_vae()
    module.steps_per_call = 7
    images = torch.rand(60, 1, 4, 4)
    trainer = pl.Trainer(
        max_epochs=1, log_every_n_steps=50, callbacks=[bar], logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(module, train_dataloaders=TensorBatches(images, torch.zeros(60), batch_size=2, shuffle=False))
    assert bar.counts == [14, 21, 30]  # calls end at 7, 14, 21, 28, 30
