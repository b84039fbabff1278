"""The Lightning wrapper that trains a vaelab.model.VAE: steps, the KL warm-up, logging, the optimizer.

Training objectives, each composable with beta:
- kl_warmup_epochs=N: the KL weight rises linearly from 0 to beta over N epochs (per step);
- free_bits=L: the KL term is sum_d max(L, mean over the batch of KL_d) (Kingma et al. 2016);
- objective=iwae, num_samples=K: the importance-weighted bound of Burda et al. (2015).
Validation and test always report the true bounds (beta as set, no warm-up, no free bits): val/loss (what
the best checkpoint is chosen by), val/nelbo = recon + KL, and test/nll_iwae, the IWAE estimate of -log p(x).

The constructor's arguments are the model's settings (conf/model/dense.yaml) and are saved in every checkpoint as
its hyper_parameters, so vaelab-eval and vaelab-generate rebuild the plain VAE from them without Lightning.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.profilers import PassThroughProfiler
from pytorch_lightning.strategies import SingleDeviceStrategy
from torchmetrics import MeanMetric

from vaelab.model.vae import VAE, add_noise, bounds

EVAL_KEYS = ("loss", "recon", "kl", "noisy_recon", "nelbo", "nll_iwae")
BPD_KEYS = ("nelbo", "nll_iwae")  # also logged in bits per dimension, as <stage>/<key>_bpd
WINDOW_FOLD = 1024  # losses of a logging window held before they are summed into one
EVAL_SEED = 0  # the dequantisation noise and the importance samples of validation and test: the same every epoch


def _plain(node):
    """Plain dicts and lists: checkpoints then hold only built-in types and load with weights_only."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class VAEModule(pl.LightningModule):
    """Trains `self.vae` (a vaelab.model.VAE built from these settings) with Lightning."""

    def __init__(
        self,
        encoder: Mapping,
        decoder: Mapping,
        latent_dim: int,
        optimizer: Mapping | None = None,
        name: str = "custom",
        objective: str = "elbo",
        beta: float = 1.0,
        epsilon_std: float = 1.0,
        noise_factor: float = 0.0,
        denoise: bool = False,
        likelihood: str = "bernoulli",
        likelihood_kwargs: Mapping | None = None,
        binarize: str = "none",
        kl_warmup_epochs: int = 0,
        free_bits: float = 0.0,
        num_samples: int = 1,
        eval_iwae_samples: int = 10,
        val_iwae_every_n_epochs: int = 0,
        conditional: bool = False,
        class_names: list[str] | None = None,
        prior: Mapping | None = None,
    ):
        super().__init__()
        class_names = [str(name) for name in class_names] if conditional and class_names else None
        encoder, decoder, optimizer = _plain(encoder), _plain(decoder), _plain(optimizer)
        likelihood_kwargs, prior = _plain(likelihood_kwargs), _plain(prior)  # prior: conf/model/prior/<name>.yaml, plain data
        # logger=False: the HPARAMS tab gets a flat, stable set of values from the entry point instead.
        self.save_hyperparameters(logger=False)
        self.vae = VAE.from_settings(self.hparams, instantiate)
        self._window_losses: list[torch.Tensor] = []  # each step's loss since train/loss was last logged (no host sync)
        self._window_steps = 0
        self._checkpoint_every: list[int] = []  # every_n_train_steps of the run's checkpoint callbacks (on_train_start)
        self._direct_steps = False  # backward and optimizer step without Lightning's hook dispatches (on_train_start)
        self._eval_generator: torch.Generator | None = None
        self._val_every: int | None = None  # trainer.check_val_every_n_epoch while the final epoch validates
        # Per-image means of validation and test figures (weighted by batch size; torchmetrics syncs them under DDP).
        # nan_strategy="disable": a NaN must reach the mean (the guard stops on it; torchmetrics' default drops it),
        # and no per-batch check means no host sync per batch.
        self.eval_means = torch.nn.ModuleDict(
            {f"{stage}_{key}": MeanMetric(nan_strategy="disable") for stage in ("val", "test") for key in EVAL_KEYS}
        )

    @property
    def automatic_optimization(self) -> bool:
        """Manual optimisation (training_step makes the optimizer step itself) skips Lightning's closure machinery:
        0.06-0.26 ms a step (benchmarks/lightning_floor.py --chunk 1). Lightning clips and accumulates gradients only
        under its automatic optimisation, so a run that asks for either gets that. The same steps and weights either way."""
        trainer = self._trainer
        return trainer is not None and (bool(trainer.gradient_clip_val) or trainer.accumulate_grad_batches != 1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of a vaelab before the redesign holds the VAE's weights at the top level: under `vae.` here.
        Lightning counts optimizer steps (global_step) per optimisation mode: a checkpoint written under the other
        mode (an earlier vaelab's, or a run with clipping) gets its count in both, so resuming continues at its step."""
        checkpoint["state_dict"] = {
            key if key.startswith(("vae.", "eval_means.")) else f"vae.{key}": value
            for key, value in checkpoint["state_dict"].items()
        }
        loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        automatic = (loop.get("epoch_loop.automatic_optimization.optim_progress") or {}).get("optimizer") or {}
        manual = loop.get("epoch_loop.manual_optimization.optim_step_progress")
        if isinstance(automatic.get("step"), dict) and isinstance(manual, dict):
            steps = [automatic["step"], manual]
            counted = max(steps, key=lambda progress: (progress.get("total") or {}).get("completed") or 0)
            automatic["step"] = loop["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(counted)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        return self.vae(x, y)

    def kl_weight(self) -> float:
        """beta, reached linearly over the first kl_warmup_epochs epochs (per step) of training."""
        epochs = self.hparams.kl_warmup_epochs
        if not epochs or not self.training:
            return self.hparams.beta
        done = self.trainer.current_epoch + self.trainer.fit_loop.epoch_loop.batch_idx / max(1, self.trainer.num_training_batches)
        return self.hparams.beta * min(1.0, done / epochs)

    # --- training ----------------------------------------------------------------------------------
    # Lightning hands training_step its batch iterator (the `dataloader_iter` argument), so one call can make several
    # optimizer steps: its per-batch machinery (hooks of 14 callbacks, the loop's bookkeeping, the logger connector)
    # then runs once per call, not once per step. Inside a call Lightning's counters are kept as if each batch were
    # its own call (its batch count, the step axis of the logged curves), and a call ends wherever Lightning decides
    # something by step or batch: a logging window, max_steps, a step checkpoint, a validation, the epoch's end, a
    # stop. So the steps, the weights, the logs and the checkpoints are those of one step a call (tested bit for bit).
    steps_per_call = 1  # vaelab-train sets conf/train.yaml's steps_per_call; 1 under automatic optimisation

    def training_step(self, dataloader_iter):
        trainer = self.trainer
        optimizer = None if self.automatic_optimization else self.optimizers()
        limit = self._steps_this_call(trainer) if optimizer is not None else 1  # automatic: Lightning calls it per step
        single = trainer.world_size == 1  # SIGTERM: under DDP Lightning shares it among the ranks only between calls
        convert, loop = trainer.precision_plugin.convert_input, trainer.fit_loop.epoch_loop  # looked up once a call
        first, losses = self.global_step, []  # the step the call's first batch makes (counted once it is made)
        while True:
            batch, _, _ = next(dataloader_iter)
            loss = self._train_on(convert(batch), optimizer)
            losses.append(loss.detach())
            if len(losses) == limit or dataloader_iter.done or trainer.should_stop or (single and trainer.received_sigterm):
                break
            _count_as_a_call(loop)
        self._log_train_loss(losses, first + len(losses), len(batch[0]))
        # the console's epoch mean reads loss_sum and steps (vaelab.training.console)
        return {"loss": loss, "loss_sum": torch.stack(losses).sum().float(), "steps": len(losses)}

    def _log_train_loss(self, losses: list[torch.Tensor], steps: int, batch_size: int) -> None:
        """train/loss, the mean loss of each window of log_every_n_steps steps, logged as one value at the window's
        last step (a call ends there): self.log costs ~0.5 ms. The window's losses are summed when it ends, so the sum
        is the same however many steps a call made; a long window's, WINDOW_FOLD at a time in order (memory)."""
        window = self._window_losses
        window += losses
        while len(window) > WINDOW_FOLD:
            window[:WINDOW_FOLD] = [torch.stack(window[:WINDOW_FOLD]).sum()]
        self._window_steps += len(losses)
        if steps % self.trainer.log_every_n_steps == 0:
            mean = torch.stack(window).sum().float() / self._window_steps
            window.clear()
            self._window_steps = 0
            # batch_size: Lightning asks it of a training_step that takes its iterator (it weighs epoch means only)
            self.log("train/loss", mean, prog_bar=True, batch_size=batch_size)
            if self.hparams.kl_warmup_epochs:
                self.log("train/beta", self.kl_weight(), batch_size=batch_size)

    def _steps_this_call(self, trainer: pl.Trainer) -> int:
        """Up to steps_per_call, ending at the first step after which Lightning decides something by step or batch."""
        step, loop, limit = self.global_step, trainer.fit_loop.epoch_loop, self.steps_per_call
        for every in (trainer.log_every_n_steps, *self._checkpoint_every):  # a logging window's end, a step checkpoint
            limit = min(limit, every - step % every)
        if trainer.max_steps >= 0:
            limit = min(limit, trainer.max_steps - step)
        every = trainer.val_check_batch  # batches between validations (or per epoch, as Lightning counts them)
        if every != math.inf:
            first = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx  # this call's
            limit = min(limit, (every - (first + 1) % every) % every + 1)
        return max(1, limit)

    def _train_on(self, batch, optimizer) -> torch.Tensor:
        """One batch's loss, and its optimizer step under manual optimisation."""
        x, y = batch
        hp, vae = self.hparams, self.vae
        target = vae.target(x)
        x_in = add_noise(target, hp.noise_factor) if hp.denoise else target
        loss = vae.training_loss(
            x_in, target, vae.labels_of(y), kl_weight=self.kl_weight(), free_bits=hp.free_bits, num_samples=hp.num_samples
        )
        if optimizer is not None:
            optimizer.optimizer.zero_grad()  # what LightningOptimizer's zero_grad comes to, without its indirection
            if self._direct_steps:  # what manual_backward and optimizer.step come to here, without their dispatches
                loss.backward()
                optimizer._on_before_step()  # the loop's step count (global_step)
                optimizer.optimizer.step()
                optimizer._on_after_step()
            else:
                self.manual_backward(loss)
                optimizer.step()
            # A call's next step runs in the same autocast context: bf16 copies of the weights cached there (torch's
            # default, later Lightning's) would be the weights of before this step (tested).
            torch.clear_autocast_cache()
        return loss

    def on_train_start(self) -> None:
        # ModelCheckpoint(every_n_train_steps=N) checks global_step % N at a call's end
        self._checkpoint_every = [n for c in self.trainer.checkpoint_callbacks if (n := getattr(c, "_every_n_train_steps", 0))]
        self._direct_steps = _hooks_unused(self.trainer, self)

    # --- the validation schedule ------------------------------------------------------------------
    # Validation every few epochs (trainer.check_val_every_n_epoch, conf/trainer/cpu.yaml) spares the others its cost;
    # the epoch a run ends in validates anyway (the last of max_epochs, one that reaches max_steps at its end, or a stop
    # asked for during it, by max_time or a callback; early stopping stops at a validation), so every run ends with the
    # val figures, pictures and best checkpoint of its final weights. Lightning decides whether to validate after this
    # hook (and after every callback's on_train_batch_end, so a stop asked for there counts).
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        trainer = self.trainer
        every = trainer.check_val_every_n_epoch
        if every is None or every == 1:
            return
        max_epochs, last_batch = trainer.max_epochs, trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs - 1
        steps_done = 0 <= trainer.max_steps <= trainer.global_step
        if trainer.should_stop or (last_batch and (last_epoch or steps_done)):
            self._val_every, trainer.check_val_every_n_epoch = every, 1  # this epoch only (on_train_epoch_end)

    def on_train_epoch_end(self) -> None:
        if self._val_every is not None:
            self.trainer.check_val_every_n_epoch, self._val_every = self._val_every, None

    # --- validation and test -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_generator = torch.Generator(device=self.device).manual_seed(EVAL_SEED)

    on_test_epoch_start = on_validation_epoch_start

    def _eval_step(self, x: torch.Tensor, stage: str, y: torch.Tensor | None = None) -> None:
        hp, vae, generator = self.hparams, self.vae, self._eval_generator
        y = vae.labels_of(y)
        target = vae.target(x, generator)
        parts, mu, logvar = vae.loss_and_posterior(target, target, y)
        if hp.noise_factor > 0:
            # Reconstruction error of noisy inputs against the clean images: the notebook's noise weakness, tracked.
            parts["noisy_recon"] = vae.loss(add_noise(target, hp.noise_factor), target, y)["recon"]
        if hp.objective != "notebook":
            parts["nelbo"] = parts["recon"] + parts["kl"]
            every = hp.val_iwae_every_n_epochs
            if stage == "test" or (every and not self.trainer.sanity_checking and (self.current_epoch + 1) % every == 0):
                iwae = bounds(vae, target, mu, logvar, hp.eval_iwae_samples, generator=generator, labels=y)["nll_iwae"]
                parts["nll_iwae"] = iwae.mean()
        for key, value in parts.items():
            self.eval_means[f"{stage}_{key}"].update(value.detach().float(), weight=x.shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch[0], "val", batch[1])

    def test_step(self, batch, batch_idx):
        self._eval_step(batch[0], "test", batch[1])

    def _log_epoch(self, stage: str) -> None:
        """<stage>/<key> for each figure computed this epoch, its per-image mean (Lightning computes the metric, which
        torchmetrics sums over the ranks, and resets it), logged once at the epoch's end: a self.log per batch and
        figure cost more than the metrics' updates. And <stage>/nelbo_bpd and <stage>/nll_iwae_bpd from those means
        (every rank logs the same value)."""
        for key in EVAL_KEYS:
            mean = self.eval_means[f"{stage}_{key}"]
            if not mean.update_called:  # val/nll_iwae only every val_iwae_every_n_epochs epochs; none for the notebook
                continue
            # val/loss in the progress bar too, beside train/loss
            self.log(f"{stage}/{key}", mean, on_step=False, on_epoch=True, prog_bar=stage == "val" and key == "loss")
            if key in BPD_KEYS:
                self.log(f"{stage}/{key}_bpd", self.vae.bits_per_dim(mean.compute()), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        make = instantiate(self.hparams.optimizer)  # a partial: the config holds its settings
        clips = self._trainer is not None and bool(self._trainer.gradient_clip_val)  # also called without one (checks)
        if clips and make.keywords.get("fused"):
            # Under mixed precision Lightning clips only gradients it unscaled itself, and refuses an optimizer that
            # unscales inside its step (a fused one): the per-tensor kernel makes the same update.
            make = functools.partial(make.func, *make.args, **{**make.keywords, "fused": False})
        return make(params=self.parameters())


STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def _hooks_unused(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether Lightning's manual_backward and optimizer.step would only dispatch hooks that nobody implements around
    loss.backward() and the optimizer's own step: one device, no gradient scaler, no profiler, no callback or module
    with its own step hooks or backward. vaelab-train's 14 callbacks and the module get 45 dispatches a step there:
    0.12-0.20 ms a step at batch 32 in two runs of benchmarks/steps_per_call.py (its "step hooks" loop)."""
    precision = trainer.precision_plugin
    plain = type(precision) is Precision or (type(precision) is MixedPrecision and precision.scaler is None)
    hooked = any(getattr(type(c), hook) is not getattr(pl.Callback, hook) for c in trainer.callbacks for hook in STEP_HOOKS)
    hooked = hooked or any(
        getattr(type(module), hook) is not getattr(pl.LightningModule, hook) for hook in (*STEP_HOOKS, "backward")
    )
    return (
        type(trainer.strategy) is SingleDeviceStrategy
        and plain
        and type(trainer.profiler) is PassThroughProfiler
        and module._fabric is None
        and not hooked
    )


def _count_as_a_call(loop) -> None:
    """Lightning's counters after one more batch of a call, as if that batch had been a call of its own: the batch
    finished (processed, completed), the next one started, and one more batch that stepped (the logged curves' x axis)."""
    progress = loop.batch_progress
    progress.increment_processed()
    progress.increment_completed()
    progress.increment_ready()
    progress.increment_started()
    loop._batches_that_stepped += 1
