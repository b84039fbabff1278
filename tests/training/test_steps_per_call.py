"""Several optimizer steps per Lightning training_step call (VAEModule.steps_per_call, conf/train.yaml): the same
training as one step a call, bit for bit, under every setting that Lightning decides by step or by batch: the weights,
the step and batch counts, every logged value and its step, each validation's place, the checkpoints and their loop
state, the console's epoch mean, the KL warm-up, and a resume from a checkpoint written inside an epoch."""

import collections
import logging

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.plugins.precision import MixedPrecision

import vaelab.training.module as module_code
from conftest import dense_vae
from vaelab.data.tensors import TensorBatches
from vaelab.training.console import Console
from vaelab.training.module import STEP_HOOKS, _hooks_unused


class Recorder(Logger):
    """Every (step, name, value) the loggers get."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "recorder", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows += [(step, key, float(value)) for key, value in sorted(metrics.items())]


class Seen(pl.Callback):
    """Where each validation ran (step, batch), how many training_step calls were made, the checkpoints written."""

    def __init__(self):
        self.validations, self.calls, self.saved = [], 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls += 1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_idx))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        loop = checkpoint["loops"]["fit_loop"]
        progress = loop["epoch_loop.batch_progress"]
        self.saved.append((checkpoint["global_step"], loop["epoch_loop.state_dict"]["_batches_that_stepped"], progress))


IMAGES = torch.bernoulli(torch.rand(60, 1, 4, 4, generator=torch.Generator().manual_seed(1)))


def fit(tmp_path, steps_per_call, every_n_train_steps=None, ckpt_path=None, extra_callbacks=(), **settings):
    torch.manual_seed(0)
    module = dense_vae(kl_warmup_epochs=1)
    module.steps_per_call = steps_per_call
    recorder, seen, console = Recorder(), Seen(), Console()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / f"ckpt{steps_per_call}", every_n_train_steps=every_n_train_steps, save_top_k=-1
    )
    trainer = pl.Trainer(
        **{"max_epochs": 3, "log_every_n_steps": 4, **settings},
        logger=recorder,
        callbacks=[seen, console, checkpoints, *extra_callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    train = TensorBatches(IMAGES, torch.zeros(60), batch_size=7, shuffle=True)  # 9 batches an epoch, the last of 4
    val = TensorBatches(IMAGES[:20], torch.zeros(20), batch_size=10, shuffle=False)
    epoch_lines = []
    original = console.epoch_line
    console.epoch_line = lambda *args: epoch_lines.append(original(*args).rsplit(" | ", 1)[0]) or ""
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    return module, trainer, recorder, seen, epoch_lines


SETTINGS = {
    "epochs": {},
    "max_steps inside an epoch": {"max_steps": 13},
    "limit_train_batches as a count": {"limit_train_batches": 5},
    "limit_train_batches as a fraction": {"limit_train_batches": 0.7},
    "val_check_interval in batches": {"val_check_interval": 4},
    "val_check_interval across epochs": {"val_check_interval": 5, "check_val_every_n_epoch": None},
    "val_check_interval as a fraction": {"val_check_interval": 0.5},
    "step checkpoints": {"every_n_train_steps": 5},
    "log every step": {"log_every_n_steps": 1},
    "fast_dev_run": {"fast_dev_run": True},
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_several_steps_a_call_train_as_one_step_a_call(tmp_path, case):
    one, one_trainer, one_log, one_seen, one_lines = fit(tmp_path, 1, **SETTINGS[case])
    many, trainer, log, seen, lines = fit(tmp_path, 5, **SETTINGS[case])
    assert trainer.global_step == one_trainer.global_step > 0
    for chunked, single in zip(many.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(chunked, single, rtol=0, atol=0)
    loop, one_loop = trainer.fit_loop.epoch_loop, one_trainer.fit_loop.epoch_loop
    assert loop._batches_that_stepped == one_loop._batches_that_stepped
    assert loop.batch_progress.state_dict() == one_loop.batch_progress.state_dict()  # Lightning's count of batches
    quick = case == "fast_dev_run"  # Lightning then logs nothing and writes no checkpoint
    assert log.rows == one_log.rows and (quick or any(key == "train/loss" for _, key, _ in log.rows))
    assert seen.validations == one_seen.validations
    assert seen.saved == one_seen.saved and (quick or len(seen.saved) > 0)
    assert lines == one_lines and len(lines) > 0
    assert trainer.callback_metrics.keys() == one_trainer.callback_metrics.keys()
    if case in ("log every step", "fast_dev_run"):  # a window of one step ends every call; one step in all
        assert seen.calls == one_seen.calls
    else:
        assert seen.calls < one_seen.calls  # several steps were made in one call


def test_bf16_autocast_that_caches_weight_casts_trains_as_one_step_a_call(tmp_path, monkeypatch):
    """Under bf16-mixed, a call of several steps runs them all inside Lightning's one autocast context. Lightning
    2.6.6 makes it without a cast cache; one that caches the weights' bf16 copies (torch's default, and what later
    Lightning versions do in forward_context) would give every step after a call's first the weights of before its
    optimizer steps, unless the cache is cleared after each step, as VAEModule does."""
    caching = lambda plugin: torch.autocast(plugin.device, dtype=torch.bfloat16, cache_enabled=True)  # noqa: E731
    monkeypatch.setattr(MixedPrecision, "autocast_context_manager", caching)
    one, *_ = fit(tmp_path / "one", 1, precision="bf16-mixed", max_epochs=1)
    many, *_ = fit(tmp_path / "many", 5, precision="bf16-mixed", max_epochs=1)
    for chunked, single in zip(many.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(chunked, single, rtol=0, atol=0)


class StepHooks(pl.Callback):
    """Counts Lightning's step hooks. A callback with any of them has VAEModule step through Lightning."""

    def __init__(self):
        self.calls = collections.Counter()

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module):
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls["on_before_optimizer_step"] += 1


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_direct_steps_train_as_lightnings_backward_and_optimizer_step(tmp_path, precision):
    """With no step hook to dispatch, VAEModule calls loss.backward() and the optimizer's step itself: the same
    weights, optimizer state, step counts, logs and checkpoints as through manual_backward and Lightning's step."""
    hooks = StepHooks()
    direct, trainer, log, seen, lines = fit(tmp_path / "direct", 5, precision=precision, max_epochs=2)
    hooked, hooked_trainer, hooked_log, hooked_seen, hooked_lines = fit(
        tmp_path / "hooked", 5, precision=precision, max_epochs=2, extra_callbacks=[hooks]
    )
    assert direct._direct_steps and not hooked._direct_steps
    assert trainer.global_step == hooked_trainer.global_step == 18
    assert dict(hooks.calls) == dict.fromkeys(STEP_HOOKS, 18)  # every step still dispatched them, once
    for a, b in zip(direct.parameters(), hooked.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state, hooked_state = (t.optimizers[0].state_dict()["state"] for t in (trainer, hooked_trainer))
    for key in state:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state[key][name], hooked_state[key][name], rtol=0, atol=0)
    assert (log.rows, seen.saved, seen.validations, lines) == (
        hooked_log.rows,
        hooked_seen.saved,
        hooked_seen.validations,
        hooked_lines,
    )


