"""Where each training epoch's time goes, measured inside a real run: `EpochTiming`, a Lightning callback.

    timing = EpochTiming()
    trainer = pl.Trainer(callbacks=[timing, *others], ...)   # first, so its epoch starts before the others' hooks
    trainer.fit(...)
    timing.epochs[k]   # {"<group>/<part>": wall seconds} of epoch k; the values add up to the epoch's wall time

Every moment from the first epoch's start to the end of training is charged to exactly one part of one epoch: to the
innermost timed call running (another callback's hook, a logger's method, a TensorBoard writer's add_* or flush), else
to the phase of the epoch the trainer is in. Groups: `steps` (the training batches: forward and loss, backward (from the
optimizer's zero_grad), the optimizer step, and fetching the next batch with Lightning's work between steps; under
automatic optimisation, as for gradient clipping, the optimizer step is charged to backward) and `epoch end`
(validation, and Lightning's work after it); a timed call is charged to the group it runs in, so a callback's per-step
hooks and its epoch-end hooks show apart. An epoch runs from this callback's on_train_epoch_start to the next one (or to
on_train_end). Time inside `paused()` is charged to nobody (a benchmark runs other loops there).

Each timed call costs about a microsecond or two, charged to the epoch like the rest; `overhead(k)` estimates how much
of epoch k that is. CPU seconds (the whole process) are kept per epoch and group in `cpu`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from vaelab.pictures.base import PictureCallback

STEPS, EPOCH_END = "steps", "epoch end"
FORWARD, BACKWARD, OPTIMIZER, BETWEEN = "forward and loss", "backward", "optimizer step", "batch fetch, Lightning"
VALIDATION, AFTER_VALIDATION = "validation", "Lightning after validation"
HOOKS = tuple(name for name in vars(pl.Callback) if name.startswith("on_")) + ("setup", "teardown", "state_dict")
LOGGER_METHODS = ("log_metrics", "log_hyperparams", "log_graph", "save", "finalize", "after_save_checkpoint")
WRITES = "logging (TensorBoard writes)"


def label_of(callback: pl.Callback) -> str:
    """The part a callback's hooks are charged to."""
    if isinstance(callback, PictureCallback):
        return f"pictures: {callback.name}"
    if isinstance(callback, Checkpoint):
        return "checkpoint writes"
    if isinstance(callback, ProgressBar):
        return "progress bar"
    return f"callback: {type(callback).__name__}"


