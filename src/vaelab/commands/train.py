"""`vaelab-train` and `vaelab-resume`: build every part with hydra.utils.instantiate, fit, test, report.

The settings were checked, and the run directory claimed and locked, before this module is imported
(vaelab.runs.rundir.RunDirectory; a resume: vaelab.runs.resume.prepare_resume). Here: what the run starts from, then
the work, then metrics.json.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.errors import DISK_ERRNOS, UserError, build, disk_message, when_stopped
from vaelab.files import atomic_write
from vaelab.progress import logs_above_bars
from vaelab.runs import resume as resuming
from vaelab.runs import settings
from vaelab.runs.hardware import gpus_hidden, use_threads
from vaelab.runs.resume import ResumePoint, Start, check_networks, fit_is_done, read_training_checkpoint
from vaelab.runs.rundir import take_folders_elsewhere
from vaelab.runs.sweep import objective, parallel_threads
from vaelab.training.hparams import hparams_of, write_hparams

log = logging.getLogger(__name__)
BPD_KEYS = ("val/nelbo", "test/nelbo", "val/nll_iwae", "test/nll_iwae")  # also reported in bits per dimension


def prepare(cfg: DictConfig) -> Start:
    """What a new run starts from: nothing, or the training checkpoint ckpt_path names (read and checked here)."""
    check_networks(cfg)
    run_dir = Path(cfg.paths.output_dir)
    take_folders_elsewhere(cfg, run_dir, new=True)  # outputs sent outside the run: never over another run's
    if cfg.get("ckpt_path") in (None, ""):
        return Start(cfg, run_dir)
    checkpoint, point = read_training_checkpoint(Path(str(cfg.ckpt_path)), f"ckpt_path={cfg.ckpt_path}", cfg)
    return Start(cfg, run_dir, checkpoint, point)


def build_logger(name: str, node: DictConfig, point: ResumePoint | None):
    """One of the run's loggers. Resumed, TensorBoard purges what the interrupted run logged after its checkpoint,
    and CSV keeps the rows logged before it (Lightning's CSVLogger would start metrics.csv afresh); MLflow and W&B
    start a new run of their own. MLflow 3 asks to opt into a local file store (the default: <run dir>/mlruns)."""
    from urllib.parse import urlparse

    from hydra.utils import get_object
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

    key = f"logger.{name}"
    try:
        target = get_object(str(node._target_))
    except Exception:  # build() below says what is wrong with it, in one line
        target = None
    is_a = lambda kind: isinstance(target, type) and issubclass(target, kind)  # noqa: E731
    if is_a(MLFlowLogger) and urlparse(str(node.get("tracking_uri") or "")).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if point is None:
        return build(node, key)
    if is_a(TensorBoardLogger):
        purge_step = resuming.first_step_logged_after(Path(instantiate(node).log_dir), point)  # building it writes nothing
        return build(node, key, **({} if purge_step is None else {"purge_step": purge_step}))
    if is_a(CSVLogger):
        rows = resuming.csv_rows_logged_before(Path(instantiate(node).log_dir) / "metrics.csv", point)
        logger = build(node, key)
        for step, metrics in rows:
            logger.experiment.log_metrics(metrics, step)
        logger.save()  # at once: the writer has just removed the old file
        return logger
    return build(node, key)


def continue_with(run_dir: Path) -> str:
    return f"vaelab-resume {shlex.quote(str(run_dir))}"


@contextlib.contextmanager
def named_disk_faults(run_dir: Path, cfg: DictConfig) -> Iterator[None]:
    """A full or unwritable disk during the run: the file (TensorBoard's event writer does not say which: its
    folder then), the setting that moves it (a logger's save_dir or a callback's dirpath when the file is theirs,
    else hydra.run.dir) and how to go on. A folder a setting names that cannot be created is a fault of that kind."""
    try:
        yield
    except OSError as err:
        setting = setting_for(cfg, run_dir, err.filename)
        if err.errno not in DISK_ERRNOS and not (setting and err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST)):
            raise
        named = err if err.filename else OSError(err.errno, err.strerror, str(run_dir / "tensorboard"))
        then = (
            f"; then continue with: {continue_with(run_dir)}"
            if resuming.newest_checkpoint(run_dir, OmegaConf.create({}))
            else "; then start the run again"
        )
        raise UserError(disk_message(named, f"{setting or 'hydra.run.dir'}=<dir>") + then) from None


def setting_for(cfg: DictConfig, run_dir: Path, filename: str | None) -> str | None:
    """The logger or callback setting whose folder holds `filename` (or is made inside it), when that folder is not in
    the run directory."""
    if not filename or str(filename).startswith(str(run_dir)):
        return None
    found = []
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            for key in settings.PATH_KEYS if isinstance(node, DictConfig) else ():
                folder, failed = str(node.get(key) or "").rstrip("/") + "/", str(filename).rstrip("/") + "/"
                if folder != "/" and (failed.startswith(folder) or folder.startswith(failed)):  # in it, or a parent
                    found.append((len(folder), f"{group}.{name}.{key}"))
    return max(found)[1] if found else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; returns the final val/* and test/* metrics (also in metrics.json)."""
    return run(prepare(cfg))


def resume(run_dir: str, overrides: list[str]) -> dict[str, float]:
    """`vaelab-resume RUN_DIR [key=value ...]` (vaelab.commands.cli): continue that run in place."""
    return run(resuming.prepare_resume(run_dir, overrides))


def build_parts(start: Start):
    """The data, the model and the trainer of the run (the model checked against the checkpoint it continues from)."""
    import pytorch_lightning as pl

    from vaelab.runs.checkpoints import check_fits, check_optimizer_state, vae_weights
    from vaelab.runs.guards import for_run
    from vaelab.training.console import silence_clutter
    from vaelab.training.data import LightningData

    silence_clutter()  # also with the console's callbacks removed (~callbacks.console ~callbacks.progress_bar)
    cfg, point = start.cfg, start.point
    use_threads(cfg.threads or parallel_threads())  # in a joblib sweep, null shares the cores out among the jobs
    pl.seed_everything(cfg.seed, workers=True)
    data = build(cfg.data, "data")
    model: pl.LightningModule = build(cfg.model, "model", **conditioning(cfg, data))
    model.steps_per_call = cfg.get("steps_per_call") or 1  # a run saved by an earlier vaelab has none: one a call
    if start.checkpoint is not None:
        check_fits(model.vae, vae_weights(start.checkpoint["state_dict"]), f"the checkpoint {point.path}")
        check_optimizer_state(model, start.checkpoint, f"the checkpoint {point.path}")
    loggers = [build_logger(name, c, point) for name, c in (cfg.get("logger") or {}).items() if c is not None]
    callbacks = [build(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    # Lightning's model summary table is off unless asked for (+trainer.enable_model_summary=true): its FLOPs column is
    # zeros without an example input and it lists the internal eval_means; callbacks.console says the model in one line.
    summary = bool(cfg.trainer.get("enable_model_summary", False))
    trainer: pl.Trainer = build(
        cfg.trainer, "trainer", logger=loggers or False, callbacks=[*callbacks, *for_run(cfg.seed)], enable_model_summary=summary
    )
    return LightningData(data), model, trainer


def fit_and_test(start: Start, model, datamodule, trainer) -> dict[str, float]:
    """The final val/* and test/* metrics, and their bits per dimension."""
    from pytorch_lightning.accelerators import CPUAccelerator

    from vaelab.runs.guards import interruptions

    cfg, point = start.cfg, start.point
    fit_done = fit_is_done(cfg, point)
    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    with interruptions(trainer, start.run_dir), gpus_hidden(on_cpu):
        trainer.fit(model, datamodule=datamodule, ckpt_path=point.path if point else None, weights_only=True)
    metrics = (
        point.val_metrics if fit_done else {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    )
    if cfg.test_after_fit and not trainer.interrupted:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        with interruptions(trainer, start.run_dir), gpus_hidden(on_cpu):
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    metrics.update({f"{key}_bpd": model.vae.bits_per_dim(metrics[key]) for key in BPD_KEYS if key in metrics})
    return dict(sorted(metrics.items()))


def report(cfg: DictConfig, run_dir: Path, trainer, metrics: dict[str, float]) -> None:
    """The loggers' summaries, then metrics.json: last, for the run is complete once it is there."""
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            write_hparams(logger, hparams_of(cfg), metrics)
        else:  # MLflow's params and metrics, CSV's hparams.yaml and a last metrics.csv row, W&B's config and summary
            logger.log_hyperparams(hparams_of(cfg))
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.finalize("success")  # written out (Lightning finalized them after the test: once more)
    from vaelab.training.console import figures_table

    summary = {key: hparams_of(cfg)[key] for key in ("likelihood", "binarize", "figures")} | metrics
    atomic_write(run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    log.info("\n%s", figures_table(metrics, summary["figures"], str(cfg.model.get("objective", "elbo"))))
    log.info("run directory: %s (metrics.json: every figure in full)", run_dir)


def announce(start: Start) -> None:
    """The run directory and the settings that differ from the defaults, before anything is built."""
    log.info("run directory: %s", start.run_dir)
    if start.resumed:
        changed = " ".join(start.overrides) or "none"
        log.info("continuing the run with its own settings (.hydra/config.yaml); changed now: %s", changed)
        return
    from hydra.core.hydra_config import HydraConfig

    given = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")] if HydraConfig.initialized() else []
    log.info(
        "settings changed from the defaults: %s (`vaelab-train --cfg job` prints every setting)",
        " ".join(given) if given else "none",
    )


def run(start: Start) -> dict[str, float]:
    announce(start)
    datamodule, model, trainer = build_parts(start)
    when_stopped(f"; continue with: {continue_with(start.run_dir)}")  # start-up ends: the work begins
    if start.resumed:  # recorded only now: a resume refused by any check above leaves the run as it was
        resuming.record_resume(start.run_dir, start.cfg, list(start.overrides))
        resuming.continue_log()
    with named_disk_faults(start.run_dir, start.cfg), logs_above_bars():  # Lightning's and vaelab's lines above its bar
        metrics = fit_and_test(start, model, datamodule, trainer)
        if trainer.is_global_zero:
            report(start.cfg, start.run_dir, trainer, metrics)
    return metrics


def conditioning(cfg: DictConfig, datamodule) -> dict:
    """For model.conditional=true, the data's class names (plain strings, saved in the checkpoint) the model is built
    with; one line when the data has none. Nothing for an unconditional model."""
    if not cfg.model.get("conditional", False):
        return {}
    names = datamodule.class_names() if hasattr(datamodule, "class_names") else None
    if not names:
        where = (
            f"data.path={cfg.data.path} has no class subfolders"
            if cfg.data.get("path")
            else f"data={cfg.data.dataset} has no class names"
        )
        raise UserError(
            f"model.conditional=true needs labelled images, but {where}: put the images in one subfolder per class, "
            "or train without model.conditional=true"
        )
    return {"class_names": list(names)}


def hydra_task(cfg: DictConfig) -> float | None:
    """The Hydra task; returns the final val/recon + val/kl (val/loss at beta 1) for sweepers to minimise."""
    return objective(train(cfg))