def _hooks_unused_in(module, **settings) -> bool:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **settings)
    return _hooks_unused(trainer, module)


def test_direct_steps_only_where_lightning_would_add_nothing_but_dispatches():
    """A profiler, a gradient scaler, a module's own backward or step hook, or a callback's: Lightning's own path."""

    class OwnBackward(type(dense_vae())):
        def backward(self, loss, *args, **kwargs):
            loss.backward()

    class OwnHook(type(dense_vae())):
        def on_before_optimizer_step(self, optimizer):
            pass

    assert _hooks_unused_in(dense_vae()) and _hooks_unused_in(dense_vae(), precision="bf16-mixed")
    assert not _hooks_unused_in(dense_vae(), profiler="simple")
    assert not _hooks_unused_in(dense_vae(), callbacks=[StepHooks()])
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert not _hooks_unused_in(dense_vae(), plugins=[scaled])
    settings = dict(dense_vae().hparams)
    assert not _hooks_unused_in(OwnBackward(**settings)) and not _hooks_unused_in(OwnHook(**settings))


def test_a_run_resumed_from_a_checkpoint_inside_an_epoch_continues_alike(tmp_path, caplog):
    """A step checkpoint written inside an epoch by a run of several steps a call holds Lightning's loop state of a
    run of one step a call, so resuming from it with either continues the same way."""
    _, _, _, seen, _ = fit(tmp_path, 5, every_n_train_steps=12, max_epochs=2)
    (step, _, progress), *_ = seen.saved
    assert step == 12 and progress["current"]["ready"] == 3  # the third batch of epoch 1: inside the epoch
    checkpoint = tmp_path / "ckpt5" / "epoch=1-step=12.ckpt"
    with caplog.at_level(logging.WARNING):
        resumed = [fit(tmp_path / str(k), k, ckpt_path=checkpoint) for k in (1, 5)]
    (one, one_trainer, one_log, *_), (many, trainer, log, *_) = resumed
    assert trainer.global_step == one_trainer.global_step == 27
    for chunked, single in zip(many.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(chunked, single, rtol=0, atol=0)
    assert log.rows == one_log.rows


def test_a_stop_asked_for_inside_a_call_ends_it_there(tmp_path):
    """trainer.should_stop set while the steps run (e.g. by a hook under the optimizer's step) ends the call at once."""

    class StopAtStep(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            trainer.should_stop = trainer.global_step == 6  # the 7th step

    torch.manual_seed(0)
    module = dense_vae()
    module.steps_per_call = 5
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[StopAtStep()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=TensorBatches(IMAGES, torch.zeros(60), batch_size=7, shuffle=True))
    assert trainer.global_step == 7


class WindowSizes(pl.Callback):
    """The most losses VAEModule held for its logging window after a call, and each step's loss."""

    def __init__(self, module):
        self.most, self.losses = 0, []
        train_on = module._train_on
        module._train_on = lambda *args: self.losses.append(loss := train_on(*args)) or loss

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.most = max(self.most, len(pl_module._window_losses))


def test_a_long_logging_window_holds_few_losses_and_logs_their_mean_however_many_steps_a_call(tmp_path, monkeypatch):
    """train/loss is the mean of a window's losses, summed when the window ends: the same sum bit for bit with 1 and
    5 steps a call. A window of more than WINDOW_FOLD steps sums them WINDOW_FOLD at a time as it goes (memory): the
    module then holds at most WINDOW_FOLD of them, and the places it sums at do not depend on the call."""
    monkeypatch.setattr(module_code, "WINDOW_FOLD", 3)
    runs = []
    for steps_per_call in (1, 5):
        torch.manual_seed(0)
        module = dense_vae()
        module.steps_per_call = steps_per_call
        sizes, recorder = WindowSizes(module), Recorder()
        trainer = pl.Trainer(
            max_epochs=2, log_every_n_steps=10, logger=recorder, callbacks=[sizes], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=TensorBatches(IMAGES, torch.zeros(60), batch_size=7, shuffle=True))
        runs.append((sizes, [(step, value) for step, key, value in recorder.rows if key == "train/loss"]))
    (one, one_logged), (many, logged) = runs
    assert logged == one_logged and [step for step, _ in logged] == [9]  # 18 steps: one whole window
    assert one.most == many.most == 3  # without the folding, 5 after a call of 5 steps
    expected = torch.stack(many.losses[:10]).double().mean().item()
    assert logged[0][1] == pytest.approx(expected, rel=1e-6)