class EpochTiming(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []  # wall seconds by "<group>/<part>", one dict per epoch
        self.cpu: list[dict[str, float]] = []  # process CPU seconds by group, one dict per epoch
        self.steps: list[int] = []  # optimizer steps per epoch
        self.charges: list[int] = []  # the timing's own charges per epoch (for `overhead`)
        self.started_at: float | None = None  # perf_counter() at the first epoch's start
        self.ended_at: float | None = None  # ... and at on_train_end
        self.charge_cost = 0.0  # seconds one charge costs (measured at setup)
        self._record: dict[str, float] = {}  # what is being charged: an epoch's, or a scratch dict outside the epochs
        self._stack: list[str | None] = []  # the keys of the timed calls running, innermost last; None: paused
        self._group, self._key = EPOCH_END, f"{EPOCH_END}/before training"  # the phase's group and key
        self._last = time.perf_counter()
        self._charges = 0
        self._cpu_record: dict[str, float] | None = None
        self._cpu_group: str | None = None
        self._cpu_last = time.process_time()
        self._wrapped = False
        self._step_hooks: list = []  # the optimizers' step hooks, while training
        self._optimizers: list = []  # the optimizers whose zero_grad is marked, while training

    # --- the accounting ---------------------------------------------------------------------------------------
    def _charge(self) -> None:
        """Charge the time since the last event to the innermost timed call running, else to the phase."""
        now = time.perf_counter()
        key = self._stack[-1] if self._stack else self._key
        if key is not None:
            self._record[key] = self._record.get(key, 0.0) + (now - self._last)
        self._last = now
        self._charges += 1

    def _cpu(self, group: str | None) -> None:
        """Charge the CPU time since the last switch to the current group, then switch to `group` (None: nobody's)."""
        now = time.process_time()
        if self._cpu_record is not None and self._cpu_group is not None:
            self._cpu_record[self._cpu_group] = self._cpu_record.get(self._cpu_group, 0.0) + now - self._cpu_last
        self._cpu_last, self._cpu_group = now, group

    def _enter_phase(self, group: str, phase: str) -> None:
        self._charge()
        self._group, self._key = group, f"{group}/{phase}"

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        method, keys = getattr(owner, name), {group: f"{group}/{label}" for group in (STEPS, EPOCH_END)}
        stack = self._stack

        def timed(*args, **kwargs):
            self._charge()
            stack.append(None if stack and stack[-1] is None else keys[self._group])
            try:
                return method(*args, **kwargs)
            finally:
                self._charge()
                stack.pop()

        setattr(owner, name, timed)

    def _close_epoch(self) -> None:
        """What the epoch ending now cost: its count of charges; its CPU time is charged up to now."""
        self._charge()
        self._cpu(None)
        if self.epochs:
            self.charges.append(self._charges)
        self._charges = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time charged to nobody while inside."""
        self._charge()
        self._stack.append(None)
        group = self._cpu_group
        self._cpu(None)
        try:
            yield
        finally:
            self._stack.pop()
            self._last = time.perf_counter()
            self._cpu(group)

    def overhead(self, epoch: int) -> float:
        """Seconds of epoch `epoch` that the timing itself cost: an estimate, its charges times their measured cost."""
        return self.charges[epoch] * self.charge_cost

    # --- what is timed ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped:  # setup runs again for the test stage
            return
        self._wrapped = True
        for callback in trainer.callbacks:
            if callback is self:
                continue
            for name in HOOKS:
                if getattr(type(callback), name, None) is not getattr(pl.Callback, name):  # its own hook, not a no-op
                    self._wrap(callback, name, label_of(callback))
        for logger in trainer.loggers:  # a part per method: log_metrics, add_image, flush, ...
            label = WRITES if isinstance(logger, TensorBoardLogger) else f"logging ({type(logger).__name__})"
            for name in LOGGER_METHODS:
                if callable(getattr(logger, name, None)):
                    self._wrap(logger, name, f"{label}: {name}")
            if isinstance(logger, TensorBoardLogger) and logger.experiment is not None:  # its SummaryWriter
                writer = logger.experiment
                for name in [n for n in dir(writer) if n.startswith("add_")] + ["flush"]:
                    self._wrap(writer, name, f"{label}: {name}")
        self.charge_cost = self._measure_charge_cost()
        self._last = time.perf_counter()

    def _measure_charge_cost(self, calls: int = 2000) -> float:
        """Seconds a charge costs: half a timed call of a no-op (two charges), charged to a scratch record."""

        class Probe:
            def hook(self) -> None:
                pass

        probe, record = Probe(), self._record
        self._wrap(probe, "hook", "probe")
        self._record = {}
        start = time.perf_counter()
        for _ in range(calls):
            probe.hook()
        self._record = record
        return (time.perf_counter() - start) / calls / 2

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()
        self.started_at = self.started_at or time.perf_counter()
        self._record, self._cpu_record = {}, {}
        self.epochs.append(self._record)
        self.cpu.append(self._cpu_record)
        self.steps.append(0)
        self._cpu(STEPS)
        self._group, self._key = STEPS, f"{STEPS}/{BETWEEN}"  # charged up to now by _close_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._enter_phase(STEPS, FORWARD)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._enter_phase(STEPS, BETWEEN)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One call of VAEModule's training_step can make several steps, with no Lightning hook between them, and with
        # no callback's step hook (on_before_backward, ...) it steps without Lightning's dispatches: so the phases are
        # told by the optimizer itself. zero_grad comes between the loss and its backward under either optimisation.
        # (Lightning's wrappers of the optimizers, which training_step gets, call zero_grad as their own method.)
        wrappers = pl_module.optimizers(use_pl_optimizer=True)
        self._optimizers = [*trainer.optimizers, *(wrappers if isinstance(wrappers, list) else [wrappers])]
        for optimizer in self._optimizers:
            optimizer.zero_grad = self._marking(optimizer.zero_grad, BACKWARD)
        manual = not pl_module.automatic_optimization  # automatic: the step's pre-hook runs before the closure
        self._step_hooks = [
            *(optimizer.register_step_pre_hook(self._before_step) for optimizer in trainer.optimizers if manual),
            *(optimizer.register_step_post_hook(self._after_step) for optimizer in trainer.optimizers),
        ]

    def _marking(self, method, phase: str):
        def marked(*args, **kwargs):
            self._enter_phase(STEPS, phase)
            return method(*args, **kwargs)

        return marked

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._enter_phase(STEPS, OPTIMIZER)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._enter_phase(STEPS, FORWARD)
        self.steps[-1] += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.epochs:
            self._enter_phase(EPOCH_END, VALIDATION)
            self._cpu(EPOCH_END)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.epochs:
            self._enter_phase(EPOCH_END, AFTER_VALIDATION)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._step_hooks:
            hook.remove()
        for optimizer in self._optimizers:
            del optimizer.zero_grad  # its own method again
        self._close_epoch()
        self._record, self._cpu_record = {}, None  # what follows (the test stage) is no epoch's
        self.ended_at = time.perf_counter()
